// Unit tests of the page's state (src/store.ts), without a browser: `node --test test/`.
import assert from "node:assert/strict";
import { test } from "node:test";
import * as esbuild from "esbuild";

const built = await esbuild.build({
  entryPoints: [new URL("../src/store.ts", import.meta.url).pathname],
  bundle: true,
  format: "esm",
  platform: "neutral",
  write: false,
});
const { Store, TYPING_SHOWN_MS } = await import(
  `data:text/javascript;base64,${Buffer.from(built.outputFiles[0].contents).toString("base64")}`
);

const conv = (id, extra = {}) => ({
  conversation_id: id,
  kind: "direct",
  title: null,
  owner_id: null,
  participants: ["alice", "bob"],
  parent_conversation_id: null,
  parent_message_id: null,
  created_at: "2026-12-01T10:00:00.000Z",
  last_seq: 0,
  last_rev: 0,
  read_seq: 0,
  unread: 0,
  ...extra,
});
const msg = (seq, extra = {}) => ({
  message_id: `m${seq}`,
  conversation_id: "c1",
  seq,
  sender_id: "bob",
  body: `body ${seq}`,
  client_msg_id: null,
  created_at: "2026-12-01T10:00:00.000Z",
  edited_at: null,
  deleted_at: null,
  reactions: {},
  rev: seq,
  ...extra,
});
const ev = (type, data, extra = {}) => ({ type, data, requestId: null, eventId: null, ts: "", catchUp: false, ...extra });

function session(now) {
  const store = new Store(now);
  store.session({
    user: { user_id: "alice", display_name: null, active: true },
    session_id: "s",
    conversations: [conv("c1", { last_seq: 3, read_seq: 1, unread: 2 })],
    active_users: [{ user_id: "bob", display_name: "Bob", active: true }],
  });
  return store;
}

test("unread counts follow last_seq and the read marker", () => {
  const store = session();
  assert.equal(store.unread("c1"), 2);
  store.apply(ev("message-added", { message: msg(4) }));
  assert.equal(store.unread("c1"), 3);
  store.apply(ev("read-marker", { conversation_id: "c1", user_id: "alice", read_seq: 4 }));
  assert.equal(store.unread("c1"), 0);
  store.apply(ev("read-marker", { conversation_id: "c1", user_id: "alice", read_seq: 2 }));
  assert.equal(store.unread("c1"), 0, "markers only move forward");
  store.apply(ev("message-added", { message: msg(5, { sender_id: "alice" }) }));
  assert.equal(store.unread("c1"), 0, "my own message moves my marker");
});

test("a message is held once; the higher rev wins, a lower one changes nothing", () => {
  const store = session();
  assert.equal(store.apply(ev("message-added", { message: msg(4) })), "c1");
  assert.equal(store.apply(ev("message-added", { message: msg(4) })), "", "a duplicate");
  store.apply(ev("message-edited", { message: msg(4, { body: "edited", rev: 7 }) }));
  store.apply(ev("message-updated", { message: msg(4, { body: "older", rev: 5 }) }, { catchUp: true }));
  assert.deepEqual(store.sorted("c1").map((m) => [m.seq, m.body]), [[4, "edited"]]);
  store.putPage("c1", [msg(2), msg(3), msg(1)], false, true);
  assert.deepEqual(store.sorted("c1").map((m) => m.seq), [1, 2, 3, 4]);
  assert.equal(store.conversations.get("c1").hasOlder, false);
});

test("typing shows for 10 s, ends with false or the typer's message", () => {
  let now = 1000;
  const store = session(() => now);
  store.apply(ev("typing", { conversation_id: "c1", user_id: "bob", typing: true }));
  assert.deepEqual(store.typers("c1"), ["bob"]);
  now += TYPING_SHOWN_MS + 1;
  assert.deepEqual(store.typers("c1"), []);
  store.apply(ev("typing", { conversation_id: "c1", user_id: "bob", typing: true }));
  store.apply(ev("message-added", { message: msg(4) }));
  assert.deepEqual(store.typers("c1"), []);
  store.apply(ev("typing", { conversation_id: "c1", user_id: "bob", typing: true }));
  store.apply(ev("typing", { conversation_id: "c1", user_id: "bob", typing: false }));
  assert.deepEqual(store.typers("c1"), []);
});

test("read receipts, presence, leaving and removal", () => {
  const store = session();
  store.apply(ev("read-marker", { conversation_id: "c1", user_id: "bob", read_seq: 3 }));
  assert.deepEqual(store.seenBy("c1", 3), ["bob"]);
  assert.deepEqual(store.seenBy("c1", 4), []);
  assert.ok(store.active.has("bob"));
  store.apply(ev("user-disconnected", { user_id: "bob" }));
  assert.ok(!store.active.has("bob"));
  store.apply(ev("user-connected", { user: { user_id: "carol", display_name: "Carol", active: true } }));
  assert.equal(store.name("carol"), "Carol");
  store.apply(ev("conversation-created", { conversation: conv("g1", { kind: "group", title: "Team", participants: ["alice", "bob"] }) }));
  store.apply(ev("participant-left", { conversation_id: "g1", user_id: "bob" }));
  assert.deepEqual(store.conversations.get("g1").conv.participants, ["alice"]);
  store.apply(ev("participant-left", { conversation_id: "g1", user_id: "alice" }));
  assert.ok(!store.conversations.has("g1"));
  store.apply(ev("conversation-removed", { conversation_id: "c1" }));
  assert.equal(store.conversations.size, 0);
});
