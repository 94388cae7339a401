// The SDK's standalone browser bundle (clients/js: `npm run build` writes dist/browser/) in a page of
// headless Chromium without a bundler: a page served over HTTP imports chat-bridge-client.js as
// docs/sdk-js.md shows, connects to the broker's MQTT over WebSockets, sends a message to `global`
// and sees it come back as an event. Prints a JSON line with what the page saw; exit status 1 on failure.
//
//   node test/sdk-bundle.mjs --ws ws://127.0.0.1:9001/mqtt [--user NAME] [--body TEXT]

import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import http from "node:http";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";
import { chromium } from "playwright-core";

const { values: args } = parseArgs({
  options: {
    ws: { type: "string" },
    user: { type: "string", default: "page" },
    body: { type: "string", default: "hello from a page" },
    chromium: { type: "string", default: process.env.CHROMIUM || "/usr/bin/chromium" },
  },
});
if (!args.ws) {
  console.error("usage: node test/sdk-bundle.mjs --ws ws://127.0.0.1:9001/mqtt");
  process.exit(2);
}

const here = dirname(fileURLToPath(import.meta.url));
const bundle = readFileSync(join(here, "..", "..", "js", "dist", "browser", "chat-bridge-client.js"));
const page = `<!doctype html><meta charset="utf-8"><title>SDK bundle</title>
<script type="module">
  import { ChatClient } from "./chat-bridge-client.js";
  const params = new URLSearchParams(location.search);
  const chat = new ChatClient({ user: params.get("user"), url: params.get("ws"), timeout: 10000 });
  try {
    const echoed = chat.waitFor("message-added", (e) => e.message.body === params.get("body"));
    const session = await chat.connect();
    const sent = await chat.sendMessage("global", params.get("body"));
    const event = await echoed;
    window.result = { ok: true, sessionId: session.session_id, clientId: chat.clientId, sent: sent.message_id,
      event: event.message.message_id, transport: chat.mqtt.options.protocol };
    await chat.close();
  } catch (err) {
    window.result = { ok: false, error: String(err) };
  }
</script>`;

const server = http.createServer((req, res) => {
  const path = new URL(req.url, "http://x").pathname;
  if (path === "/") res.writeHead(200, { "content-type": "text/html" }).end(page);
  else if (path === "/chat-bridge-client.js") res.writeHead(200, { "content-type": "text/javascript" }).end(bundle);
  else res.writeHead(404).end();
});
await new Promise((ok) => server.listen(0, "127.0.0.1", ok));

const FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run"];
FLAGS.push("--disable-background-networking", "--disable-component-update", "--disable-sync");
const profile = mkdtempSync(join(tmpdir(), "chat-bridge-sdk-bundle-"));
const context = await chromium.launchPersistentContext(profile, { executablePath: args.chromium, headless: true, args: FLAGS });
const problems = [];
let result;
try {
  const tab = context.pages()[0] ?? (await context.newPage());
  tab.on("pageerror", (err) => problems.push(`page error: ${err.message}`));
  const query = new URLSearchParams({ user: args.user, ws: args.ws, body: args.body });
  await tab.goto(`http://127.0.0.1:${server.address().port}/?${query}`);
  await tab.waitForFunction(() => window.result !== undefined, null, { timeout: 30_000 });
  result = await tab.evaluate(() => window.result);
} catch (err) {
  result = { ok: false, error: String(err) };
} finally {
  await context.close();
  server.close();
  rmSync(profile, { recursive: true, force: true });
}
if (problems.length) result = { ...result, ok: false, problems };
console.log(JSON.stringify(result));
process.exit(result.ok ? 0 : 1);
