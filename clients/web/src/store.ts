// The page's state, changed only by the protocol's events and answers (no DOM here): conversations with
// their unread counts, the messages held per conversation (one entry per message_id, the highest rev
// wins, so duplicates and catch-up never show a message twice), read markers, typing and presence.

import type { ChatEvent, Conversation, Message, Session, User } from "./types";

/** How long someone shows as typing without a new `typing: true` (docs/protocol.md). */
export const TYPING_SHOWN_MS = 10_000;

export interface ConversationState {
  conv: Conversation;
  messages: Map<string, Message>;
  /** the newest page was fetched; older ones come with "Load older" */
  loaded: boolean;
  /** more history lies before the oldest message held */
  hasOlder: boolean;
  /** other participants' read markers, from read-marker events */
  readers: Map<string, number>;
  /** user id -> time (ms) until which they show as typing */
  typing: Map<string, number>;
}

export class Store {
  me = "";
  conversations = new Map<string, ConversationState>();
  users = new Map<string, User>();
  active = new Set<string>();
  private now: () => number;

  constructor(now: () => number = Date.now) {
    this.now = now;
  }

  /** A `connected` answer (first or after a reconnect): the list is replaced, held messages kept. */
  session(s: Session): void {
    this.me = s.user.user_id;
    this.rememberUser(s.user);
    this.setConversations(s.conversations);
    this.active = new Set(s.active_users.map((u) => u.user_id));
    for (const u of s.active_users) this.rememberUser(u);
    this.active.add(this.me);
  }

  setConversations(list: Conversation[]): void {
    const next = new Map<string, ConversationState>();
    for (const conv of list) {
      const held = this.conversations.get(conv.conversation_id);
      next.set(conv.conversation_id, held ? this.refresh(held, conv) : this.fresh(conv));
    }
    this.conversations = next;
  }

  setActive(users: User[]): void {
    this.active = new Set(users.map((u) => u.user_id));
    for (const u of users) this.rememberUser(u);
    if (this.me) this.active.add(this.me);
  }

  private fresh(conv: Conversation): ConversationState {
    return {
      conv: { ...conv, read_seq: conv.read_seq ?? 0 },
      messages: new Map(),
      loaded: false,
      hasOlder: conv.last_seq > 0,
      readers: new Map(),
      typing: new Map(),
    };
  }

  private refresh(held: ConversationState, conv: Conversation): ConversationState {
    const readSeq = Math.max(held.conv.read_seq ?? 0, conv.read_seq ?? 0);
    const lastSeq = Math.max(held.conv.last_seq, conv.last_seq);
    held.conv = { ...conv, read_seq: readSeq, last_seq: lastSeq };
    return held;
  }

  private rememberUser(u: User | undefined): void {
    if (u?.user_id) this.users.set(u.user_id, { ...this.users.get(u.user_id), ...u });
  }

  addConversation(conv: Conversation): ConversationState {
    const held = this.conversations.get(conv.conversation_id);
    const state = held ? this.refresh(held, conv) : this.fresh(conv);
    this.conversations.set(conv.conversation_id, state);
    return state;
  }

  /** Adds or updates a message; false when what we hold is as new (a duplicate). */
  putMessage(m: Message): boolean {
    const state = this.conversations.get(m.conversation_id);
    if (!state) return false;
    const held = state.messages.get(m.message_id);
    if (held && (held.rev ?? 0) >= (m.rev ?? 0)) return false;
    state.messages.set(m.message_id, m);
    if (m.seq > state.conv.last_seq) state.conv.last_seq = m.seq;
    if ((m.rev ?? 0) > (state.conv.last_rev ?? 0)) state.conv.last_rev = m.rev;
    if (m.sender_id === this.me) {
      // sending moves the sender's own marker to the message (docs/protocol.md, read markers)
      state.conv.read_seq = Math.max(state.conv.read_seq ?? 0, m.seq);
    }
    if (!held) state.typing.delete(m.sender_id);
    return true;
  }

  /** A page of history: merged, and "Load older" stays while more lies before it. */
  putPage(conversationId: string, messages: Message[], hasMore: boolean, prior: boolean): void {
    const state = this.conversations.get(conversationId);
    if (!state) return;
    for (const m of messages) this.putMessage(m);
    if (prior) {
      state.loaded = true;
      const oldest = this.sorted(conversationId)[0];
      state.hasOlder = hasMore && (oldest === undefined || oldest.seq > 1);
    }
  }

  sorted(conversationId: string): Message[] {
    const state = this.conversations.get(conversationId);
    if (!state) return [];
    return [...state.messages.values()].sort((a, b) => a.seq - b.seq);
  }

  unread(conversationId: string): number {
    const state = this.conversations.get(conversationId);
    if (!state) return 0;
    return Math.max(0, state.conv.last_seq - (state.conv.read_seq ?? 0));
  }

  /** The users (other than me) typing in a conversation now. */
  typers(conversationId: string): string[] {
    const state = this.conversations.get(conversationId);
    if (!state) return [];
    const now = this.now();
    const out: string[] = [];
    for (const [user, until] of state.typing) {
      if (until > now) out.push(user);
      else state.typing.delete(user);
    }
    return out.sort();
  }

  /** The time (ms) the next typing indicator runs out, or null. */
  nextTypingExpiry(): number | null {
    let next: number | null = null;
    for (const state of this.conversations.values()) {
      for (const until of state.typing.values()) if (next === null || until < next) next = until;
    }
    return next;
  }

  /** Who has read up to a message of mine (the others' read markers at or past it). */
  seenBy(conversationId: string, seq: number): string[] {
    const state = this.conversations.get(conversationId);
    if (!state) return [];
    return [...state.readers].filter(([, readSeq]) => readSeq >= seq).map(([u]) => u).sort();
  }

  name(userId: string): string {
    return this.users.get(userId)?.display_name || userId;
  }

  title(conversationId: string): string {
    const state = this.conversations.get(conversationId);
    if (!state) return conversationId;
    const c = state.conv;
    if (c.kind === "global") return "global";
    if (c.title) return c.title;
    if (c.kind === "thread") {
      const parent = c.parent_conversation_id && this.conversations.get(c.parent_conversation_id);
      return parent ? `Thread in ${this.title(parent.conv.conversation_id)}` : "Thread";
    }
    const others = c.participants.filter((p) => p !== this.me);
    return others.length ? others.map((u) => this.name(u)).join(", ") : this.name(this.me);
  }

  /** Applies one event; returns the conversation it concerns ("" for none, "*" for the list). */
  apply(e: ChatEvent): string {
    const d = e.data ?? {};
    switch (e.type) {
      case "connected":
        this.session(d as Session);
        return "*";
      case "conversation-created":
        this.addConversation(d.conversation as Conversation);
        return "*";
      case "conversations":
        // an answer to get-conversations: the caller replaces the list with every page
        return "";
      case "participants-added": {
        const state = this.conversations.get(d.conversation_id);
        if (!state) return "";
        const set = new Set(state.conv.participants);
        for (const u of d.user_ids as string[]) set.add(u);
        state.conv.participants = [...set];
        return d.conversation_id;
      }
      case "participant-left": {
        const state = this.conversations.get(d.conversation_id);
        if (!state) return "";
        if (d.user_id === this.me) {
          this.conversations.delete(d.conversation_id);
          return "*";
        }
        state.conv.participants = state.conv.participants.filter((u) => u !== d.user_id);
        state.readers.delete(d.user_id);
        return d.conversation_id;
      }
      case "conversation-removed":
        this.conversations.delete(d.conversation_id);
        return "*";
      case "message-added":
      case "message-edited":
      case "message-deleted":
      case "message-updated":
      case "reaction-changed": {
        const m = (e.message ?? d.message) as Message | undefined;
        if (!m) return "";
        return this.putMessage(m) ? m.conversation_id : "";
      }
      case "read-marker": {
        const state = this.conversations.get(d.conversation_id);
        if (!state) return "";
        if (d.user_id === this.me) {
          state.conv.read_seq = Math.max(state.conv.read_seq ?? 0, d.read_seq);
        } else {
          state.readers.set(d.user_id, Math.max(state.readers.get(d.user_id) ?? 0, d.read_seq));
        }
        return d.conversation_id;
      }
      case "typing": {
        const state = this.conversations.get(d.conversation_id);
        if (!state || d.user_id === this.me) return "";
        if (d.typing) state.typing.set(d.user_id, this.now() + TYPING_SHOWN_MS);
        else state.typing.delete(d.user_id);
        return d.conversation_id;
      }
      case "user-connected":
        this.rememberUser(d.user as User);
        this.active.add((d.user as User).user_id);
        return "*";
      case "user-disconnected":
        if (d.user_id !== this.me) this.active.delete(d.user_id);
        return "*";
      default:
        return "";
    }
  }
}
