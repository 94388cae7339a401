// Losing the connection and coming back: a new session and a will that names it on every automatic
// reconnect, `connect` again when a restarted bridge shows a new epoch, and catch-up with since_rev of
// what was sent and changed while the client was away (each message delivered once).
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";

import type { ChatClient, ChatEvent, Message } from "../src/index.js";
import { Bridge, Mosquitto, Proxy, rawClient, until } from "./helpers.js";

/** Every event of that type the client delivers from now on. */
function collect(client: ChatClient, type: string): ChatEvent[] {
  const seen: ChatEvent[] = [];
  client.on(type, (e) => {
    seen.push(e);
  });
  return seen;
}

const userIs = (user: string) => (e: ChatEvent) => (e.data.user?.user_id ?? e.data.user_id) === user;

describe("automatic reconnects (embedded broker, through a TCP proxy that cuts connections)", () => {
  let bridge: Bridge;
  let proxy: Proxy;
  const clients: ChatClient[] = [];
  const open = async (user: string, opts = {}): Promise<ChatClient> => {
    const c = bridge.client(user, opts);
    clients.push(c);
    await c.connect();
    return c;
  };

  before(async () => {
    bridge = await Bridge.start({ name: "reconnect" });
    proxy = await Proxy.start(bridge.port);
  });
  after(async () => {
    proxy.refusing = false;
    await Promise.all(clients.map((c) => c.close()));
    await proxy.close();
    await bridge.stop();
  });

  test("each reconnect has a new session_id and a will naming it: others see the user leave every time", async () => {
    const bob = await open("bob");
    // what the broker publishes for alice's wills, as the bridge receives them
    const wills: string[] = [];
    const listener = await rawClient(bridge.url, "listener:wills");
    await listener.subscribeAsync("chat/v1/users/alice/commands/disconnect", { qos: 1 });
    listener.on("message", (_topic, payload) => wills.push(JSON.parse(payload.toString()).session_id));
    try {
      const connected = collect(bob, "user-connected");
      const disconnected = collect(bob, "user-disconnected");
      const alice = await open("alice", { url: proxy.url });
      const first = alice.sessionId;
      await until(() => connected.some(userIs("alice")), "bob to see alice connect");

      proxy.cut(); // no DISCONNECT: the broker publishes the first connection's will
      await until(() => disconnected.some(userIs("alice")), "bob to see alice's first connection end");
      assert.deepEqual(wills, [first]);
      await until(() => alice.state === "online" && alice.connections === 2, "alice to reconnect");
      const second = alice.sessionId;
      assert.notEqual(second, first);
      assert.equal(alice.session!.session_id, second);
      assert.deepEqual(JSON.parse(String(alice.mqtt!.options.will!.payload)), { session_id: second, reason: "lost" });
      await until(() => connected.filter(userIs("alice")).length === 2, "bob to see alice connect again");

      // the second will must name the second session, or the bridge takes it for a stale one and
      // alice stays "online" for ever
      proxy.refusing = true;
      proxy.cut();
      await until(() => disconnected.filter(userIs("alice")).length === 2, "bob to see alice's second connection end");
      assert.deepEqual(wills, [first, second]);
      assert.ok(!(await bob.getActiveUsers()).some((u) => u.user_id === "alice"));
    } finally {
      proxy.refusing = false;
      listener.end(true);
    }
  });

  for (const persistent of [false, true]) {
    const kind = persistent ? "a persistent session (the broker queued the events too)" : "a clean session";
    test(`catch-up after a reconnect, ${kind}: what was sent and changed meanwhile arrives once`, async () => {
      const user = persistent ? "dora" : "carol";
      const me = await open(user, { url: proxy.url, ...(persistent ? { device: "phone" } : {}) });
      const added = collect(me, "message-added");
      const updated = collect(me, "message-updated");
      const edited = collect(me, "message-edited");
      const reactions = collect(me, "reaction-changed");
      const bob = await open("bob");
      const conv = await bob.createDirect(user);
      const cid = conv.conversation_id;
      await until(() => me.cursors.has(cid), `${user} to learn of the conversation`);
      const m1 = await bob.sendMessage(cid, "before");
      await until(() => added.some((e) => e.message!.message_id === m1.message_id), `${user} to get "before"`);

      // the answers to the SDK's own get-messages (catch-up), seen right after the SDK has taken them
      const fetched: boolean[] = [];
      me.mqtt!.on("message", (_topic, payload) => {
        const body = JSON.parse(payload.toString());
        if (body.type === "messages" && body.request_id && body.data?.conversation_id === cid) fetched.push(body.data.has_more);
      });

      proxy.refusing = true;
      proxy.cut();
      await until(() => me.state === "reconnecting", `${user} to notice the lost connection`);
      const m2 = await bob.sendMessage(cid, "while away 1");
      const m3 = await bob.sendMessage(cid, "while away 2");
      await bob.editMessage(m1.message_id, "before, edited");
      const reacted = await bob.react(m1.message_id, "👍");
      proxy.refusing = false;

      // catch-up fetched the conversation (get-messages since_rev) to its end, and delivered what it found
      await until(() => fetched.includes(false), `${user}'s catch-up of the conversation`, 20_000);
      await new Promise((r) => setImmediate(r));
      const away = [m2.message_id, m3.message_id];
      assert.ok(
        away.every((id) => added.some((e) => e.message!.message_id === id)),
        "the messages sent while away were not delivered",
      );
      // a live message after catch-up: whatever was still to come of the above has arrived before it
      const m4 = await bob.sendMessage(cid, "live again");
      await until(() => added.some((e) => e.message!.message_id === m4.message_id), `${user} to get "live again"`);

      const adds = (id: string) => added.filter((e) => e.message!.message_id === id).length;
      assert.deepEqual(
        [m1, m2, m3, m4].map((m) => adds(m.message_id)),
        [1, 1, 1, 1],
      );
      // the edit and the reaction: the newest revision of "before" was delivered, no revision twice
      const changes: Message[] = [...edited, ...reactions, ...updated]
        .map((e) => e.message!)
        .filter((m) => m.message_id === m1.message_id)
        .sort((a, b) => (a.rev ?? 0) - (b.rev ?? 0));
      const newest = changes.at(-1)!;
      assert.ok(newest, "no change of 'before' was delivered");
      assert.equal(newest.body, "before, edited");
      assert.deepEqual(newest.reactions, { "👍": ["bob"] });
      assert.equal(newest.rev, reacted.message.rev);
      assert.equal(new Set(changes.map((m) => m.rev)).size, changes.length, "a revision was delivered twice");
      if (!persistent) {
        // nothing reached the clean session while it was away: catch-up (get-messages since_rev) brought it
        assert.ok(added.filter((e) => away.includes(e.message!.message_id)).every((e) => e.catchUp));
        assert.equal(updated.length, 1);
        assert.ok(updated[0]!.catchUp);
      }
      const cursor = me.cursors.get(cid)!;
      assert.deepEqual(cursor, { seq: m4.seq, rev: m4.rev });
    });
  }
});

describe("a restarted bridge (Mosquitto stays up)", { skip: Mosquitto.binary() === null ? "mosquitto is not installed" : false }, () => {
  let mosquitto: Mosquitto;
  let bridge: Bridge;
  const clients: ChatClient[] = [];

  before(async () => {
    mosquitto = await Mosquitto.start();
    bridge = await Bridge.start({ name: "epoch", brokerUrl: mosquitto.url, args: ["--session-grace", "1"] });
  });
  after(async () => {
    await Promise.all(clients.map((c) => c.close()));
    await bridge.stop();
    await mosquitto.stop();
  });

  test("a new epoch: the client sends `connect` again with its session, which outlives the grace period", async () => {
    const alice = bridge.client("alice");
    const bob = bridge.client("bob");
    clients.push(alice, bob);
    await alice.connect();
    await bob.connect();
    const firstEpoch = alice.epoch;
    assert.equal(firstEpoch, bridge.epoch);
    const session = alice.sessionId;
    // carol announces once and never again, as a client that ignores the epoch would
    const carol = await rawClient(mosquitto.url, "carol:raw");
    const bobSees = collect(bob, "user-connected");
    const gone = collect(bob, "user-disconnected");
    carol.publish("chat/v1/users/carol/commands/connect", JSON.stringify({ session_id: "carol-1", request_id: "c-1" }), { qos: 1 });
    await until(() => bobSees.some(userIs("carol")), "bob to see carol connect");
    const announced = collect(alice, "connected");
    try {
      await bridge.restart();
      assert.notEqual(bridge.epoch, firstEpoch);
      await until(() => alice.epoch === bridge.epoch, "alice to see the new epoch");
      await until(() => announced.length > 0, "alice to send connect again");
      assert.equal(announced[0]!.data.session_id, session);
      assert.equal(alice.sessionId, session);
      assert.equal(alice.connections, 1, "the MQTT connection never dropped");
      // after the grace period the bridge ends the session nobody re-announced, and only that one
      await until(() => gone.some(userIs("carol")), "the bridge to end carol's session", 20_000);
      const active = (await bob.getActiveUsers()).map((u) => u.user_id);
      assert.ok(active.includes("alice") && active.includes("bob") && !active.includes("carol"), active.join(","));
      assert.ok(!gone.some(userIs("alice")));
      assert.equal((await alice.sendMessage("global", "still here")).body, "still here");
    } finally {
      carol.end(true);
    }
  });
});

describe("MQTT over WebSockets (the embedded broker's --ws-listen)", () => {
  let bridge: Bridge;
  const clients: ChatClient[] = [];

  before(async () => {
    bridge = await Bridge.start({ name: "ws", ws: true });
  });
  after(async () => {
    await Promise.all(clients.map((c) => c.close()));
    await bridge.stop();
  });

  test("a ws:// client connects, sends and receives, beside one on TCP", async () => {
    const alice = bridge.client("alice", { url: bridge.wsUrl! });
    const bob = bridge.client("bob");
    clients.push(alice, bob);
    await alice.connect();
    await bob.connect();
    assert.equal(alice.mqtt!.options.protocol, "ws");
    assert.equal(alice.state, "online");
    const conv = await alice.createDirect("bob");
    const toBob = bob.waitFor("message-added", (e) => e.message?.body === "over a WebSocket");
    const sent = await alice.sendMessage(conv.conversation_id, "over a WebSocket");
    assert.equal((await toBob).message!.message_id, sent.message_id);
    const toAlice = alice.waitFor("message-added", (e) => e.message?.body === "over TCP");
    await bob.sendMessage(conv.conversation_id, "over TCP");
    assert.equal((await toAlice).message!.sender_id, "bob");
    const left = bob.waitFor("user-disconnected", userIs("alice"));
    await alice.close();
    await left;
  });
});
