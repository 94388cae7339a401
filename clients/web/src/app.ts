// The chat screen: sidebar (conversations with unread counts, new conversations, who is online,
// search), the open conversation's messages (history paging, edits, deletions, reactions, read
// receipts, typing) and the composer. State lives in Store; this file renders it and sends commands.

import { byId, h, hue, initials, shortTime } from "./dom";
import { Store } from "./store";
import type { ChatApi, ChatEvent, Conversation, Message } from "./types";

/** A `typing: true` goes out at most this often while someone types (the others show it for 10 s). */
const TYPING_RESEND_MS = 4_000;
/** Without a keystroke for this long, `typing: false` goes out. */
const TYPING_IDLE_MS = 5_000;
const PAGE = 50;
const QUICK_EMOJI = ["👍", "❤️", "😂", "🎉", "😮"];

export interface ChatViewOptions {
  chat: ChatApi;
  onLogout: () => void;
  banner: (text: string | null, kind?: "warn" | "ok") => void;
}

export class ChatView {
  readonly store = new Store();
  private chat: ChatApi;
  private open: string | null = null;
  private editing: string | null = null;
  private rendered = new Map<string, { el: HTMLElement; sig: string }>();
  private renderQueued = false;
  private typingTimer: number | undefined;
  private typingExpiry: number | undefined;
  private typingSentAt = 0;
  private typingIn: string | null = null;
  private markSent = new Map<string, number>();
  private offs: Array<() => void> = [];
  private opts: ChatViewOptions;
  private loadingOlder = false;
  /** The browser said it went offline and nothing since has shown the connection alive. */
  private networkDown = false;
  /** The bridge announced itself offline (its `bridge-status`) and not back yet. */
  private bridgeDown = false;

  private el = {
    chat: byId("chat"),
    meName: byId("me-name"),
    meAvatar: byId("me-avatar"),
    convList: byId<HTMLUListElement>("conv-list"),
    onlineList: byId<HTMLUListElement>("online-list"),
    empty: byId("empty"),
    conversation: byId("conversation"),
    title: byId("conv-title"),
    sub: byId("conv-sub"),
    inviteToggle: byId<HTMLButtonElement>("invite-toggle"),
    inviteForm: byId<HTMLFormElement>("invite-form"),
    inviteUsers: byId<HTMLInputElement>("invite-users"),
    leave: byId<HTMLButtonElement>("leave"),
    scroller: byId("scroller"),
    loadOlder: byId<HTMLButtonElement>("load-older"),
    log: byId("log"),
    typing: byId("typing"),
    composer: byId<HTMLFormElement>("composer"),
    message: byId<HTMLTextAreaElement>("message"),
    searchForm: byId<HTMLFormElement>("search-form"),
    searchInput: byId<HTMLInputElement>("search-input"),
    searchResults: byId("search-results"),
    searchHeading: byId("search-heading"),
    searchList: byId<HTMLUListElement>("search-list"),
    searchClose: byId<HTMLButtonElement>("search-close"),
    directForm: byId<HTMLFormElement>("direct-form"),
    directUser: byId<HTMLInputElement>("direct-user"),
    groupForm: byId<HTMLFormElement>("group-form"),
    groupParticipants: byId<HTMLInputElement>("group-participants"),
    groupTitle: byId<HTMLInputElement>("group-title"),
    newConv: byId<HTMLDetailsElement>("new-conv"),
    logout: byId<HTMLButtonElement>("logout"),
    alert: byId("alert"),
  };

  constructor(opts: ChatViewOptions) {
    this.opts = opts;
    this.chat = opts.chat;
    this.offs.push(this.chat.on("*", (e) => this.onEvent(e)));
    this.bind();
  }

  /** After `connect()`: shows the chat screen for this session. */
  start(session: Parameters<Store["session"]>[0]): void {
    this.store.session(session);
    this.el.meName.textContent = this.store.name(this.store.me);
    this.paintAvatar(this.el.meAvatar, this.store.me);
    this.el.chat.hidden = false;
    this.completeLists(session.conversations_next ?? null, session.active_users_next ?? null);
    this.schedule();
    // The browser's offline/online events say nothing certain about the connection: a short drop
    // can leave the WebSocket open, so the SDK stays online and never says so again. Offline shows
    // the banner at once; online (or any traffic) shows what the SDK's state really is.
    const offline = (): void => {
      this.networkDown = true;
      this.opts.banner("Offline — reconnecting…");
    };
    const online = (): void => {
      this.networkDown = false;
      this.showState(this.chat.state);
    };
    window.addEventListener("offline", offline);
    window.addEventListener("online", online);
    this.offs.push(() => {
      window.removeEventListener("offline", offline);
      window.removeEventListener("online", online);
    });
  }

  destroy(): void {
    for (const off of this.offs) off();
    this.offs = [];
    window.clearTimeout(this.typingTimer);
    window.clearTimeout(this.typingExpiry);
    this.el.chat.hidden = true;
  }

  // --- events ---------------------------------------------------------------------------------------

  private onEvent(e: ChatEvent): void {
    if (e.type === "state") {
      this.onState(e.data?.state);
      return;
    }
    if (this.networkDown && this.chat.state === "online") {
      // traffic arrived: the connection is alive whatever the browser said
      this.networkDown = false;
      this.showState("online");
    }
    if (e.type === "bridge-status") {
      this.bridgeDown = e.data?.status === "offline";
      this.showState(this.chat.state);
      return;
    }
    const changed = this.store.apply(e);
    if (e.type === "connected") {
      const s = e.data;
      this.completeLists(s?.conversations_next ?? null, s?.active_users_next ?? null);
    }
    if ((e.type === "conversation-removed" || e.type === "participant-left") && this.open) {
      if (!this.store.conversations.has(this.open)) this.select(null);
    }
    if (e.type === "typing") this.armTypingExpiry();
    if (changed) this.schedule();
  }

  private onState(state: string | undefined): void {
    // while away, who is online (and the rest) may be stale: the sidebar says so by fading it
    this.el.chat.classList.toggle("offline", state === "reconnecting" || state === "connecting");
    if (state === "online") {
      this.networkDown = false;
      // the catch-up of messages is the SDK's; unread counts and the lists come fresh
      this.refreshLists();
    }
    this.showState(state);
  }

  /** The banner for the connection's state (and the bridge's, while online). */
  private showState(state: string | undefined): void {
    if (state === "online") {
      if (this.networkDown) this.opts.banner("Offline — reconnecting…");
      else if (this.bridgeDown) this.opts.banner("The bridge is offline — waiting for it to come back…");
      else this.opts.banner(null);
    } else if (state === "reconnecting") {
      this.opts.banner("Offline — reconnecting…");
    } else if (state === "connecting") {
      this.opts.banner("Connecting…");
    }
  }

  private async completeLists(conversationsNext: string | null, activeNext: string | null): Promise<void> {
    try {
      if (conversationsNext) this.store.setConversations(await this.chat.getConversations());
      if (activeNext) this.store.setActive(await this.chat.getActiveUsers());
      if (conversationsNext || activeNext) this.schedule();
    } catch (err) {
      this.fail(err);
    }
  }

  private async refreshLists(): Promise<void> {
    try {
      const [convs, users] = await Promise.all([this.chat.getConversations(), this.chat.getActiveUsers()]);
      this.store.setConversations(convs);
      this.store.setActive(users);
      if (this.open && !this.store.conversations.has(this.open)) this.select(null);
      this.schedule();
    } catch (err) {
      this.fail(err);
    }
  }

  // --- user actions -----------------------------------------------------------------------------------

  private bind(): void {
    const el = this.el;
    el.composer.addEventListener("submit", (ev) => {
      ev.preventDefault();
      void this.send();
    });
    el.message.addEventListener("keydown", (ev) => {
      if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
        ev.preventDefault();
        void this.send();
      }
    });
    el.message.addEventListener("input", () => {
      this.autosize();
      this.typed();
    });
    el.loadOlder.addEventListener("click", () => void this.loadOlder());
    el.inviteToggle.addEventListener("click", () => {
      el.inviteForm.hidden = !el.inviteForm.hidden;
      el.inviteToggle.setAttribute("aria-expanded", String(!el.inviteForm.hidden));
      if (!el.inviteForm.hidden) el.inviteUsers.focus();
    });
    el.inviteForm.addEventListener("submit", (ev) => {
      ev.preventDefault();
      void this.invite();
    });
    el.leave.addEventListener("click", () => void this.leave());
    el.directForm.addEventListener("submit", (ev) => {
      ev.preventDefault();
      void this.startDirect(el.directUser.value.trim());
    });
    el.groupForm.addEventListener("submit", (ev) => {
      ev.preventDefault();
      void this.createGroup();
    });
    el.searchForm.addEventListener("submit", (ev) => {
      ev.preventDefault();
      void this.search(el.searchInput.value.trim());
    });
    el.searchClose.addEventListener("click", () => this.closeSearch());
    el.logout.addEventListener("click", () => this.opts.onLogout());
    document.addEventListener("visibilitychange", () => this.markRead());
    this.el.log.addEventListener("keydown", (ev) => {
      if (ev.key === "Escape" && this.editing) {
        this.editing = null;
        this.schedule();
      }
    });
  }

  select(conversationId: string | null): void {
    if (this.open && this.open !== conversationId) this.stopTyping();
    this.open = conversationId;
    this.editing = null;
    this.el.inviteForm.hidden = true;
    this.el.inviteToggle.setAttribute("aria-expanded", "false");
    for (const { el } of this.rendered.values()) el.remove();
    this.rendered.clear();
    this.closeSearch(false);
    this.schedule(true);
    if (!conversationId) return;
    const state = this.store.conversations.get(conversationId);
    if (state && !state.loaded) void this.loadNewest(conversationId);
    else this.markRead();
    this.el.message.focus();
  }

  private async loadNewest(conversationId: string): Promise<void> {
    try {
      const page = await this.chat.getPriorMessages(conversationId, { limit: PAGE });
      this.store.putPage(conversationId, page.messages, page.has_more, true);
      if (this.open === conversationId) this.schedule(true);
      this.markRead();
    } catch (err) {
      this.fail(err);
    }
  }

  private async loadOlder(): Promise<void> {
    const cid = this.open;
    if (!cid || this.loadingOlder) return;
    const oldest = this.store.sorted(cid)[0];
    this.loadingOlder = true;
    this.el.loadOlder.disabled = true;
    try {
      const page = await this.chat.getPriorMessages(cid, { beforeSeq: oldest?.seq, limit: PAGE });
      const fromBottom = this.el.scroller.scrollHeight - this.el.scroller.scrollTop;
      this.store.putPage(cid, page.messages, page.has_more, true);
      if (this.open === cid) {
        this.renderNow();
        this.el.scroller.scrollTop = this.el.scroller.scrollHeight - fromBottom;
      }
    } catch (err) {
      this.fail(err);
    } finally {
      this.loadingOlder = false;
      this.el.loadOlder.disabled = false;
    }
  }

  private async send(): Promise<void> {
    const cid = this.open;
    const body = this.el.message.value;
    if (!cid || !body.trim()) return;
    const clientMsgId = `web-${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 10)}`;
    this.el.message.value = "";
    this.autosize();
    this.typingIn = null; // the message itself ends the others' indicator
    window.clearTimeout(this.typingTimer);
    try {
      const m = await this.chat.sendMessage(cid, body, { clientMsgId });
      if (this.store.putMessage(m)) this.schedule(true);
    } catch (err) {
      if (!this.el.message.value) this.el.message.value = body;
      this.fail(err);
    }
  }

  private typed(): void {
    const cid = this.open;
    if (!cid || this.store.conversations.get(cid)?.conv.kind === "global") return;
    window.clearTimeout(this.typingTimer);
    if (!this.el.message.value) {
      this.stopTyping();
      return;
    }
    const now = Date.now();
    if (this.typingIn !== cid || now - this.typingSentAt > TYPING_RESEND_MS) {
      this.typingIn = cid;
      this.typingSentAt = now;
      this.chat.typing(cid, true).catch(() => undefined); // best effort: typing is never stored
    }
    this.typingTimer = window.setTimeout(() => this.stopTyping(), TYPING_IDLE_MS);
  }

  private stopTyping(): void {
    window.clearTimeout(this.typingTimer);
    const cid = this.typingIn;
    this.typingIn = null;
    if (cid) this.chat.typing(cid, false).catch(() => undefined);
  }

  private markRead(): void {
    const cid = this.open;
    if (!cid || document.visibilityState !== "visible" || !this.el.searchResults.hidden) return;
    const state = this.store.conversations.get(cid);
    if (!state || !state.loaded) return;
    const last = state.conv.last_seq;
    if (last <= (state.conv.read_seq ?? 0) || last <= (this.markSent.get(cid) ?? 0)) return;
    this.markSent.set(cid, last);
    this.chat.markRead(cid, last).then(
      (marker) => {
        const seq = (marker as { read_seq?: number } | undefined)?.read_seq;
        if (typeof seq === "number") state.conv.read_seq = Math.max(state.conv.read_seq ?? 0, seq);
        this.schedule();
      },
      (err) => {
        this.markSent.delete(cid);
        this.fail(err);
      },
    );
  }

  private async invite(): Promise<void> {
    const cid = this.open;
    const ids = splitIds(this.el.inviteUsers.value);
    if (!cid || !ids.length) return;
    try {
      const added = await this.chat.invite(cid, ids);
      const state = this.store.conversations.get(cid);
      if (state) state.conv.participants = [...new Set([...state.conv.participants, ...added])];
      this.el.inviteUsers.value = "";
      this.el.inviteForm.hidden = true;
      this.el.inviteToggle.setAttribute("aria-expanded", "false");
      this.schedule();
    } catch (err) {
      this.fail(err);
    }
  }

  private async leave(): Promise<void> {
    const cid = this.open;
    if (!cid) return;
    try {
      await this.chat.leave(cid);
      this.store.conversations.delete(cid);
      this.select(null);
    } catch (err) {
      this.fail(err);
    }
  }

  async startDirect(userId: string): Promise<void> {
    if (!userId) return;
    try {
      const conv = await this.chat.createDirect(userId);
      this.store.addConversation(conv);
      this.el.directUser.value = "";
      this.el.newConv.open = false;
      this.select(conv.conversation_id);
    } catch (err) {
      this.fail(err);
    }
  }

  private async createGroup(): Promise<void> {
    const ids = splitIds(this.el.groupParticipants.value);
    if (!ids.length) return;
    try {
      const conv = await this.chat.createGroup(ids, this.el.groupTitle.value.trim() || undefined);
      this.store.addConversation(conv);
      this.el.groupParticipants.value = "";
      this.el.groupTitle.value = "";
      this.el.newConv.open = false;
      this.select(conv.conversation_id);
    } catch (err) {
      this.fail(err);
    }
  }

  private async search(query: string): Promise<void> {
    if (!query) return;
    try {
      const results = await this.chat.searchMessages(query, { limit: 50 });
      this.showResults(query, results.messages);
    } catch (err) {
      this.fail(err);
    }
  }

  private showResults(query: string, messages: Message[]): void {
    const el = this.el;
    el.searchHeading.textContent = `Search: “${query}” — ${messages.length} found`;
    el.searchList.replaceChildren(
      ...messages.map((m) =>
        h(
          "li",
          {},
          h(
            "button",
            { type: "button", class: "result", onclick: () => this.jumpTo(m) },
            h("span", { class: "result-where" }, this.store.title(m.conversation_id)),
            h("span", { class: "result-who" }, `${this.store.name(m.sender_id)} · ${shortTime(m.created_at)}`),
            h("span", { class: "result-body" }, m.body),
          ),
        ),
      ),
    );
    if (!messages.length) el.searchList.append(h("li", { class: "muted" }, "No messages found."));
    el.searchResults.hidden = false;
    el.conversation.hidden = true;
    el.empty.hidden = true;
  }

  private jumpTo(m: Message): void {
    if (!this.store.conversations.has(m.conversation_id)) return;
    this.store.putMessage(m);
    this.select(m.conversation_id);
    window.setTimeout(() => {
      const el = this.rendered.get(m.message_id)?.el;
      if (el) {
        el.scrollIntoView({ block: "center" });
        el.classList.add("flash");
        window.setTimeout(() => el.classList.remove("flash"), 1600);
      }
    }, 50);
  }

  private closeSearch(render = true): void {
    this.el.searchResults.hidden = true;
    if (render) {
      this.schedule();
      this.markRead();
    }
  }

  private async react(m: Message, emoji: string): Promise<void> {
    const on = !(m.reactions?.[emoji] ?? []).includes(this.store.me);
    try {
      const change = (await this.chat.react(m.message_id, emoji, on)) as { message?: Message } | undefined;
      if (change?.message && this.store.putMessage(change.message)) this.schedule();
    } catch (err) {
      this.fail(err);
    }
  }

  private async saveEdit(m: Message, body: string): Promise<void> {
    this.editing = null;
    if (body.trim() && body !== m.body) {
      try {
        const edited = await this.chat.editMessage(m.message_id, body);
        this.store.putMessage(edited);
      } catch (err) {
        this.fail(err);
      }
    }
    this.schedule();
    this.el.message.focus();
  }

  private async remove(m: Message): Promise<void> {
    try {
      const tombstone = await this.chat.deleteMessage(m.message_id);
      if (this.store.putMessage(tombstone)) this.schedule();
    } catch (err) {
      this.fail(err);
    }
  }

  private fail(err: unknown): void {
    const text = err instanceof Error ? err.message : String(err);
    const alert = this.el.alert;
    alert.textContent = text;
    alert.hidden = false;
    window.clearTimeout((alert as unknown as { timer?: number }).timer);
    (alert as unknown as { timer?: number }).timer = window.setTimeout(() => (alert.hidden = true), 6000);
  }

  // --- rendering ----------------------------------------------------------------------------------------

  schedule(toBottom = false): void {
    if (toBottom) this.stickBottom = true;
    if (this.renderQueued) return;
    this.renderQueued = true;
    window.setTimeout(() => this.renderNow(), 0);
  }

  private stickBottom = false;

  private renderNow(): void {
    this.renderQueued = false;
    this.renderSidebar();
    this.renderPane();
    this.markRead();
  }

  private renderSidebar(): void {
    const store = this.store;
    const items = [...store.conversations.values()].sort((a, b) => {
      if (a.conv.kind === "global") return -1;
      if (b.conv.kind === "global") return 1;
      return activity(b) - activity(a);
    });
    this.el.convList.replaceChildren(
      ...items.map(({ conv }) => {
        const cid = conv.conversation_id;
        const unread = store.unread(cid);
        const typers = store.typers(cid);
        const title = store.title(cid);
        const button = h(
          "button",
          {
            type: "button",
            class: "conv",
            "aria-current": cid === this.open ? "true" : null,
            onclick: () => this.select(cid),
          },
          this.avatar(conv.kind === "direct" ? otherOf(conv, store.me) : cid, title, conv.kind),
          h(
            "span",
            { class: "conv-text" },
            h("span", { class: "conv-name" }, title),
            h("span", { class: "conv-sub" }, typers.length ? "typing…" : kindLabel(conv)),
          ),
          unread > 0 && h("span", { class: "badge", "aria-label": `${unread} unread` }, String(unread)),
        );
        return h("li", {}, button);
      }),
    );
    const online = [...store.active].sort();
    this.el.onlineList.replaceChildren(
      ...online.map((u) =>
        h(
          "li",
          {},
          u === store.me
            ? h("span", { class: "person" }, h("span", { class: "dot", "aria-hidden": "true" }), `${store.name(u)} (you)`)
            : h(
                "button",
                { type: "button", class: "person", title: `Message ${store.name(u)}`, onclick: () => void this.startDirect(u) },
                h("span", { class: "dot", "aria-hidden": "true" }),
                store.name(u),
              ),
        ),
      ),
    );
  }

  private renderPane(): void {
    const el = this.el;
    const cid = this.open;
    const state = cid ? this.store.conversations.get(cid) : undefined;
    const searching = !el.searchResults.hidden;
    el.empty.hidden = Boolean(state) || searching;
    el.conversation.hidden = !state || searching;
    if (!state || !cid) {
      this.renderTyping([]);
      return;
    }
    const conv = state.conv;
    el.title.textContent = this.store.title(cid);
    el.sub.textContent = subtitle(conv, this.store);
    const isGroup = conv.kind === "group";
    el.inviteToggle.hidden = !isGroup;
    el.leave.hidden = !isGroup;

    const scroller = el.scroller;
    const atBottom = scroller.scrollHeight - scroller.scrollTop - scroller.clientHeight < 48;
    el.loadOlder.hidden = !state.hasOlder;

    const messages = this.store.sorted(cid);
    const seen = this.seenMarks(cid, messages);
    const keep = new Set(messages.map((m) => m.message_id));
    for (const [id, { el: node }] of this.rendered) {
      if (!keep.has(id)) {
        node.remove();
        this.rendered.delete(id);
      }
    }
    let previous: Element | null = null;
    for (const m of messages) {
      const seenText = seen.get(m.message_id) ?? "";
      const sig = `${m.rev ?? 0}|${m.body.length}|${seenText}|${this.editing === m.message_id}|${JSON.stringify(m.reactions ?? {})}`;
      let entry = this.rendered.get(m.message_id);
      if (!entry || entry.sig !== sig) {
        const node = this.messageEl(m, seenText);
        if (entry) entry.el.replaceWith(node);
        entry = { el: node, sig };
        this.rendered.set(m.message_id, entry);
      }
      const expected: Element | null = previous ? previous.nextElementSibling : el.log.firstElementChild;
      if (expected !== entry.el) {
        if (previous) previous.after(entry.el);
        else el.log.prepend(entry.el);
      }
      previous = entry.el;
    }
    if (!messages.length && state.loaded) {
      if (!el.log.querySelector(".log-empty")) el.log.append(h("p", { class: "log-empty muted" }, "No messages yet. Say hello!"));
    } else {
      el.log.querySelector(".log-empty")?.remove();
    }
    if (this.stickBottom || atBottom) scroller.scrollTop = scroller.scrollHeight;
    this.stickBottom = false;
    this.renderTyping(this.store.typers(cid));
    const focusEdit = el.log.querySelector<HTMLInputElement>("input.edit-input");
    if (focusEdit && document.activeElement !== focusEdit) focusEdit.focus();
  }

  private renderTyping(typers: string[]): void {
    const names = typers.map((u) => this.store.name(u));
    let text = "";
    if (names.length === 1) text = `${names[0]} is typing…`;
    else if (names.length === 2) text = `${names[0]} and ${names[1]} are typing…`;
    else if (names.length > 2) text = `${names.length} people are typing…`;
    if (this.el.typing.textContent !== text) this.el.typing.textContent = text;
  }

  private armTypingExpiry(): void {
    window.clearTimeout(this.typingExpiry);
    const next = this.store.nextTypingExpiry();
    if (next === null) return;
    this.typingExpiry = window.setTimeout(() => {
      this.schedule();
      this.armTypingExpiry();
    }, Math.max(50, next - Date.now() + 20));
  }

  /** "Seen by bob" under the newest of my messages each other participant has read. */
  private seenMarks(cid: string, messages: Message[]): Map<string, string> {
    const state = this.store.conversations.get(cid);
    const out = new Map<string, string>();
    if (!state) return out;
    const mine = messages.filter((m) => m.sender_id === this.store.me && !m.deleted_at);
    const byMessage = new Map<string, string[]>();
    for (const [reader, readSeq] of state.readers) {
      let best: Message | undefined;
      for (const m of mine) if (m.seq <= readSeq) best = m;
      if (best) byMessage.set(best.message_id, [...(byMessage.get(best.message_id) ?? []), this.store.name(reader)]);
    }
    for (const [id, names] of byMessage) out.set(id, `Seen by ${names.sort().join(", ")}`);
    return out;
  }

  private messageEl(m: Message, seenText: string): HTMLElement {
    const store = this.store;
    const mine = m.sender_id === store.me;
    const deleted = Boolean(m.deleted_at);
    const sender = store.name(m.sender_id);
    const meta = h(
      "div",
      { class: "meta" },
      h("span", { class: "sender" }, mine ? "You" : sender),
      h("time", { datetime: m.created_at, title: new Date(m.created_at).toLocaleString() }, shortTime(m.created_at)),
      m.edited_at && !deleted ? h("span", { class: "edited" }, "(edited)") : null,
    );
    let body: HTMLElement;
    if (deleted) {
      body = h("div", { class: "body deleted" }, "This message was deleted");
    } else if (this.editing === m.message_id) {
      const input = h("input", {
        class: "edit-input",
        value: m.body,
        "aria-label": "Edit message",
        maxlength: 8000,
      }) as HTMLInputElement;
      input.value = m.body;
      body = h(
        "form",
        {
          class: "edit",
          onsubmit: (ev: Event) => {
            ev.preventDefault();
            void this.saveEdit(m, input.value);
          },
        },
        input,
        h("button", { type: "submit" }, "Save"),
        h("button", { type: "button", onclick: () => { this.editing = null; this.schedule(); } }, "Cancel"),
      );
    } else {
      body = h("div", { class: "body" }, m.body);
    }
    const reactions = Object.entries(m.reactions ?? {});
    const chips = reactions.length
      ? h(
          "div",
          { class: "reactions" },
          ...reactions.map(([emoji, users]) =>
            h(
              "button",
              {
                type: "button",
                class: "chip",
                "aria-pressed": String(users.includes(store.me)),
                "aria-label": `${emoji} ${users.length}: ${users.map((u) => store.name(u)).join(", ")}`,
                title: users.map((u) => store.name(u)).join(", "),
                onclick: () => void this.react(m, emoji),
              },
              `${emoji} ${users.length}`,
            ),
          ),
        )
      : null;
    const tools = deleted
      ? null
      : h(
          "div",
          { class: "tools", role: "group", "aria-label": "Message actions" },
          ...QUICK_EMOJI.map((emoji) =>
            h("button", { type: "button", class: "tool", "aria-label": `React ${emoji}`, title: `React ${emoji}`, onclick: () => void this.react(m, emoji) }, emoji),
          ),
          mine &&
            h("button", { type: "button", class: "tool text", onclick: () => { this.editing = m.message_id; this.schedule(); } }, "Edit"),
          (mine || this.canModerate(m)) &&
            h("button", { type: "button", class: "tool text", onclick: () => void this.remove(m) }, "Delete"),
        );
    const node = h(
      "article",
      {
        class: `msg${mine ? " mine" : ""}${deleted ? " is-deleted" : ""}`,
        "data-id": m.message_id,
        "data-seq": m.seq,
        "aria-label": `${mine ? "You" : sender}: ${deleted ? "deleted message" : m.body}`,
      },
      mine ? null : this.avatar(m.sender_id, sender, "direct"),
      h("div", { class: "bubble-wrap" }, meta, h("div", { class: "bubble" }, body), chips, seenText && h("div", { class: "seen" }, seenText)),
      tools,
    );
    return node;
  }

  private canModerate(m: Message): boolean {
    const conv = this.store.conversations.get(m.conversation_id)?.conv;
    if (!conv) return false;
    if (conv.kind === "group") return conv.owner_id === this.store.me;
    if (conv.kind === "thread" && conv.parent_conversation_id) {
      const parent = this.store.conversations.get(conv.parent_conversation_id)?.conv;
      return parent?.kind === "group" && parent.owner_id === this.store.me;
    }
    return false;
  }

  private avatar(id: string, name: string, kind: string): HTMLElement {
    const el = h("span", { class: `avatar${kind === "global" ? " global" : ""}`, "aria-hidden": "true" }, kind === "global" ? "#" : initials(name));
    el.style.setProperty("--hue", String(hue(id)));
    return el;
  }

  private paintAvatar(el: HTMLElement, id: string): void {
    el.textContent = initials(this.store.name(id));
    el.style.setProperty("--hue", String(hue(id)));
  }

  private autosize(): void {
    const box = this.el.message;
    box.style.height = "auto";
    box.style.height = `${Math.min(box.scrollHeight, 160)}px`;
  }
}

function splitIds(text: string): string[] {
  return [...new Set(text.split(/[\s,]+/).filter(Boolean))];
}

function otherOf(conv: Conversation, me: string): string {
  return conv.participants.find((p) => p !== me) ?? me;
}

function kindLabel(conv: Conversation): string {
  switch (conv.kind) {
    case "global":
      return "everyone";
    case "direct":
      return "direct";
    case "group":
      return `group · ${conv.participants.length} people`;
    default:
      return "thread";
  }
}

function subtitle(conv: Conversation, store: Store): string {
  if (conv.kind === "global") return "Everyone who uses this bridge";
  const people = conv.participants.map((u) => {
    const name = u === store.me ? "you" : store.name(u);
    return store.active.has(u) && u !== store.me ? `${name} (online)` : name;
  });
  return people.join(", ");
}

function activity(state: { conv: Conversation; messages: Map<string, Message> }): number {
  let t = Date.parse(state.conv.created_at) || 0;
  for (const m of state.messages.values()) t = Math.max(t, Date.parse(m.created_at) || 0);
  return t;
}
