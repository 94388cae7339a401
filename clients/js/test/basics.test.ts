// The client against a real bridge: connecting, commands and their answers, errors, events.
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";

import {
  BadRequest,
  ChatClient,
  ConnectionFailed,
  Forbidden,
  NotFound,
  ProtocolError,
  RequestTimeout,
  RateLimited,
  UnknownCommand,
  errorFrom,
  type ChatEvent,
} from "../src/index.js";
import { Bridge, rawClient } from "./helpers.js";

describe("client ids", () => {
  test("an ephemeral client is {user}:{random} with a clean session", () => {
    const a = new ChatClient({ user: "alice", url: "mqtt://127.0.0.1:1" });
    const b = new ChatClient({ user: "alice", url: "mqtt://127.0.0.1:1" });
    assert.match(a.clientId, /^alice:[0-9a-f]{12}$/);
    assert.notEqual(a.clientId, b.clientId);
  });

  test("a device is {user}:{device}; bad user ids and devices are refused", () => {
    assert.equal(new ChatClient({ user: "alice", device: "phone", url: "mqtt://x" }).clientId, "alice:phone");
    for (const user of ["", "a b", "al:ice", "chat-bridge", "x".repeat(65)]) {
      assert.throws(() => new ChatClient({ user, url: "mqtt://x" }), TypeError, user);
    }
    assert.throws(() => new ChatClient({ user: "alice", device: "a/b", url: "mqtt://x" }), TypeError);
  });

  test("connect() to nothing rejects with ConnectionFailed", async () => {
    const chat = new ChatClient({ user: "alice", url: "mqtt://127.0.0.1:1", timeout: 1500 });
    await assert.rejects(chat.connect(), ConnectionFailed);
    assert.equal(chat.state, "closed");
  });
});

describe("against a bridge", () => {
  let bridge: Bridge;
  const clients: ChatClient[] = [];
  const open = async (user: string, opts = {}): Promise<ChatClient> => {
    const c = bridge.client(user, opts);
    clients.push(c);
    await c.connect();
    return c;
  };

  before(async () => {
    bridge = await Bridge.start({ name: "basics" });
  });
  after(async () => {
    await Promise.all(clients.map((c) => c.close()));
    await bridge.stop();
  });

  test("connect: persistent session, will, subscriptions, then `connect` with the display name", async () => {
    const alice = await open("alice", { device: "laptop", displayName: "Alice A." });
    assert.equal(alice.state, "online");
    assert.equal(alice.clientId, "alice:laptop");
    assert.equal(alice.mqtt!.options.clean, false);
    const will = alice.mqtt!.options.will!;
    assert.equal(will.topic, "chat/v1/users/alice/commands/disconnect");
    assert.deepEqual(JSON.parse(String(will.payload)), { session_id: alice.sessionId, reason: "lost" });
    assert.equal(alice.session!.session_id, alice.sessionId);
    assert.equal(alice.session!.user.display_name, "Alice A.");
    assert.ok(alice.session!.conversations.some((c) => c.conversation_id === "global"));
    assert.ok(alice.epoch !== null && alice.epoch === bridge.epoch);
    assert.ok(alice.cursors.has("global"));
  });

  test("send and receive: the answer resolves the call, the other participant gets the event", async () => {
    const alice = await open("alice");
    const bob = await open("bob");
    const conv = await alice.createDirect("bob");
    assert.equal(conv.kind, "direct");
    const got = bob.waitFor("message-added", (e) => e.conversationId === conv.conversation_id);
    const sent = await alice.sendMessage(conv.conversation_id, "hello bob", { clientMsgId: "m-1" });
    assert.equal(sent.body, "hello bob");
    assert.equal(sent.seq, 1);
    const event = await got;
    assert.equal(event.message!.message_id, sent.message_id);
    assert.equal(event.requestId, null);
    assert.equal(event.catchUp, false);
    assert.ok(event.eventId);
    // the same client_msg_id stores nothing new
    const again = await alice.sendMessage(conv.conversation_id, "hello bob", { clientMsgId: "m-1" });
    assert.equal(again.message_id, sent.message_id);
    const page = await bob.getMessages(conv.conversation_id);
    assert.deepEqual(
      page.messages.map((m) => m.body),
      ["hello bob"],
    );
    assert.equal(bob.cursors.get(conv.conversation_id)!.seq, 1);
  });

  test("concurrent requests are matched to their answers by request_id", async () => {
    const alice = await open("alice");
    const bodies = Array.from({ length: 20 }, (_, i) => `n${i}`);
    const results = await Promise.all(bodies.map((b) => alice.sendMessage("global", b)));
    assert.deepEqual(
      results.map((m) => m.body),
      bodies,
    );
    const seqs = results.map((m) => m.seq);
    assert.equal(new Set(seqs).size, 20);
    // the answer to our own command is delivered as an event too, carrying its request_id
    const mine = alice.waitFor("message-added", (e) => e.message?.body === "own" && e.requestId !== null);
    await alice.sendMessage("global", "own");
    assert.match((await mine).requestId!, /^[0-9a-f]{6}-\d+$/);
  });

  test("error answers reject with the ProtocolError subclass of their code", async () => {
    const alice = await open("alice");
    const notFound = await alice.getMessages("c_missing").catch((e: unknown) => e);
    assert.ok(notFound instanceof NotFound && notFound instanceof ProtocolError);
    assert.equal(notFound.code, "not-found");
    assert.equal(notFound.command, "get-messages");
    assert.ok(notFound.requestId);
    await assert.rejects(alice.sendMessage("global", ""), BadRequest);
    await assert.rejects(alice.sendMessage("global", "x".repeat(8001)), BadRequest);
    await assert.rejects(alice.createDirect("alice"), BadRequest);
    await assert.rejects(alice.leave("global"), Forbidden);
    // the refusal changed nothing
    const page = await alice.getPriorMessages("global", { limit: 500 });
    assert.ok(!page.messages.some((m) => m.body === "x".repeat(8001)));
  });

  test("groups, threads, edits, reactions, deletions, read markers and search", async () => {
    const alice = await open("alice");
    const bob = await open("bob");
    const carol = await open("carol");
    const group = await alice.createGroup(["bob"], "plans");
    assert.deepEqual(group.participants.sort(), ["alice", "bob"]);
    const invited = carol.waitFor("conversation-created", (e) => e.conversation?.conversation_id === group.conversation_id);
    assert.deepEqual(await alice.invite(group.conversation_id, ["carol"]), ["carol"]);
    await invited;
    const m = await alice.sendMessage(group.conversation_id, "lunch at noon?");
    const threaded = await bob.reply(m.message_id, "yes");
    assert.notEqual(threaded.conversation_id, group.conversation_id);
    const edited = bob.waitFor("message-edited", (e) => e.message?.message_id === m.message_id);
    const e = await alice.editMessage(m.message_id, "lunch at one?");
    assert.equal(e.body, "lunch at one?");
    assert.ok(e.edited_at);
    assert.equal((await edited).message!.body, "lunch at one?");
    const change = await bob.react(m.message_id, "👍");
    assert.deepEqual(change.message.reactions, { "👍": ["bob"] });
    assert.equal(change.on, true);
    const marker = await carol.markRead(group.conversation_id, 1);
    assert.equal(marker.read_seq, 1);
    const found = await carol.searchMessages("lunch", { conversationId: group.conversation_id });
    assert.deepEqual(
      found.messages.map((x) => x.message_id),
      [m.message_id],
    );
    const tomb = await alice.deleteMessage(m.message_id);
    assert.equal(tomb.body, "");
    assert.ok(tomb.deleted_at);
    const convs = await carol.getConversations();
    assert.ok(convs.some((c) => c.conversation_id === group.conversation_id));
    const participants = await carol.getParticipants(group.conversation_id);
    assert.deepEqual(participants.map((u) => u.user_id).sort(), ["alice", "bob", "carol"]);
    const active = await carol.getActiveUsers();
    assert.ok(["alice", "bob", "carol"].every((u) => active.some((a) => a.user_id === u)));
    const left = await carol.leave(group.conversation_id);
    assert.deepEqual(left, { conversation_id: group.conversation_id, user_id: "carol" });
    assert.equal(await alice.removeConversation(group.conversation_id), group.conversation_id);
    await assert.rejects(bob.getMessages(group.conversation_id), NotFound);
  });

  test("typing reaches the other participant; a refused typing arrives as an error event", async () => {
    const alice = await open("alice");
    const bob = await open("bob");
    const conv = await alice.createDirect("bob");
    const seen = bob.waitFor("typing", (e) => e.data.user_id === "alice");
    await alice.typing(conv.conversation_id);
    assert.equal((await seen).data.typing, true);
    const refused = alice.waitFor("error", (e) => e.data.command === "typing");
    await alice.typing("global");
    assert.equal((await refused).data.code, "forbidden");
  });

  test("on('*'), unsubscribe, events() and the state/bridge-status events", async () => {
    const alice = bridge.client("alice");
    clients.push(alice);
    const all: ChatEvent[] = [];
    const off = alice.on("*", (e) => {
      all.push(e);
    });
    const states: string[] = [];
    alice.on("state", (e) => {
      states.push(e.data.state);
    });
    await alice.connect();
    assert.deepEqual(states, ["connecting", "online"]);
    assert.ok(all.some((e) => e.type === "bridge-status" && e.data.status === "online"));
    assert.ok(all.some((e) => e.type === "connected"));
    const iterator = alice.events();
    const sent = await alice.sendMessage("global", "iterated");
    for await (const e of iterator) {
      if (e.type === "message-added" && e.message!.message_id === sent.message_id) break;
    }
    off();
    const count = all.length;
    await alice.sendMessage("global", "unheard");
    assert.equal(all.length, count);
  });

  test("an event delivered twice (same event_id) is dropped, and a message-added already delivered too", async () => {
    const alice = await open("alice");
    const bob = await open("bob");
    const conv = await bob.createDirect("alice");
    const payloads: Uint8Array[] = [];
    alice.mqtt!.on("message", (topic, payload) => {
      if (topic.endsWith("/inbox")) payloads.push(payload);
    });
    const seen: ChatEvent[] = [];
    alice.on("message-added", (e) => {
      if (e.conversationId === conv.conversation_id) seen.push(e);
    });
    const first = alice.waitFor("message-added", (e) => e.message?.body === "once");
    await bob.sendMessage(conv.conversation_id, "once");
    await first;
    const original = payloads.find((p) => JSON.parse(new TextDecoder().decode(p)).data?.message?.body === "once")!;
    // QoS 1 redelivery: the broker hands the client the same event again
    alice.mqtt!.emit("message", "chat/v1/users/alice/inbox", original as Buffer, {} as never);
    // the same message under another event id (a persistent session's queue after catch-up): dropped too
    const copy = JSON.parse(new TextDecoder().decode(original));
    copy.event_id = "v_another";
    alice.mqtt!.emit("message", "chat/v1/users/alice/inbox", Buffer.from(JSON.stringify(copy)), {} as never);
    const next = alice.waitFor("message-added", (e) => e.message?.body === "twice");
    await bob.sendMessage(conv.conversation_id, "twice");
    await next;
    assert.deepEqual(
      seen.map((e) => e.message!.body),
      ["once", "twice"],
    );
  });

  test("error data maps to the error classes (also codes this SDK does not know)", () => {
    const limited = errorFrom({ code: "rate-limited", message: "slow down", command: "send-message", retry_after: 0.25 }, "r-1");
    assert.ok(limited instanceof RateLimited && limited instanceof ProtocolError);
    assert.equal(limited.retryAfter, 0.25);
    assert.equal(limited.requestId, "r-1");
    assert.ok(errorFrom({ code: "unknown-command", message: "no", command: "x" }, null) instanceof UnknownCommand);
    const future = errorFrom({ code: "teapot", message: "short and stout", command: null }, null);
    assert.equal(future.constructor, ProtocolError);
    assert.equal(future.code, "teapot");
    assert.equal(future.message, "teapot: short and stout");
  });

  test("close() sends `disconnect`: others see the user leave, without a will", async () => {
    const bob = await open("bob");
    const dave = await open("dave");
    const gone = bob.waitFor("user-disconnected", (e) => e.data.user_id === "dave");
    await dave.close();
    assert.equal(dave.state, "closed");
    await gone;
    await assert.rejects(dave.sendMessage("global", "after close"), ConnectionFailed);
  });

  test("no answer within the timeout rejects with RequestTimeout; a late answer is harmless", async () => {
    const alice = await open("alice");
    process.kill(bridge.pid, "SIGSTOP"); // the bridge (and its embedded broker) stop answering
    try {
      const err = await alice.sendMessage("global", "late", { timeout: 300 }).catch((e: unknown) => e);
      assert.ok(err instanceof RequestTimeout, String(err));
      assert.equal(err.command, "send-message");
    } finally {
      process.kill(bridge.pid, "SIGCONT");
    }
    const late = await alice.waitFor("message-added", (e) => e.message?.body === "late");
    assert.ok(late.requestId);
    assert.equal((await alice.sendMessage("global", "on time")).body, "on time");
  });
});
