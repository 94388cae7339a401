// Catch-up that runs into the cost budget: a user who missed messages in several conversations has a
// catch-up page refused as `rate-limited`; the SDK asks again after retry_after instead of giving up.
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";

import { RateLimited } from "../src/errors.js";
import type { ChatClient, ChatEvent, Message } from "../src/index.js";
import { Bridge, Proxy, until } from "./helpers.js";

describe("catch-up under a small cost budget (embedded broker, through a TCP proxy)", () => {
  let bridge: Bridge;
  let proxy: Proxy;
  const clients: ChatClient[] = [];
  const open = async (user: string, opts = {}): Promise<ChatClient> => {
    const c = bridge.client(user, opts);
    clients.push(c);
    await c.connect();
    return c;
  };
  /** Runs a command, waiting out the sender's own rate limits (the budget is small for everyone). */
  const retrying = async <T>(command: () => Promise<T>): Promise<T> => {
    for (;;) {
      try {
        return await command();
      } catch (err) {
        if (!(err instanceof RateLimited)) throw err;
        await new Promise((r) => setTimeout(r, err.retryAfter * 1000));
      }
    }
  };
  const send = (from: ChatClient, cid: string, body: string): Promise<Message> =>
    retrying(() => from.sendMessage(cid, body));

  before(async () => {
    // each user's commands may cause 4 events a second, 4 at once
    bridge = await Bridge.start({ name: "catchup", args: ["--cost-limit", "4", "--cost-burst", "4"] });
    proxy = await Proxy.start(bridge.port);
  });
  after(async () => {
    proxy.refusing = false;
    await Promise.all(clients.map((c) => c.close()));
    await proxy.close();
    await bridge.stop();
  });

  test("a refused page is asked again after retry_after: every missed message arrives", async () => {
    const carol = await open("carol", { url: proxy.url });
    const added: ChatEvent[] = [];
    carol.on("message-added", (e) => {
      added.push(e);
    });
    const refusals: number[] = [];
    carol.mqtt!.on("message", (_topic, payload) => {
      const body = JSON.parse(payload.toString());
      if (body.type === "error" && body.data?.code === "rate-limited" && body.data?.command === "get-messages") {
        refusals.push(body.data.retry_after);
      }
    });
    const bob = await open("bob");
    const dave = await open("dave");
    const withBob = (await retrying(() => bob.createDirect("carol"))).conversation_id;
    const withDave = (await retrying(() => dave.createDirect("carol"))).conversation_id;
    await until(() => carol.cursors.has(withBob) && carol.cursors.has(withDave), "carol to learn of both");

    proxy.refusing = true;
    proxy.cut();
    await until(() => carol.state === "reconnecting", "carol to notice the lost connection");
    const missed = await Promise.all([
      (async () => [await send(bob, withBob, "b1"), await send(bob, withBob, "b2"), await send(bob, withBob, "b3")])(),
      (async () => [await send(dave, withDave, "d1"), await send(dave, withDave, "d2"), await send(dave, withDave, "d3")])(),
    ]);
    proxy.refusing = false;

    const ids = missed.flat().map((m) => m.message_id);
    await until(() => ids.every((id) => added.some((e) => e.message!.message_id === id)), "carol's catch-up", 30_000);
    assert.ok(refusals.length > 0, "the budget never refused a catch-up page: the test does not test anything");
    assert.ok(added.filter((e) => e.catchUp).length >= ids.length);
    for (const id of ids) assert.equal(added.filter((e) => e.message!.message_id === id).length, 1);
  });
});
