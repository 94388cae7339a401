// The protocol's objects as the page uses them (docs/protocol.md, "Objects inside data"), and the slice
// of the SDK's ChatClient (clients/js, JS-API) the page calls: the UI depends on this narrow shape only.

export interface User {
  user_id: string;
  display_name: string | null;
  active: boolean;
}

export interface Conversation {
  conversation_id: string;
  kind: "global" | "direct" | "group" | "thread";
  title: string | null;
  owner_id: string | null;
  participants: string[];
  parent_conversation_id: string | null;
  parent_message_id: string | null;
  created_at: string;
  last_seq: number;
  last_rev?: number;
  read_seq?: number;
  unread?: number;
}

export interface Message {
  message_id: string;
  conversation_id: string;
  seq: number;
  sender_id: string;
  body: string;
  client_msg_id: string | null;
  created_at: string;
  edited_at?: string | null;
  deleted_at?: string | null;
  reactions?: Record<string, string[]>;
  rev?: number;
}

export interface Session {
  user: User;
  session_id: string;
  conversations: Conversation[];
  active_users: User[];
  conversations_next?: string | null;
  active_users_next?: string | null;
}

export interface Page {
  conversation_id: string;
  messages: Message[];
  has_more: boolean;
}

export interface SearchResults {
  query: string;
  messages: Message[];
  has_more: boolean;
}

export interface ChatEvent {
  type: string;
  // eslint-disable-next-line @typescript-eslint/no-explicit-any
  data: any;
  requestId: string | null;
  eventId: string | null;
  ts: string;
  catchUp: boolean;
  message?: Message;
  conversation?: Conversation;
  conversationId?: string;
}

export type ConnectionState = "idle" | "connecting" | "online" | "reconnecting" | "closed";

export interface ChatApi {
  readonly user: string;
  readonly state: ConnectionState;
  connect(): Promise<Session>;
  close(): Promise<void>;
  on(type: string, handler: (e: ChatEvent) => void): () => void;
  createDirect(userId: string): Promise<Conversation>;
  createGroup(participants: string[], title?: string): Promise<Conversation>;
  invite(conversationId: string, userIds: string[]): Promise<string[]>;
  leave(conversationId: string): Promise<unknown>;
  sendMessage(conversationId: string, body: string, opts?: { clientMsgId?: string }): Promise<Message>;
  getPriorMessages(conversationId: string, opts?: { beforeSeq?: number; limit?: number }): Promise<Page>;
  getConversations(): Promise<Conversation[]>;
  getActiveUsers(): Promise<User[]>;
  markRead(conversationId: string, seq: number): Promise<unknown>;
  typing(conversationId: string, typing?: boolean): Promise<void>;
  editMessage(messageId: string, body: string): Promise<Message>;
  deleteMessage(messageId: string): Promise<Message>;
  react(messageId: string, emoji: string, on?: boolean): Promise<unknown>;
  searchMessages(query: string, opts?: { conversationId?: string; limit?: number }): Promise<SearchResults>;
}

export interface ClientOptions {
  user: string;
  url: string;
  password?: string;
  prefix?: string;
}

/** Where the page finds the broker: `/config.json` of the bridge's HTTP server. */
export interface PageConfig {
  ws_url: string | null;
  prefix: string;
  accounts: boolean | null;
}
