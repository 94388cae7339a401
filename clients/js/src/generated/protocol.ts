// Generated from the JSON Schemas in schemas/ by clients/js/scripts/generate.mjs. Do not edit:
// `npm run generate` writes it again, `npm run check-generated` fails when it differs.

// -- objects inside `data` --

export interface ActiveUsersData {
  users: UserOut[];
  /** default false */
  has_more?: boolean;
  /** null on the last page; otherwise pass it as `after` to get the next page */
  next?: string | null;
}

export interface ConnectedData {
  user: UserOut;
  session_id: string;
  conversations: ConversationOut[];
  active_users: UserOut[];
  /** null when `conversations` is complete; otherwise the `after` of a get-conversations for the rest */
  conversations_next?: string | null;
  /** null when `active_users` is complete; otherwise the `after` of a get-active-users for the rest */
  active_users_next?: string | null;
}

export interface ConversationData {
  conversation: ConversationOut;
}

export interface ConversationIdData {
  conversation_id: string;
}

export interface ConversationOut {
  conversation_id: string;
  kind: "global" | "direct" | "group" | "thread";
  title: string | null;
  owner_id: string | null;
  /** user ids; for `global` empty, meaning everyone */
  participants: string[];
  parent_conversation_id: string | null;
  parent_message_id: string | null;
  /** ISO 8601 in UTC with milliseconds, e.g. 2026-11-24T10:00:00.123Z */
  created_at: string;
  last_seq: number;
  /** (1.1) the addressed user's read marker, 0 when none (and on the conversation topic) */
  read_seq: number;
  /** (1.1) last_seq - read_seq for the addressed user */
  unread: number;
  /** (1.1) the highest rev in the conversation; 0 when empty */
  last_rev: number;
}

export interface ConversationsData {
  conversations: ConversationOut[];
  /** default false */
  has_more?: boolean;
  /** null on the last page; otherwise pass it as `after` to get the next page */
  next?: string | null;
}

export interface ErrorData {
  code: "bad-request" | "unknown-command" | "not-found" | "forbidden" | "payload-too-large" | "rate-limited" | "internal";
  message: string;
  command: string | null;
  /** seconds; only with rate-limited */
  retry_after?: number | null;
}

export interface MessageData {
  message: MessageOut;
}

export interface MessageOut {
  message_id: string;
  conversation_id: string;
  seq: number;
  sender_id: string;
  /** "" once deleted */
  body: string;
  client_msg_id: string | null;
  /** ISO 8601 in UTC with milliseconds, e.g. 2026-11-24T10:00:00.123Z */
  created_at: string;
  /** (1.1) the last edit, null if never */
  edited_at: string | null;
  /** (1.1) set on a tombstone */
  deleted_at: string | null;
  /** (1.1) emoji -> user ids in the order they reacted; emoji in the order they first appeared; {} when none */
  reactions: { [key: string]: string[] };
  /** (1.1) the conversation's rev at this message's last change */
  rev: number;
}

export interface MessagesData {
  conversation_id: string;
  messages: MessageOut[];
  has_more: boolean;
}

export interface NotificationData {
  /** the participant without an active session */
  user_id: string;
  /** for a reply, the thread's */
  conversation_id: string;
  message_id: string;
  sender_id: string;
  /** the body's first 100 characters (code points), nothing added */
  preview: string;
}

export interface ParticipantLeftData {
  conversation_id: string;
  user_id: string;
}

export interface ParticipantsAddedData {
  conversation_id: string;
  user_ids: string[];
}

export interface ParticipantsData {
  conversation_id: string;
  participants: UserOut[];
  /** default false */
  has_more?: boolean;
  /** null on the last page; otherwise pass it as `after` to get the next page */
  next?: string | null;
}

export interface ReactionChangedData {
  conversation_id: string;
  message_id: string;
  emoji: string;
  user_id: string;
  on: boolean;
  message: MessageOut;
}

export interface ReadMarkerData {
  conversation_id: string;
  user_id: string;
  read_seq: number;
}

export interface SearchResultsData {
  query: string;
  messages: MessageOut[];
  has_more: boolean;
}

export interface TypingData {
  conversation_id: string;
  user_id: string;
  typing: boolean;
}

export interface UserConnectedData {
  user: UserOut;
}

export interface UserDisconnectedData {
  user_id: string;
}

export interface UserOut {
  user_id: string;
  display_name: string | null;
  active: boolean;
}

// -- commands, events, retained topics --

/** The `connect` command, published to {prefix}/users/{user}/commands/connect. Unknown fields are ignored. */
export interface ConnectCommand {
  /** maxLength 64 */
  request_id?: string | null;
  /** minLength 1; maxLength 64 */
  session_id: string;
  /** minLength 1; maxLength 100 */
  display_name?: string | null;
}

/** The `create-conversation` command, published to {prefix}/users/{user}/commands/create-conversation. Unknown fields are ignored. */
export interface CreateConversationCommand {
  /** maxLength 64 */
  request_id?: string | null;
  kind: "direct" | "group";
  participants: string[];
  /** minLength 1; maxLength 200 */
  title?: string | null;
}

/** The `delete-message` command, published to {prefix}/users/{user}/commands/delete-message. Unknown fields are ignored. The sender, or the owner of a group (and of its threads), leaves a tombstone. */
export interface DeleteMessageCommand {
  /** maxLength 64 */
  request_id?: string | null;
  /** pattern `^[A-Za-z0-9_-]{1,64}$` */
  message_id: string;
}

/** The `disconnect` command, published to {prefix}/users/{user}/commands/disconnect. Unknown fields are ignored. */
export interface DisconnectCommand {
  /** maxLength 64 */
  request_id?: string | null;
  /** minLength 1; maxLength 64 */
  session_id: string;
  reason?: "client" | "lost" | null;
}

/** The `edit-message` command, published to {prefix}/users/{user}/commands/edit-message. Unknown fields are ignored. Only the sender may edit; a deleted message is not-found. */
export interface EditMessageCommand {
  /** maxLength 64 */
  request_id?: string | null;
  /** pattern `^[A-Za-z0-9_-]{1,64}$` */
  message_id: string;
  /** minLength 1; maxLength 8000 */
  body: string;
}

/** The `get-active-users` command, published to {prefix}/users/{user}/commands/get-active-users. Unknown fields are ignored. Pages, by ascending user id: `after` is the `next` of the previous page. */
export interface GetActiveUsersCommand {
  /** maxLength 64 */
  request_id?: string | null;
  /** pattern `^[A-Za-z0-9_-]{1,64}$` */
  after?: string | null;
  /**
   * at most this many items
   * minimum 1; maximum 1000; default 1000
   */
  limit?: number;
}

/** The `get-conversations` command, published to {prefix}/users/{user}/commands/get-conversations. Unknown fields are ignored. Pages: without `after`, the first page; answers carry `next` while more follow. */
export interface GetConversationsCommand {
  /** maxLength 64 */
  request_id?: string | null;
  /** minLength 1; maxLength 100 */
  after?: string | null;
  /**
   * at most this many items
   * minimum 1; maximum 1000; default 1000
   */
  limit?: number;
}

/** The `get-messages` command, published to {prefix}/users/{user}/commands/get-messages. Unknown fields are ignored. Exactly one of `since_seq`, `since` and `since_rev` is required (checked by the handler). */
export interface GetMessagesCommand {
  /** maxLength 64 */
  request_id?: string | null;
  /** pattern `^[A-Za-z0-9_-]{1,64}$` */
  conversation_id: string;
  /** minimum 0; maximum 4611686018427388000 */
  since_seq?: number | null;
  since?: string | null;
  /**
   * (1.1) messages new or changed after this rev, in ascending rev
   * minimum 0; maximum 4611686018427388000
   */
  since_rev?: number | null;
  /** minimum 1; maximum 500; default 100 */
  limit?: number;
}

/** The `get-participants` command, published to {prefix}/users/{user}/commands/get-participants. Unknown fields are ignored. Pages, by ascending user id: `after` is the `next` of the previous page. */
export interface GetParticipantsCommand {
  /** maxLength 64 */
  request_id?: string | null;
  /** pattern `^[A-Za-z0-9_-]{1,64}$` */
  conversation_id: string;
  /** pattern `^[A-Za-z0-9_-]{1,64}$` */
  after?: string | null;
  /**
   * at most this many items
   * minimum 1; maximum 1000; default 1000
   */
  limit?: number;
}

/** The `get-prior-messages` command, published to {prefix}/users/{user}/commands/get-prior-messages. Unknown fields are ignored. */
export interface GetPriorMessagesCommand {
  /** maxLength 64 */
  request_id?: string | null;
  /** pattern `^[A-Za-z0-9_-]{1,64}$` */
  conversation_id: string;
  /** minimum 0; maximum 4611686018427388000 */
  before_seq?: number | null;
  /** minimum 1; maximum 500; default 50 */
  limit?: number;
}

/** The `invite` command, published to {prefix}/users/{user}/commands/invite. Unknown fields are ignored. */
export interface InviteCommand {
  /** maxLength 64 */
  request_id?: string | null;
  /** pattern `^[A-Za-z0-9_-]{1,64}$` */
  conversation_id: string;
  user_ids: string[];
}

/** The `leave` command, published to {prefix}/users/{user}/commands/leave. Unknown fields are ignored. */
export interface LeaveCommand {
  /** maxLength 64 */
  request_id?: string | null;
  /** pattern `^[A-Za-z0-9_-]{1,64}$` */
  conversation_id: string;
}

/** The `mark-read` command, published to {prefix}/users/{user}/commands/mark-read. Unknown fields are ignored. Moves the sender's read marker forward; a seq above last_seq is taken as last_seq. */
export interface MarkReadCommand {
  /** maxLength 64 */
  request_id?: string | null;
  /** pattern `^[A-Za-z0-9_-]{1,64}$` */
  conversation_id: string;
  /** minimum 0; maximum 4611686018427388000 */
  seq: number;
}

/** The `react` command, published to {prefix}/users/{user}/commands/react. Unknown fields are ignored. Adds (`on` true) or removes the sender's reaction; asking for the current state changes nothing. */
export interface ReactCommand {
  /** maxLength 64 */
  request_id?: string | null;
  /** pattern `^[A-Za-z0-9_-]{1,64}$` */
  message_id: string;
  /** minLength 1; maxLength 16 */
  emoji: string;
  /** default true */
  on?: boolean;
}

/** The `remove-conversation` command, published to {prefix}/users/{user}/commands/remove-conversation. Unknown fields are ignored. */
export interface RemoveConversationCommand {
  /** maxLength 64 */
  request_id?: string | null;
  /** pattern `^[A-Za-z0-9_-]{1,64}$` */
  conversation_id: string;
}

/** The `reply` command, published to {prefix}/users/{user}/commands/reply. Unknown fields are ignored. */
export interface ReplyCommand {
  /** maxLength 64 */
  request_id?: string | null;
  /** pattern `^[A-Za-z0-9_-]{1,64}$` */
  message_id: string;
  /** minLength 1; maxLength 8000 */
  body: string;
  /** minLength 1; maxLength 64 */
  client_msg_id?: string | null;
}

/** The `search-messages` command, published to {prefix}/users/{user}/commands/search-messages. Unknown fields are ignored. Messages containing every word of the query, newest first, in the sender's conversations. */
export interface SearchMessagesCommand {
  /** maxLength 64 */
  request_id?: string | null;
  /** minLength 1; maxLength 200 */
  query: string;
  /** pattern `^[A-Za-z0-9_-]{1,64}$` */
  conversation_id?: string | null;
  /** minimum 1; maximum 100; default 20 */
  limit?: number;
  /**
   * (extension) the next page: only results older than this one (the last result of the previous page)
   * pattern `^[A-Za-z0-9_-]{1,64}$`
   */
  before_message_id?: string | null;
}

/** The `send-message` command, published to {prefix}/users/{user}/commands/send-message. Unknown fields are ignored. */
export interface SendMessageCommand {
  /** maxLength 64 */
  request_id?: string | null;
  /** pattern `^[A-Za-z0-9_-]{1,64}$` */
  conversation_id: string;
  /** minLength 1; maxLength 8000 */
  body: string;
  /** minLength 1; maxLength 64 */
  client_msg_id?: string | null;
}

/** The `typing` command, published to {prefix}/users/{user}/commands/typing. Unknown fields are ignored. Ephemeral: relayed at QoS 0 to the other participants, never stored, unanswered when it succeeds. */
export interface TypingCommand {
  /** maxLength 64 */
  request_id?: string | null;
  /** pattern `^[A-Za-z0-9_-]{1,64}$` */
  conversation_id: string;
  typing: boolean;
}

/** The `active-users` event, as published to inboxes and conversation topics. */
export interface ActiveUsersEvent {
  /** default "active-users" */
  type: "active-users";
  /** the answered command's request_id on the sender's copy; null on every other copy */
  request_id?: string | null;
  /** ISO 8601 in UTC with milliseconds, e.g. 2026-11-24T10:00:00.123Z */
  ts: string;
  /** unique per event (an answer and its broadcast copies share it); an event published again after a crash carries the same id, so clients drop ids they have seen */
  event_id: string;
  data: ActiveUsersData;
}

/** The `connected` event, as published to inboxes and conversation topics. */
export interface ConnectedEvent {
  /** default "connected" */
  type: "connected";
  /** the answered command's request_id on the sender's copy; null on every other copy */
  request_id?: string | null;
  /** ISO 8601 in UTC with milliseconds, e.g. 2026-11-24T10:00:00.123Z */
  ts: string;
  /** unique per event (an answer and its broadcast copies share it); an event published again after a crash carries the same id, so clients drop ids they have seen */
  event_id: string;
  data: ConnectedData;
}

/** The `conversation-created` event, as published to inboxes and conversation topics. */
export interface ConversationCreatedEvent {
  /** default "conversation-created" */
  type: "conversation-created";
  /** the answered command's request_id on the sender's copy; null on every other copy */
  request_id?: string | null;
  /** ISO 8601 in UTC with milliseconds, e.g. 2026-11-24T10:00:00.123Z */
  ts: string;
  /** unique per event (an answer and its broadcast copies share it); an event published again after a crash carries the same id, so clients drop ids they have seen */
  event_id: string;
  data: ConversationData;
}

/** The `conversation-removed` event, as published to inboxes and conversation topics. */
export interface ConversationRemovedEvent {
  /** default "conversation-removed" */
  type: "conversation-removed";
  /** the answered command's request_id on the sender's copy; null on every other copy */
  request_id?: string | null;
  /** ISO 8601 in UTC with milliseconds, e.g. 2026-11-24T10:00:00.123Z */
  ts: string;
  /** unique per event (an answer and its broadcast copies share it); an event published again after a crash carries the same id, so clients drop ids they have seen */
  event_id: string;
  data: ConversationIdData;
}

/** The `conversations` event, as published to inboxes and conversation topics. */
export interface ConversationsEvent {
  /** default "conversations" */
  type: "conversations";
  /** the answered command's request_id on the sender's copy; null on every other copy */
  request_id?: string | null;
  /** ISO 8601 in UTC with milliseconds, e.g. 2026-11-24T10:00:00.123Z */
  ts: string;
  /** unique per event (an answer and its broadcast copies share it); an event published again after a crash carries the same id, so clients drop ids they have seen */
  event_id: string;
  data: ConversationsData;
}

/** The `error` event, as published to inboxes and conversation topics. */
export interface ErrorEvent {
  /** default "error" */
  type: "error";
  /** the answered command's request_id on the sender's copy; null on every other copy */
  request_id?: string | null;
  /** ISO 8601 in UTC with milliseconds, e.g. 2026-11-24T10:00:00.123Z */
  ts: string;
  /** unique per event (an answer and its broadcast copies share it); an event published again after a crash carries the same id, so clients drop ids they have seen */
  event_id: string;
  data: ErrorData;
}

/** The `message-added` event, as published to inboxes and conversation topics. */
export interface MessageAddedEvent {
  /** default "message-added" */
  type: "message-added";
  /** the answered command's request_id on the sender's copy; null on every other copy */
  request_id?: string | null;
  /** ISO 8601 in UTC with milliseconds, e.g. 2026-11-24T10:00:00.123Z */
  ts: string;
  /** unique per event (an answer and its broadcast copies share it); an event published again after a crash carries the same id, so clients drop ids they have seen */
  event_id: string;
  data: MessageData;
}

/** The `message-deleted` event, as published to inboxes and conversation topics. */
export interface MessageDeletedEvent {
  /** default "message-deleted" */
  type: "message-deleted";
  /** the answered command's request_id on the sender's copy; null on every other copy */
  request_id?: string | null;
  /** ISO 8601 in UTC with milliseconds, e.g. 2026-11-24T10:00:00.123Z */
  ts: string;
  /** unique per event (an answer and its broadcast copies share it); an event published again after a crash carries the same id, so clients drop ids they have seen */
  event_id: string;
  data: MessageData;
}

/** The `message-edited` event, as published to inboxes and conversation topics. */
export interface MessageEditedEvent {
  /** default "message-edited" */
  type: "message-edited";
  /** the answered command's request_id on the sender's copy; null on every other copy */
  request_id?: string | null;
  /** ISO 8601 in UTC with milliseconds, e.g. 2026-11-24T10:00:00.123Z */
  ts: string;
  /** unique per event (an answer and its broadcast copies share it); an event published again after a crash carries the same id, so clients drop ids they have seen */
  event_id: string;
  data: MessageData;
}

/** The `messages` event, as published to inboxes and conversation topics. */
export interface MessagesEvent {
  /** default "messages" */
  type: "messages";
  /** the answered command's request_id on the sender's copy; null on every other copy */
  request_id?: string | null;
  /** ISO 8601 in UTC with milliseconds, e.g. 2026-11-24T10:00:00.123Z */
  ts: string;
  /** unique per event (an answer and its broadcast copies share it); an event published again after a crash carries the same id, so clients drop ids they have seen */
  event_id: string;
  data: MessagesData;
}

/** The `participant-left` event, as published to inboxes and conversation topics. */
export interface ParticipantLeftEvent {
  /** default "participant-left" */
  type: "participant-left";
  /** the answered command's request_id on the sender's copy; null on every other copy */
  request_id?: string | null;
  /** ISO 8601 in UTC with milliseconds, e.g. 2026-11-24T10:00:00.123Z */
  ts: string;
  /** unique per event (an answer and its broadcast copies share it); an event published again after a crash carries the same id, so clients drop ids they have seen */
  event_id: string;
  data: ParticipantLeftData;
}

/** The `participants-added` event, as published to inboxes and conversation topics. */
export interface ParticipantsAddedEvent {
  /** default "participants-added" */
  type: "participants-added";
  /** the answered command's request_id on the sender's copy; null on every other copy */
  request_id?: string | null;
  /** ISO 8601 in UTC with milliseconds, e.g. 2026-11-24T10:00:00.123Z */
  ts: string;
  /** unique per event (an answer and its broadcast copies share it); an event published again after a crash carries the same id, so clients drop ids they have seen */
  event_id: string;
  data: ParticipantsAddedData;
}

/** The `participants` event, as published to inboxes and conversation topics. */
export interface ParticipantsEvent {
  /** default "participants" */
  type: "participants";
  /** the answered command's request_id on the sender's copy; null on every other copy */
  request_id?: string | null;
  /** ISO 8601 in UTC with milliseconds, e.g. 2026-11-24T10:00:00.123Z */
  ts: string;
  /** unique per event (an answer and its broadcast copies share it); an event published again after a crash carries the same id, so clients drop ids they have seen */
  event_id: string;
  data: ParticipantsData;
}

/** The `reaction-changed` event, as published to inboxes and conversation topics. */
export interface ReactionChangedEvent {
  /** default "reaction-changed" */
  type: "reaction-changed";
  /** the answered command's request_id on the sender's copy; null on every other copy */
  request_id?: string | null;
  /** ISO 8601 in UTC with milliseconds, e.g. 2026-11-24T10:00:00.123Z */
  ts: string;
  /** unique per event (an answer and its broadcast copies share it); an event published again after a crash carries the same id, so clients drop ids they have seen */
  event_id: string;
  data: ReactionChangedData;
}

/** The `read-marker` event, as published to inboxes and conversation topics. */
export interface ReadMarkerEvent {
  /** default "read-marker" */
  type: "read-marker";
  /** the answered command's request_id on the sender's copy; null on every other copy */
  request_id?: string | null;
  /** ISO 8601 in UTC with milliseconds, e.g. 2026-11-24T10:00:00.123Z */
  ts: string;
  /** unique per event (an answer and its broadcast copies share it); an event published again after a crash carries the same id, so clients drop ids they have seen */
  event_id: string;
  data: ReadMarkerData;
}

/** The `search-results` event, as published to inboxes and conversation topics. */
export interface SearchResultsEvent {
  /** default "search-results" */
  type: "search-results";
  /** the answered command's request_id on the sender's copy; null on every other copy */
  request_id?: string | null;
  /** ISO 8601 in UTC with milliseconds, e.g. 2026-11-24T10:00:00.123Z */
  ts: string;
  /** unique per event (an answer and its broadcast copies share it); an event published again after a crash carries the same id, so clients drop ids they have seen */
  event_id: string;
  data: SearchResultsData;
}

/** The `typing` event, as published to inboxes and conversation topics. */
export interface TypingEvent {
  /** default "typing" */
  type: "typing";
  /** the answered command's request_id on the sender's copy; null on every other copy */
  request_id?: string | null;
  /** ISO 8601 in UTC with milliseconds, e.g. 2026-11-24T10:00:00.123Z */
  ts: string;
  /** unique per event (an answer and its broadcast copies share it); an event published again after a crash carries the same id, so clients drop ids they have seen */
  event_id: string;
  data: TypingData;
}

/** The `user-connected` event, as published to inboxes and conversation topics. */
export interface UserConnectedEvent {
  /** default "user-connected" */
  type: "user-connected";
  /** the answered command's request_id on the sender's copy; null on every other copy */
  request_id?: string | null;
  /** ISO 8601 in UTC with milliseconds, e.g. 2026-11-24T10:00:00.123Z */
  ts: string;
  /** unique per event (an answer and its broadcast copies share it); an event published again after a crash carries the same id, so clients drop ids they have seen */
  event_id: string;
  data: UserConnectedData;
}

/** The `user-disconnected` event, as published to inboxes and conversation topics. */
export interface UserDisconnectedEvent {
  /** default "user-disconnected" */
  type: "user-disconnected";
  /** the answered command's request_id on the sender's copy; null on every other copy */
  request_id?: string | null;
  /** ISO 8601 in UTC with milliseconds, e.g. 2026-11-24T10:00:00.123Z */
  ts: string;
  /** unique per event (an answer and its broadcast copies share it); an event published again after a crash carries the same id, so clients drop ids they have seen */
  event_id: string;
  data: UserDisconnectedData;
}

/** Retained on {prefix}/bridge/status; the bridge's will sets it offline. */
export interface BridgeStatus {
  status: "online" | "offline";
  epoch?: string | null;
  since?: string | null;
}

/** (1.1) On {prefix}/notifications/{user}, QoS 1, not retained: a message for a participant without an active session, for a push gateway the operator grants. */
export interface Notification {
  /** default "notification" */
  type: "notification";
  event_id: string;
  /** ISO 8601 in UTC with milliseconds, e.g. 2026-11-24T10:00:00.123Z */
  ts: string;
  data: NotificationData;
}

/** Retained on {prefix}/presence/{user}. */
export interface Presence {
  user_id: string;
  status: "online" | "offline";
  /** ISO 8601 in UTC with milliseconds, e.g. 2026-11-24T10:00:00.123Z */
  since: string;
}

/** Each command's fields, by command name. */
export interface CommandFields {
  "connect": ConnectCommand;
  "create-conversation": CreateConversationCommand;
  "delete-message": DeleteMessageCommand;
  "disconnect": DisconnectCommand;
  "edit-message": EditMessageCommand;
  "get-active-users": GetActiveUsersCommand;
  "get-conversations": GetConversationsCommand;
  "get-messages": GetMessagesCommand;
  "get-participants": GetParticipantsCommand;
  "get-prior-messages": GetPriorMessagesCommand;
  "invite": InviteCommand;
  "leave": LeaveCommand;
  "mark-read": MarkReadCommand;
  "react": ReactCommand;
  "remove-conversation": RemoveConversationCommand;
  "reply": ReplyCommand;
  "search-messages": SearchMessagesCommand;
  "send-message": SendMessageCommand;
  "typing": TypingCommand;
}

/** Each event's envelope, by event type. */
export interface EventEnvelopes {
  "active-users": ActiveUsersEvent;
  "connected": ConnectedEvent;
  "conversation-created": ConversationCreatedEvent;
  "conversation-removed": ConversationRemovedEvent;
  "conversations": ConversationsEvent;
  "error": ErrorEvent;
  "message-added": MessageAddedEvent;
  "message-deleted": MessageDeletedEvent;
  "message-edited": MessageEditedEvent;
  "messages": MessagesEvent;
  "participant-left": ParticipantLeftEvent;
  "participants-added": ParticipantsAddedEvent;
  "participants": ParticipantsEvent;
  "reaction-changed": ReactionChangedEvent;
  "read-marker": ReadMarkerEvent;
  "search-results": SearchResultsEvent;
  "typing": TypingEvent;
  "user-connected": UserConnectedEvent;
  "user-disconnected": UserDisconnectedEvent;
}

export const COMMAND_NAMES = ["connect","create-conversation","delete-message","disconnect","edit-message","get-active-users","get-conversations","get-messages","get-participants","get-prior-messages","invite","leave","mark-read","react","remove-conversation","reply","search-messages","send-message","typing"] as const;

export const EVENT_TYPES = ["active-users","connected","conversation-created","conversation-removed","conversations","error","message-added","message-deleted","message-edited","messages","participant-left","participants-added","participants","reaction-changed","read-marker","search-results","typing","user-connected","user-disconnected"] as const;

export const ERROR_CODES = ["bad-request","unknown-command","not-found","forbidden","payload-too-large","rate-limited","internal"] as const;
