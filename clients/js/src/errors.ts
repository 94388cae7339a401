/**
 * The SDK's errors. A `ProtocolError` subclass per error code of the protocol.
 *
 * ChatBridgeError
 * ├── ProtocolError          the bridge answered with an `error` event (code, message, command, requestId)
 * │   ├── BadRequest         bad-request
 * │   ├── UnknownCommand     unknown-command
 * │   ├── NotFound           not-found
 * │   ├── Forbidden          forbidden
 * │   ├── PayloadTooLarge    payload-too-large
 * │   ├── RateLimited        rate-limited (carries retryAfter, in seconds)
 * │   └── InternalError      internal (nothing was done; the command may be retried)
 * ├── RequestTimeout         no answer within the timeout (the command may still have been applied)
 * └── ConnectionFailed       the broker could not be reached or refused us, or the client is closed
 */
import type { ErrorData } from "./generated/protocol.js";

/** Everything the SDK rejects with on purpose. */
export class ChatBridgeError extends Error {
  constructor(message: string) {
    super(message);
    this.name = new.target.name;
  }
}

/** The bridge refused a command: the `error` event's fields. */
export class ProtocolError extends ChatBridgeError {
  static readonly code: string = "";
  /** The protocol's error code (`not-found`, ...); an unknown code is kept as sent. */
  readonly code: string;
  /** The bridge's explanation, without the code. */
  readonly detail: string;
  readonly command: string | null;
  readonly requestId: string | null;

  constructor(detail: string, opts: { code?: string; command?: string | null; requestId?: string | null } = {}) {
    const code = opts.code ?? (new.target as typeof ProtocolError).code;
    super(`${code}: ${detail}` + (opts.command ? ` (${opts.command})` : ""));
    this.code = code;
    this.detail = detail;
    this.command = opts.command ?? null;
    this.requestId = opts.requestId ?? null;
  }
}

export class BadRequest extends ProtocolError {
  static override readonly code = "bad-request";
}
export class UnknownCommand extends ProtocolError {
  static override readonly code = "unknown-command";
}
export class NotFound extends ProtocolError {
  static override readonly code = "not-found";
}
export class Forbidden extends ProtocolError {
  static override readonly code = "forbidden";
}
export class PayloadTooLarge extends ProtocolError {
  static override readonly code = "payload-too-large";
}
export class RateLimited extends ProtocolError {
  static override readonly code = "rate-limited";
  /** Seconds until one more command would be accepted. */
  readonly retryAfter: number;

  constructor(
    detail: string,
    opts: { retryAfter?: number; command?: string | null; requestId?: string | null } = {},
  ) {
    super(detail, { command: opts.command ?? null, requestId: opts.requestId ?? null });
    this.retryAfter = opts.retryAfter ?? 1;
  }
}
export class InternalError extends ProtocolError {
  static override readonly code = "internal";
}

/** No answer to a command within its timeout (the command may still have been applied). */
export class RequestTimeout extends ChatBridgeError {
  readonly command: string;
  readonly requestId: string;
  /** Milliseconds waited. */
  readonly timeout: number;

  constructor(command: string, requestId: string, timeout: number) {
    super(`no answer to ${command} (request_id ${requestId}) within ${timeout} ms`);
    this.command = command;
    this.requestId = requestId;
    this.timeout = timeout;
  }
}

/** The broker could not be reached, refused the connection or credentials, or the client was closed. */
export class ConnectionFailed extends ChatBridgeError {}

const BY_CODE: Record<string, typeof ProtocolError> = Object.fromEntries(
  [BadRequest, UnknownCommand, NotFound, Forbidden, PayloadTooLarge, InternalError].map((cls) => [cls.code, cls]),
);

/** The error for an `error` event's data. */
export function errorFrom(data: Partial<ErrorData> | Record<string, unknown>, requestId: string | null): ProtocolError {
  const code = typeof data.code === "string" && data.code ? data.code : "unknown";
  const detail = typeof data.message === "string" ? data.message : code;
  const command = typeof data.command === "string" ? data.command : null;
  if (code === RateLimited.code) {
    const retry = data.retry_after;
    return new RateLimited(detail, { retryAfter: typeof retry === "number" ? retry : 1, command, requestId });
  }
  const cls = BY_CODE[code];
  return cls ? new cls(detail, { command, requestId }) : new ProtocolError(detail, { code, command, requestId });
}
