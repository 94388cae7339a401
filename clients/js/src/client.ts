/**
 * A chat user's connection to the bridge over MQTT.js, in Node and in browsers.
 *
 * The session rules are those of the Python SDK (chat_bridge/_session.py): a new session_id and a
 * last will naming it for every MQTT connection (MQTT.js reconnects by itself and would otherwise
 * reuse the first will), subscribe inbox + bridge/status, then `connect`; `connect` again when the
 * retained status shows a new epoch; answers matched by request_id; duplicates dropped by event_id;
 * after a reconnect, what changed meanwhile fetched with get-messages and delivered as events.
 */
// the default import: MQTT.js's browser build (what bundlers pick for browsers) exports nothing else
import mqtt from "mqtt";
import type { IClientOptions, IClientPublishOptions, MqttClient } from "mqtt";

import { ConnectionFailed, InternalError, RateLimited, RequestTimeout, errorFrom } from "./errors.js";
import type { CommandFields } from "./generated/protocol.js";
import {
  type ChatEvent,
  type ClientState,
  type Conversation,
  type Cursor,
  type LeaveResult,
  type Message,
  type Page,
  type ReactionChange,
  type ReadMarker,
  type SearchResults,
  type Session,
  type User,
  isObject,
  makeEvent,
} from "./types.js";

export const USER_ID = /^[A-Za-z0-9_-]{1,64}$/;
export const DEVICE = /^[A-Za-z0-9_.-]{1,64}$/;
const DEDUP_WINDOW = 4096;
const CATCH_UP_PAGE = 500;
/** Seconds; a `rate-limited` catch-up page is asked again after its retryAfter, at most this long. */
const CATCH_UP_LONGEST_WAIT = 30;
const CATCH_UP_INTERNAL_RETRIES = 5;
const BACKLOG = 1000; // events kept for waitFor()
// CONNACK return codes after which retrying cannot help: bad protocol, client id, credentials, not authorised
const REFUSED: Record<number, string> = {
  1: "unacceptable protocol version",
  2: "client id not allowed",
  4: "bad user name or password",
  5: "not authorized",
};

export interface ChatClientOptions {
  /** The user id (1-64 of A-Z a-z 0-9 _ -). */
  user: string;
  /** The broker: mqtt://, mqtts:// (Node), ws://, wss:// (with the path, e.g. ws://host:9001/mqtt). */
  url: string;
  /** Credentials where the broker has accounts; the username defaults to the user id. */
  password?: string;
  username?: string;
  /** A device name: client id `{user}:{device}` with a persistent session (clean=false). */
  device?: string;
  /** The topic prefix (default "chat/v1"). */
  prefix?: string;
  /** Sent with `connect`. */
  displayName?: string;
  /** Milliseconds to wait for an answer, and for `connect()` (default 10000). */
  timeout?: number;
  /** Fetch what was missed after a reconnect (default true). */
  catchUp?: boolean;
  /** MQTT keepalive in seconds (default 30). */
  keepalive?: number;
  /** Milliseconds between reconnect attempts (default 1000). */
  reconnectPeriod?: number;
  /** Also subscribe to the retained {prefix}/presence/+ topics and deliver them as `presence` events. */
  presence?: boolean;
  /** Passed to MQTT.js as they are (TLS `ca`, `rejectUnauthorized`, `wsOptions`, ...). */
  mqttOptions?: Partial<IClientOptions>;
}

export type Handler = (event: ChatEvent) => void | Promise<void>;

interface Pending {
  command: string;
  internal: boolean;
  resolve: (event: ChatEvent) => void;
  reject: (error: Error) => void;
}

interface Waiter {
  type: string;
  match: ((event: ChatEvent) => boolean) | undefined;
  resolve: (event: ChatEvent) => void;
  reject: (error: Error) => void;
}

function randomHex(bytes: number): string {
  const buf = new Uint8Array(bytes);
  globalThis.crypto.getRandomValues(buf);
  return Array.from(buf, (b) => b.toString(16).padStart(2, "0")).join("");
}

/** `{user}:{device}` for a persistent session, `{user}:{random}` for an ephemeral one. */
export function clientIdFor(user: string, device?: string): string {
  if (!USER_ID.test(user) || user === "chat-bridge") {
    throw new TypeError(`a user id is 1-64 of A-Z a-z 0-9 _ - (and not chat-bridge), not ${JSON.stringify(user)}`);
  }
  if (device !== undefined && !DEVICE.test(device)) {
    throw new TypeError(`a device name is 1-64 of A-Z a-z 0-9 _ . -, not ${JSON.stringify(device)}`);
  }
  return `${user}:${device ?? randomHex(6)}`;
}

export class ChatClient {
  readonly user: string;
  readonly clientId: string;
  /** Per conversation, the newest seq and rev seen. */
  readonly cursors = new Map<string, Cursor>();
  /** The current MQTT connection's session id (a new one for every connection). */
  sessionId = "";
  /** The bridge's epoch from the retained status (null before it arrived). */
  epoch: string | null = null;
  /** The latest `connected` answer. */
  session: Session | null = null;
  /** MQTT connections made so far. */
  connections = 0;
  /** The MQTT.js client underneath (null before connect()). */
  mqtt: MqttClient | null = null;

  private readonly options: Required<Omit<ChatClientOptions, "password" | "username" | "device" | "displayName" | "mqttOptions">> &
    ChatClientOptions;
  private readonly commandTopic: string;
  private readonly inboxTopic: string;
  private readonly statusTopic: string;
  private readonly presenceTopic: string;
  private _state: ClientState = "idle";
  private readonly pending = new Map<string, Pending>();
  private readonly seen = new Set<string>();
  private readonly revs = new Map<string, number>(); // message_id -> newest rev delivered
  private readonly onClosed = new Set<() => void>(); // wakes a catch-up waiting out a refusal
  private snapshot: Map<string, Cursor> | null = null;
  private readonly ridPrefix = randomHex(3);
  private counter = 0;
  private readonly handlers = new Map<string, Set<Handler>>();
  private readonly backlog: ChatEvent[] = [];
  private readonly waiters = new Set<Waiter>();
  private readonly streams = new Set<{ push: (e: ChatEvent | null) => void }>();
  private firstConnect: { resolve: (s: Session) => void; reject: (e: Error) => void } | null = null;
  private lastError: string | null = null;

  constructor(options: ChatClientOptions) {
    this.options = {
      prefix: "chat/v1",
      timeout: 10_000,
      catchUp: true,
      keepalive: 30,
      reconnectPeriod: 1000,
      presence: false,
      ...options,
    };
    this.user = options.user;
    this.clientId = clientIdFor(options.user, options.device);
    const base = `${this.options.prefix}/users/${this.user}`;
    this.commandTopic = `${base}/commands/`;
    this.inboxTopic = `${base}/inbox`;
    this.statusTopic = `${this.options.prefix}/bridge/status`;
    this.presenceTopic = `${this.options.prefix}/presence/+`;
  }

  get state(): ClientState {
    return this._state;
  }

  // -- life cycle ---------------------------------------------------------------------------------

  /** Connects, and resolves with the bridge's answer to our `connect`; rejects with ConnectionFailed. */
  connect(): Promise<Session> {
    if (this._state !== "idle") return Promise.reject(new ConnectionFailed(`${this.user}: connect() was already called`));
    this.setState("connecting");
    const timeout = this.options.timeout;
    return new Promise<Session>((resolve, reject) => {
      const timer = setTimeout(() => {
        const reason = this.lastError ?? `no answer to connect within ${timeout} ms`;
        this.fail(new ConnectionFailed(`${this.user}@${this.options.url}: ${reason}`));
      }, timeout);
      this.firstConnect = {
        resolve: (s) => {
          clearTimeout(timer);
          resolve(s);
        },
        reject: (e) => {
          clearTimeout(timer);
          reject(e);
        },
      };
      this.sessionId = randomHex(8);
      const opts: IClientOptions = {
        protocolVersion: 4,
        clientId: this.clientId,
        clean: this.options.device === undefined,
        keepalive: this.options.keepalive,
        reconnectPeriod: this.options.reconnectPeriod,
        connectTimeout: timeout,
        resubscribe: false, // subscribed again on every connection, below
        will: this.will(),
        ...this.options.mqttOptions,
      };
      if (this.options.password !== undefined || this.options.username !== undefined) {
        opts.username = this.options.username ?? this.user;
        if (this.options.password !== undefined) opts.password = this.options.password;
      }
      let client: MqttClient;
      try {
        client = mqtt.connect(this.options.url, opts);
      } catch (err) {
        this.fail(new ConnectionFailed(`${this.user}@${this.options.url}: ${(err as Error).message}`));
        return;
      }
      this.mqtt = client;
      // MQTT.js sends options.will with every CONNECT: a new session and a will naming it, before each
      // reconnect, so that a will left over from an older connection cannot end the new one
      client.on("reconnect", () => {
        this.sessionId = randomHex(8);
        client.options.will = this.will();
      });
      client.on("connect", (connack) => this.onConnect(connack.sessionPresent));
      client.on("message", (topic, payload) => this.onMessage(topic, payload));
      client.on("close", () => this.onClose());
      client.on("error", (err: Error & { code?: number | string }) => this.onError(err));
    });
  }

  /** Says goodbye (`disconnect`, so no will is needed) and closes the connection. */
  async close(): Promise<void> {
    if (this._state === "closed") return;
    const online = this._state === "online";
    this.setState("closed");
    for (const wake of this.onClosed) wake();
    this.onClosed.clear();
    const client = this.mqtt;
    if (client !== null) {
      if (online && client.connected) {
        await Promise.race([
          this.publish("disconnect", { session_id: this.sessionId, reason: "client" }).catch(() => undefined),
          delay(2000),
        ]);
      }
      await new Promise<void>((resolve) => client.end(false, {}, () => resolve()));
    }
    this.shutdown(new ConnectionFailed(`${this.user}: the client was closed`));
  }

  private will(): NonNullable<IClientOptions["will"]> {
    return {
      topic: this.commandTopic + "disconnect",
      payload: JSON.stringify({ session_id: this.sessionId, reason: "lost" }),
      qos: 1,
      retain: false,
    };
  }

  private fail(error: ConnectionFailed): void {
    const first = this.firstConnect;
    this.firstConnect = null;
    this.setState("closed");
    this.mqtt?.end(true);
    this.shutdown(error);
    first?.reject(error);
  }

  private shutdown(error: Error): void {
    for (const [rid, p] of this.pending) {
      this.pending.delete(rid);
      p.reject(error);
    }
    for (const w of this.waiters) w.reject(error);
    this.waiters.clear();
    for (const s of this.streams) s.push(null);
    this.streams.clear();
  }

  private setState(state: ClientState): void {
    if (this._state === state) return;
    this._state = state;
    this.deliver(makeEvent("state", { state }));
  }

  // -- MQTT.js events -------------------------------------------------------------------------------

  private onConnect(_sessionPresent: boolean): void {
    if (this._state === "closed") return;
    this.connections += 1;
    this.lastError = null;
    if (this.connections > 1) {
      // what we had seen when the last connection ended: catch-up fetches everything after it
      this.snapshot = new Map([...this.cursors].map(([cid, c]) => [cid, { seq: c.seq, rev: c.rev }]));
    }
    const client = this.mqtt!;
    const topics: Record<string, { qos: 0 | 1 }> = { [this.inboxTopic]: { qos: 1 }, [this.statusTopic]: { qos: 1 } };
    if (this.options.presence) topics[this.presenceTopic] = { qos: 1 };
    const sessionId = this.sessionId;
    client.subscribe(topics, (err, granted) => {
      if (err || granted?.some((g) => g.qos === 128)) {
        this.lastError = `the broker refused the subscriptions: ${err?.message ?? "not authorized"}`;
        return;
      }
      if (sessionId === this.sessionId) this.announce();
    });
  }

  private onClose(): void {
    if (this._state === "closed") return;
    if (this.connections === 0) {
      this.lastError ??= "the broker cannot be reached (connection closed)";
      return;
    }
    if (this._state === "online" || this._state === "connecting") {
      this.setState("reconnecting");
      this.deliver(makeEvent("connection-lost", { reason: this.lastError ?? "connection closed" }));
    }
  }

  private onError(err: Error & { code?: number | string }): void {
    const refusal = typeof err.code === "number" ? REFUSED[err.code] : undefined;
    if (refusal !== undefined) {
      // retrying cannot help: fail the pending connect(), or stop a client whose account went away
      const error = new ConnectionFailed(`${this.user}@${this.options.url}: the broker refused the connection: ${refusal}`);
      if (this.firstConnect !== null) this.fail(error);
      else {
        this.lastError = error.message;
        this.deliver(makeEvent("connection-lost", { reason: error.message }));
      }
      return;
    }
    this.lastError = err.message || String(err.code ?? err);
  }

  private announce(): void {
    const sessionId = this.sessionId;
    const fields: CommandFields["connect"] = { session_id: sessionId };
    if (this.options.displayName !== undefined) fields.display_name = this.options.displayName;
    this.request("connect", fields, false, this.options.timeout).then(
      (event) => {
        void this.afterConnected(event.data as Session, sessionId);
      },
      () => undefined, // the next connection (or epoch) announces again
    );
  }

  private async afterConnected(session: Session, sessionId: string): Promise<void> {
    const snapshot = this.snapshot;
    this.snapshot = null;
    const conversations = [...(session.conversations ?? [])];
    let after = session.conversations_next;
    let complete = true;
    try {
      // a bridge that pages `connected` sends the first page of conversations only
      while (typeof after === "string" && after) {
        const page = (await this.call("get-conversations", { after }, true)) as {
          conversations: Conversation[];
          next?: string | null;
        };
        conversations.push(...page.conversations);
        after = page.next;
      }
    } catch {
      complete = false;
    }
    session.conversations = conversations;
    const first = this.session === null;
    this.session = session;
    if (first) {
      // where a first connection starts from: the newest state the bridge has
      for (const conv of conversations) {
        const cursor = this.cursor(conv.conversation_id);
        cursor.seq = Math.max(cursor.seq, conv.last_seq);
        cursor.rev = Math.max(cursor.rev, conv.last_rev ?? 0);
      }
    }
    if (sessionId === this.sessionId && this._state !== "closed") {
      this.setState("online");
      const pending = this.firstConnect;
      this.firstConnect = null;
      pending?.resolve(session);
    }
    if (snapshot !== null && !first && complete && this.options.catchUp) {
      await this.catchUpFrom(conversations, snapshot);
    }
  }

  private onMessage(topic: string, payload: Uint8Array): void {
    let body: unknown;
    try {
      body = JSON.parse(new TextDecoder().decode(payload));
    } catch {
      return; // not JSON: not from the bridge
    }
    if (!isObject(body)) return;
    if (topic === this.statusTopic) {
      this.onStatus(body);
      return;
    }
    if (this.options.presence && topic.startsWith(this.presenceTopic.slice(0, -1))) {
      this.deliver(makeEvent("presence", body));
      return;
    }
    if (topic !== this.inboxTopic || typeof body.type !== "string") return;
    const str = (v: unknown): string | null => (typeof v === "string" ? v : null);
    const event = makeEvent(body.type, isObject(body.data) ? body.data : {}, {
      requestId: str(body.request_id),
      eventId: str(body.event_id),
      ts: str(body.ts),
    });
    if (event.eventId !== null) {
      if (this.seen.has(event.eventId)) return; // QoS 1 delivered it again
      this.seen.add(event.eventId);
      if (this.seen.size > DEDUP_WINDOW) this.seen.delete(this.seen.values().next().value as string);
    }
    const pending = event.requestId !== null ? this.pending.get(event.requestId) : undefined;
    if (pending !== undefined) this.pending.delete(event.requestId!);
    if ((pending === undefined || !pending.internal) && this.track(event)) this.deliver(event);
    if (pending !== undefined) {
      if (event.type === "error") pending.reject(errorFrom(event.data, event.requestId));
      else pending.resolve(event);
    }
  }

  private onStatus(status: Record<string, unknown>): void {
    this.deliver(makeEvent("bridge-status", status));
    const epoch = status.epoch;
    if (status.status !== "online" || typeof epoch !== "string" || epoch === this.epoch) return;
    const previous = this.epoch;
    this.epoch = epoch;
    // a restarted bridge ends the sessions nobody re-announces within its grace period
    if (previous !== null && this.connections > 0 && this.mqtt?.connected) this.announce();
  }

  // -- what we have seen, and catching up on what we missed ------------------------------------------

  private cursor(cid: string): Cursor {
    let c = this.cursors.get(cid);
    if (c === undefined) {
      c = { seq: 0, rev: 0 };
      this.cursors.set(cid, c);
    }
    return c;
  }

  /** Moves the cursors with live events; false for a message-added already delivered (by catch-up). */
  private track(event: ChatEvent): boolean {
    const conv = event.conversation;
    if (event.type === "conversation-created" && conv !== undefined) {
      if (!this.cursors.has(conv.conversation_id)) {
        this.cursors.set(conv.conversation_id, { seq: conv.last_seq, rev: conv.last_rev ?? 0 });
      }
    } else if (event.type === "conversation-removed" && typeof event.data.conversation_id === "string") {
      this.cursors.delete(event.data.conversation_id);
    }
    const message = event.message;
    if (message === undefined || event.type === "connected") return true;
    const cursor = this.cursor(message.conversation_id);
    cursor.seq = Math.max(cursor.seq, message.seq);
    cursor.rev = Math.max(cursor.rev, message.rev ?? 0);
    return this.remember(message) || event.type !== "message-added";
  }

  /** True when this revision of the message was not delivered before. */
  private remember(message: Message): boolean {
    const rev = message.rev ?? 0;
    const known = this.revs.get(message.message_id);
    if (known !== undefined && known >= rev) return false;
    this.revs.delete(message.message_id);
    this.revs.set(message.message_id, rev);
    if (this.revs.size > DEDUP_WINDOW) this.revs.delete(this.revs.keys().next().value as string);
    return true;
  }

  private async catchUpFrom(conversations: Conversation[], previous: Map<string, Cursor>): Promise<void> {
    const current = new Set(conversations.map((c) => c.conversation_id));
    for (const cid of previous.keys()) {
      if (!current.has(cid)) {
        this.cursors.delete(cid);
        this.deliver(makeEvent("conversation-removed", { conversation_id: cid }, { catchUp: true }));
      }
    }
    for (const conv of conversations) {
      const cid = conv.conversation_id;
      let cursor = previous.get(cid);
      if (cursor === undefined) {
        cursor = { seq: 0, rev: 0 };
        this.deliver(makeEvent("conversation-created", { conversation: conv }, { catchUp: true }));
      }
      const byRev = typeof conv.last_rev === "number";
      if (byRev ? conv.last_rev <= cursor.rev : conv.last_seq <= cursor.seq) continue;
      try {
        await this.fetchSince(cid, cursor, byRev);
      } catch {
        return; // the next reconnect tries again
      }
    }
  }

  private async fetchSince(cid: string, cursor: Cursor, byRev: boolean): Promise<void> {
    const seenSeq = cursor.seq;
    while (this._state !== "closed") {
      const fields: CommandFields["get-messages"] = { conversation_id: cid, limit: CATCH_UP_PAGE };
      if (byRev) fields.since_rev = cursor.rev;
      else fields.since_seq = cursor.seq;
      const page = await this.askUntilAnswered(fields);
      if (page === null) return;
      const messages = page.messages ?? [];
      for (const m of messages) {
        const live = this.cursor(cid);
        live.seq = Math.max(live.seq, m.seq);
        live.rev = Math.max(live.rev, m.rev ?? 0);
        cursor.seq = Math.max(cursor.seq, m.seq);
        cursor.rev = Math.max(cursor.rev, m.rev ?? 0);
        if (this.remember(m)) {
          const kind = m.seq > seenSeq ? "message-added" : "message-updated";
          this.deliver(makeEvent(kind, { message: m }, { catchUp: true }));
        }
      }
      if (!page.has_more || messages.length === 0) return;
    }
  }

  /** A catch-up page, asked until answered: a `rate-limited` one (a user who missed much in several
   * conversations runs into the cost budget) again after its retryAfter, an `internal` one after a
   * growing pause (a few times). null when the client was closed meanwhile. */
  private async askUntilAnswered(fields: CommandFields["get-messages"]): Promise<Page | null> {
    let failures = 0;
    while (this._state !== "closed") {
      let pause: number;
      try {
        return (await this.call("get-messages", fields, true)) as unknown as Page;
      } catch (err) {
        if (err instanceof RateLimited) {
          pause = Math.min(Math.max(err.retryAfter, 0.05), CATCH_UP_LONGEST_WAIT);
        } else if (err instanceof InternalError && ++failures <= CATCH_UP_INTERNAL_RETRIES) {
          pause = Math.min(0.5 * 2 ** failures, CATCH_UP_LONGEST_WAIT);
        } else {
          throw err;
        }
      }
      await new Promise<void>((resolve) => {
        const wake = () => {
          clearTimeout(timer);
          this.onClosed.delete(wake);
          resolve();
        };
        const timer = setTimeout(wake, pause * 1000);
        this.onClosed.add(wake);
      });
    }
    return null;
  }

  // -- events -----------------------------------------------------------------------------------------

  /** Calls `handler` for each event of that type ("*": every event); returns a function that unsubscribes. */
  on(type: string, handler: Handler): () => void {
    let set = this.handlers.get(type);
    if (set === undefined) {
      set = new Set();
      this.handlers.set(type, set);
    }
    set.add(handler);
    return () => {
      this.handlers.get(type)?.delete(handler);
    };
  }

  /**
   * The next event of that type ("*": any) that matches, as Python's wait_for: events delivered since
   * the previous waitFor (the last 1000 are kept) count, and those skipped on the way are consumed.
   * Rejects with RequestTimeout-free `Error` ("timed out") after `timeout` ms (default: the client's).
   */
  waitFor(type: string, match?: (event: ChatEvent) => boolean, timeout?: number): Promise<ChatEvent> {
    const wanted = (e: ChatEvent): boolean => (type === "*" || e.type === type) && (match === undefined || match(e));
    const index = this.backlog.findIndex(wanted);
    if (index >= 0) {
      const event = this.backlog[index]!;
      this.backlog.splice(0, index + 1);
      return Promise.resolve(event);
    }
    this.backlog.length = 0;
    if (this._state === "closed") return Promise.reject(new ConnectionFailed(`${this.user}: the client is closed`));
    const limit = timeout ?? this.options.timeout;
    return new Promise<ChatEvent>((resolve, reject) => {
      const waiter: Waiter = {
        type,
        match,
        resolve: (e) => {
          clearTimeout(timer);
          resolve(e);
        },
        reject: (e) => {
          clearTimeout(timer);
          reject(e);
        },
      };
      const timer = setTimeout(() => {
        this.waiters.delete(waiter);
        reject(new WaitTimeout(`${this.user}: no ${type} event${match ? " that matches" : ""} within ${limit} ms`));
      }, limit);
      this.waiters.add(waiter);
    });
  }

  /** Every event from now on, in arrival order, until close(). */
  events(): AsyncIterableIterator<ChatEvent> {
    const queue: (ChatEvent | null)[] = [];
    let wake: (() => void) | null = null;
    let done = this._state === "closed";
    const stream = {
      push: (e: ChatEvent | null) => {
        queue.push(e);
        wake?.();
      },
    };
    if (!done) this.streams.add(stream);
    const finish = (): IteratorResult<ChatEvent> => {
      done = true;
      this.streams.delete(stream);
      return { value: undefined, done: true };
    };
    const iterator: AsyncIterableIterator<ChatEvent> = {
      next: async () => {
        while (!done) {
          if (queue.length) {
            const e = queue.shift()!;
            if (e === null) return finish();
            return { value: e, done: false };
          }
          await new Promise<void>((r) => (wake = r));
          wake = null;
        }
        return finish();
      },
      return: async () => finish(),
      [Symbol.asyncIterator]() {
        return iterator;
      },
    };
    return iterator;
  }

  private deliver(event: ChatEvent): void {
    let taken = false;
    for (const w of this.waiters) {
      if ((w.type === "*" || w.type === event.type) && (w.match === undefined || safe(w.match, event))) {
        this.waiters.delete(w);
        w.resolve(event);
        taken = true;
        break;
      }
    }
    if (taken) this.backlog.length = 0; // consumed, with what was skipped before it
    else {
      this.backlog.push(event);
      if (this.backlog.length > BACKLOG) this.backlog.shift();
    }
    for (const s of this.streams) s.push(event);
    for (const key of [event.type, "*"]) {
      for (const handler of this.handlers.get(key) ?? []) {
        try {
          const result = handler(event);
          if (result instanceof Promise) result.catch((err) => reportHandlerError(this.user, event, err));
        } catch (err) {
          reportHandlerError(this.user, event, err);
        }
      }
    }
  }

  // -- requests ---------------------------------------------------------------------------------------

  private publish(command: string, fields: object): Promise<void> {
    const client = this.mqtt;
    if (client === null) return Promise.reject(new ConnectionFailed(`${this.user}: not connected`));
    const opts: IClientPublishOptions = { qos: 1, retain: false };
    return new Promise<void>((resolve, reject) => {
      client.publish(this.commandTopic + command, JSON.stringify(fields), opts, (err) =>
        err ? reject(new ConnectionFailed(`${this.user}: ${command} not published: ${err.message}`)) : resolve(),
      );
    });
  }

  private nextRequestId(): string {
    this.counter += 1;
    return `${this.ridPrefix}-${this.counter}`;
  }

  /** Sends a command and resolves with its answer event (rejects with the error it was answered with). */
  private request(command: string, fields: object, internal: boolean, timeout: number): Promise<ChatEvent> {
    if (this._state === "closed" || this.mqtt === null) {
      return Promise.reject(new ConnectionFailed(`${this.user}: the client is ${this._state === "closed" ? "closed" : "not connected"}`));
    }
    const rid = this.nextRequestId();
    return new Promise<ChatEvent>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(rid);
        reject(new RequestTimeout(command, rid, timeout));
      }, timeout);
      this.pending.set(rid, {
        command,
        internal,
        resolve: (e) => {
          clearTimeout(timer);
          resolve(e);
        },
        reject: (e) => {
          clearTimeout(timer);
          reject(e);
        },
      });
      this.publish(command, { ...fields, request_id: rid }).catch((err: Error) => {
        // MQTT.js queues publishes while offline, so this is a closed client
        const p = this.pending.get(rid);
        this.pending.delete(rid);
        p?.reject(err);
      });
    });
  }

  private async call(command: string, fields: object, internal = false, timeout?: number): Promise<Record<string, unknown>> {
    const event = await this.request(command, fields, internal, timeout ?? this.options.timeout);
    return event.data;
  }

  /** Any command by name, resolving with the answer's data (for commands newer than this SDK). */
  async command<K extends keyof CommandFields>(
    command: K,
    fields: Omit<CommandFields[K], "request_id">,
    opts: { timeout?: number } = {},
  ): Promise<Record<string, unknown>> {
    return this.call(command, fields, false, opts.timeout);
  }

  private async all<T>(command: string, fields: object, key: string, timeout?: number): Promise<T[]> {
    const items: T[] = [];
    let after: string | null = null;
    for (;;) {
      const page: Record<string, unknown> = await this.call(command, after === null ? fields : { ...fields, after }, false, timeout);
      items.push(...((page[key] as T[] | undefined) ?? []));
      after = typeof page.next === "string" && page.next ? page.next : null;
      if (after === null) return items;
    }
  }

  // -- commands ---------------------------------------------------------------------------------------

  async createDirect(userId: string, opts: { timeout?: number } = {}): Promise<Conversation> {
    const fields: CommandFields["create-conversation"] = { kind: "direct", participants: [userId] };
    return (await this.call("create-conversation", fields, false, opts.timeout)).conversation as Conversation;
  }

  async createGroup(participants: string[], title?: string, opts: { timeout?: number } = {}): Promise<Conversation> {
    const fields: CommandFields["create-conversation"] = { kind: "group", participants: [...participants] };
    if (title !== undefined) fields.title = title;
    return (await this.call("create-conversation", fields, false, opts.timeout)).conversation as Conversation;
  }

  async invite(conversationId: string, userIds: string[], opts: { timeout?: number } = {}): Promise<string[]> {
    const fields: CommandFields["invite"] = { conversation_id: conversationId, user_ids: [...userIds] };
    return (await this.call("invite", fields, false, opts.timeout)).user_ids as string[];
  }

  /** The answer's data: `participant-left` {conversation_id, user_id}, or {conversation_id} when the owner left. */
  async leave(conversationId: string, opts: { timeout?: number } = {}): Promise<LeaveResult> {
    return (await this.call("leave", { conversation_id: conversationId }, false, opts.timeout)) as unknown as LeaveResult;
  }

  /** Resolves with the removed conversation's id. */
  async removeConversation(conversationId: string, opts: { timeout?: number } = {}): Promise<string> {
    return (await this.call("remove-conversation", { conversation_id: conversationId }, false, opts.timeout))
      .conversation_id as string;
  }

  async sendMessage(conversationId: string, body: string, opts: { clientMsgId?: string; timeout?: number } = {}): Promise<Message> {
    const fields: CommandFields["send-message"] = { conversation_id: conversationId, body };
    if (opts.clientMsgId !== undefined) fields.client_msg_id = opts.clientMsgId;
    return (await this.call("send-message", fields, false, opts.timeout)).message as Message;
  }

  async reply(messageId: string, body: string, opts: { clientMsgId?: string; timeout?: number } = {}): Promise<Message> {
    const fields: CommandFields["reply"] = { message_id: messageId, body };
    if (opts.clientMsgId !== undefined) fields.client_msg_id = opts.clientMsgId;
    return (await this.call("reply", fields, false, opts.timeout)).message as Message;
  }

  /** Messages after a cursor (default: from the start), oldest first. */
  async getMessages(
    conversationId: string,
    opts: { sinceSeq?: number; since?: string; sinceRev?: number; limit?: number; timeout?: number } = {},
  ): Promise<Page> {
    const fields: CommandFields["get-messages"] = { conversation_id: conversationId };
    if (opts.sinceSeq !== undefined) fields.since_seq = opts.sinceSeq;
    if (opts.since !== undefined) fields.since = opts.since;
    if (opts.sinceRev !== undefined) fields.since_rev = opts.sinceRev;
    if (opts.sinceSeq === undefined && opts.since === undefined && opts.sinceRev === undefined) fields.since_seq = 0;
    if (opts.limit !== undefined) fields.limit = opts.limit;
    return (await this.call("get-messages", fields, false, opts.timeout)) as unknown as Page;
  }

  /** The newest messages before `beforeSeq` (default: the newest), oldest first. */
  async getPriorMessages(conversationId: string, opts: { beforeSeq?: number; limit?: number; timeout?: number } = {}): Promise<Page> {
    const fields: CommandFields["get-prior-messages"] = { conversation_id: conversationId };
    if (opts.beforeSeq !== undefined) fields.before_seq = opts.beforeSeq;
    if (opts.limit !== undefined) fields.limit = opts.limit;
    return (await this.call("get-prior-messages", fields, false, opts.timeout)) as unknown as Page;
  }

  /** Every conversation of the user (following the pages of a paged answer). */
  getConversations(opts: { timeout?: number } = {}): Promise<Conversation[]> {
    return this.all<Conversation>("get-conversations", {}, "conversations", opts.timeout);
  }

  getParticipants(conversationId: string, opts: { timeout?: number } = {}): Promise<User[]> {
    return this.all<User>("get-participants", { conversation_id: conversationId }, "participants", opts.timeout);
  }

  getActiveUsers(opts: { timeout?: number } = {}): Promise<User[]> {
    return this.all<User>("get-active-users", {}, "users", opts.timeout);
  }

  async markRead(conversationId: string, seq: number, opts: { timeout?: number } = {}): Promise<ReadMarker> {
    const fields: CommandFields["mark-read"] = { conversation_id: conversationId, seq };
    return (await this.call("mark-read", fields, false, opts.timeout)) as unknown as ReadMarker;
  }

  /** Not answered when it succeeds: resolves once the broker has it; a refusal arrives as an `error` event. */
  async typing(conversationId: string, typing = true): Promise<void> {
    const fields: CommandFields["typing"] = { conversation_id: conversationId, typing, request_id: this.nextRequestId() };
    await this.publish("typing", fields);
  }

  async editMessage(messageId: string, body: string, opts: { timeout?: number } = {}): Promise<Message> {
    const fields: CommandFields["edit-message"] = { message_id: messageId, body };
    return (await this.call("edit-message", fields, false, opts.timeout)).message as Message;
  }

  /** Resolves with the tombstone. */
  async deleteMessage(messageId: string, opts: { timeout?: number } = {}): Promise<Message> {
    const fields: CommandFields["delete-message"] = { message_id: messageId };
    return (await this.call("delete-message", fields, false, opts.timeout)).message as Message;
  }

  async react(messageId: string, emoji: string, on = true, opts: { timeout?: number } = {}): Promise<ReactionChange> {
    const fields: CommandFields["react"] = { message_id: messageId, emoji, on };
    return (await this.call("react", fields, false, opts.timeout)) as unknown as ReactionChange;
  }

  async searchMessages(query: string, opts: { conversationId?: string; limit?: number; timeout?: number } = {}): Promise<SearchResults> {
    const fields: CommandFields["search-messages"] = { query };
    if (opts.conversationId !== undefined) fields.conversation_id = opts.conversationId;
    if (opts.limit !== undefined) fields.limit = opts.limit;
    return (await this.call("search-messages", fields, false, opts.timeout)) as unknown as SearchResults;
  }
}

/** waitFor() saw no matching event in time. */
export class WaitTimeout extends Error {
  constructor(message: string) {
    super(message);
    this.name = "WaitTimeout";
  }
}

function safe(match: (e: ChatEvent) => boolean, event: ChatEvent): boolean {
  try {
    return match(event);
  } catch {
    return false;
  }
}

function delay(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

function reportHandlerError(user: string, event: ChatEvent, err: unknown): void {
  console.error(`chat-bridge-client ${user}: the handler for ${event.type} failed:`, err);
}
