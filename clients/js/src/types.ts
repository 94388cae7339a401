/** The SDK's public types: names for the generated protocol types, and the event the SDK delivers. */
import type {
  ActiveUsersData,
  BridgeStatus,
  ConnectedData,
  ConversationOut,
  ConversationsData,
  MessageOut,
  MessagesData,
  ParticipantLeftData,
  ParticipantsData,
  Presence,
  ReactionChangedData,
  ReadMarkerData,
  SearchResultsData,
  UserOut,
} from "./generated/protocol.js";

export type * from "./generated/protocol.js";

/** A user: `{user_id, display_name, active}`. */
export type User = UserOut;
/** A conversation object. */
export type Conversation = ConversationOut;
/** A stored message (a tombstone once deleted). */
export type Message = MessageOut;
/** The `connected` answer: who we are and what we take part in. */
export type Session = ConnectedData;
/** A `messages` answer: `{conversation_id, messages, has_more}`. */
export type Page = MessagesData;
export type ReadMarker = ReadMarkerData;
export type ReactionChange = ReactionChangedData;
export type SearchResults = SearchResultsData;
export type ConversationsPage = ConversationsData;
export type ParticipantsPage = ParticipantsData;
export type ActiveUsersPage = ActiveUsersData;
export type LeaveResult = ParticipantLeftData | { conversation_id: string };
export type { BridgeStatus, Presence };

/** The newest message (seq) and change (rev) seen in a conversation. */
export interface Cursor {
  seq: number;
  rev: number;
}

export type ClientState = "idle" | "connecting" | "online" | "reconnecting" | "closed";

/**
 * One event from the user's inbox, or one the SDK made. `type` is the protocol's event type or one
 * of the SDK's own: `bridge-status` (data: the retained status), `connection-lost` (the MQTT
 * connection dropped; the client reconnects by itself), `state` (data: `{state}`),
 * `message-updated` (catch-up found a message that was edited, deleted or reacted to while we were
 * away), `presence` (data: a retained presence/{user} payload, with the `presence` option).
 */
export interface ChatEvent {
  type: string;
  // eslint-disable-next-line @typescript-eslint/no-explicit-any
  data: Record<string, any>;
  /** The answered command's request_id on the answer to our own command, else null. */
  requestId: string | null;
  eventId: string | null;
  ts: string | null;
  /** True on events the SDK made from get-messages after a reconnect. */
  catchUp: boolean;
  /** `data.message`, where the event carries one. */
  message?: Message;
  /** `data.conversation`, where the event carries one. */
  conversation?: Conversation;
  /** The conversation the event is about, where it names one. */
  conversationId?: string;
}

export function makeEvent(
  type: string,
  data: Record<string, unknown>,
  extra: { requestId?: string | null; eventId?: string | null; ts?: string | null; catchUp?: boolean } = {},
): ChatEvent {
  const event: ChatEvent = {
    type,
    data,
    requestId: extra.requestId ?? null,
    eventId: extra.eventId ?? null,
    ts: extra.ts ?? null,
    catchUp: extra.catchUp ?? false,
  };
  const message = data.message;
  if (isObject(message)) event.message = message as unknown as Message;
  const conversation = data.conversation;
  if (isObject(conversation)) event.conversation = conversation as unknown as Conversation;
  for (const holder of [data, event.message, event.conversation]) {
    const cid = (holder as Record<string, unknown> | undefined)?.conversation_id;
    if (typeof cid === "string") {
      event.conversationId = cid;
      break;
    }
  }
  return event;
}

export function isObject(value: unknown): value is Record<string, unknown> {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}
