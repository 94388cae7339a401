export { ChatClient, WaitTimeout, clientIdFor } from "./client.js";
export type { ChatClientOptions, Handler } from "./client.js";
export {
  BadRequest,
  ChatBridgeError,
  ConnectionFailed,
  Forbidden,
  InternalError,
  NotFound,
  PayloadTooLarge,
  ProtocolError,
  RateLimited,
  RequestTimeout,
  UnknownCommand,
  errorFrom,
} from "./errors.js";
export type * from "./types.js";
export { COMMAND_NAMES, ERROR_CODES, EVENT_TYPES } from "./generated/protocol.js";
