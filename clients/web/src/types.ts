// The protocol's objects and the SDK's event, as the TypeScript SDK (clients/js) types them (generated
// from schemas/), and the slice of its ChatClient the page calls: the UI depends on this narrow shape only.

import type { ChatClient, ChatClientOptions } from "../../js/src/index";

export type {
  ChatEvent,
  ClientState as ConnectionState,
  Conversation,
  Message,
  Page,
  SearchResults,
  Session,
  User,
} from "../../js/src/index";

export type ChatApi = Pick<
  ChatClient,
  | "user"
  | "state"
  | "connect"
  | "close"
  | "on"
  | "createDirect"
  | "createGroup"
  | "invite"
  | "leave"
  | "sendMessage"
  | "getPriorMessages"
  | "getConversations"
  | "getActiveUsers"
  | "markRead"
  | "typing"
  | "editMessage"
  | "deleteMessage"
  | "react"
  | "searchMessages"
>;

export type ClientOptions = Pick<ChatClientOptions, "user" | "url" | "password" | "prefix">;

/** Where the page finds the broker: `/config.json` of the bridge's HTTP server. */
export interface PageConfig {
  ws_url: string | null;
  prefix: string;
  accounts: boolean | null;
}
