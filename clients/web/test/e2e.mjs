// End-to-end run of the browser client in headless Chromium: two pages (alice and bob) log in to a
// running bridge, create a DM, chat both ways, type, edit, react, delete, read, go offline and catch
// up, page history, search and use a group. Every element is found by its role and accessible name.
//
//   node test/e2e.mjs --url http://127.0.0.1:8080/ [--ws ws://127.0.0.1:9001/mqtt] [--screenshots DIR]
//
// --ws is only needed when /config.json names no WebSocket listener (an external broker). Bob's page
// reaches the broker through a TCP proxy in this script, so that "offline" really drops its
// connection. Prints one line per step and ends with "N passed, N failed"; exit status 1 on failure.

import { mkdtempSync, rmSync, writeFileSync, mkdirSync, readFileSync } from "node:fs";
import net from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { parseArgs } from "node:util";
import { chromium } from "playwright-core";

const { values: args } = parseArgs({
  options: {
    url: { type: "string" },
    ws: { type: "string" },
    screenshots: { type: "string" },
    chromium: { type: "string", default: process.env.CHROMIUM || "/usr/bin/chromium" },
    "seeded-global": { type: "string", default: "0" },
  },
});
if (!args.url) {
  console.error("usage: node test/e2e.mjs --url http://127.0.0.1:8080/ [--ws URL] [--screenshots DIR]");
  process.exit(2);
}
const T = 10_000; // per expectation; the whole run stays well under a minute
const seededGlobal = Number(args["seeded-global"]);

// --- a cuttable TCP proxy in front of the broker's WebSocket listener -------------------------------

const CUT_NOTE = /^WebSocket is already in CLOSING or CLOSED state\.$/;
let cuts = 0; // connections the proxy has cut so far

function proxy(target) {
  const sockets = new Set();
  let up = true;
  const server = net.createServer((client) => {
    if (!up) return client.destroy();
    const upstream = net.connect(target.port, target.hostname);
    for (const s of [client, upstream]) {
      sockets.add(s);
      s.on("close", () => sockets.delete(s));
      s.on("error", () => s.destroy());
    }
    client.pipe(upstream);
    upstream.pipe(client);
    client.on("close", () => upstream.destroy());
    upstream.on("close", () => client.destroy());
  });
  return new Promise((resolve) =>
    server.listen(0, "127.0.0.1", () =>
      resolve({
        port: server.address().port,
        cut() {
          up = false;
          cuts += 1;
          for (const s of sockets) s.destroy();
        },
        restore() {
          up = true;
        },
        close() {
          this.cut();
          server.close();
        },
      }),
    ),
  );
}

// --- steps --------------------------------------------------------------------------------------------

let passed = 0;
let failed = 0;
const started = Date.now();
let current = "start"; // the step running, named in what the pages report
async function step(name, fn) {
  const t0 = Date.now();
  current = name;
  try {
    await fn();
    passed += 1;
    console.log(`ok ${passed + failed} - ${name} (${Date.now() - t0} ms)`);
  } catch (err) {
    failed += 1;
    console.log(`not ok ${passed + failed} - ${name}\n  ${String(err?.stack || err).split("\n").slice(0, 6).join("\n  ")}`);
    throw err;
  }
}

async function until(check, what, timeout = T) {
  const deadline = Date.now() + timeout;
  let last;
  while (Date.now() < deadline) {
    try {
      last = await check();
      if (last) return last;
    } catch (err) {
      last = err;
    }
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error(`timed out waiting for ${what} (last: ${last})`);
}

// Each user has a browser of its own with a fresh profile (--user-data-dir), as two people would.
const FLAGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];
const profiles = [];
const problems = [];
async function open(user) {
  const profile = mkdtempSync(join(tmpdir(), `chat-bridge-e2e-${user}-`));
  profiles.push(profile);
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: args.chromium,
    headless: true,
    args: FLAGS,
    viewport: { width: 1100, height: 680 },
    locale: "en-GB",
    timezoneId: "UTC",
  });
  const page = context.pages()[0] ?? (await context.newPage());
  page.on("pageerror", (err) => problems.push(`${user}: page error: ${err.message}`));
  page.on("console", (msg) => {
    // Chromium's own note when MQTT.js writes to a socket the proxy has just cut (the SDK sends it
    // again on the next connection): the drop is this script's doing, not the page's error
    if (msg.type() === "error" && !(CUT_NOTE.test(msg.text()) && cuts > 0)) problems.push(`${user}: console (${current}): ${msg.text()}`);
  });
  page.setDefaultTimeout(T);
  return { user, context, page };
}

let exitCode = 0;
let bobProxy;
const alice = await open("alice");
const bob = await open("bob");

function log(p) {
  return p.page.getByRole("log");
}
function messageBox(p) {
  return p.page.getByRole("textbox", { name: "Message" });
}
async function send(p, text) {
  await messageBox(p).fill(text);
  await p.page.getByRole("button", { name: "Send" }).click();
  await log(p).getByText(text, { exact: true }).waitFor();
}
function conversation(p, name) {
  return p.page.getByRole("list", { name: "Conversations" }).getByRole("button", { name });
}
function article(p, text) {
  return log(p).getByRole("article").filter({ hasText: text });
}
async function texts(p) {
  return log(p).locator("article .body").allTextContents();
}

try {
  const config = await (await fetch(new URL("config.json", args.url))).json();
  const wsUrl = args.ws || config.ws_url;
  if (!wsUrl) throw new Error("/config.json names no WebSocket listener and no --ws was given");
  const target = new URL(wsUrl);
  bobProxy = await proxy(target);
  const bobUrl = `${target.protocol}//127.0.0.1:${bobProxy.port}${target.pathname}`;

  await step("both pages load; the login form has labelled fields", async () => {
    for (const p of [alice, bob]) {
      const response = await p.page.goto(args.url);
      if (!response.ok()) throw new Error(`GET / answered ${response.status()}`);
      const csp = response.headers()["content-security-policy"] || "";
      if (!csp.includes("script-src 'self'")) throw new Error(`no CSP on /: ${csp}`);
      await p.page.getByLabel("User", { exact: true }).waitFor();
      if (config.accounts === false && (await p.page.getByLabel("Password", { exact: true }).isVisible())) {
        throw new Error("a password field without accounts");
      }
    }
  });

  await step("alice and bob log in (bob's page through a proxy it can lose)", async () => {
    for (const [p, url] of [
      [alice, args.ws || null],
      [bob, bobUrl],
    ]) {
      await p.page.getByLabel("User", { exact: true }).fill(p.user);
      if (url) {
        const field = p.page.getByLabel("Broker WebSocket URL");
        if (!(await field.isVisible())) await p.page.getByText("Broker", { exact: true }).click();
        await p.page.getByLabel("Broker WebSocket URL").fill(url);
      }
      await p.page.getByRole("button", { name: "Log in" }).click();
    }
    for (const p of [alice, bob]) {
      await p.page.getByRole("heading", { name: "Conversations" }).waitFor();
      await conversation(p, /global/).waitFor();
    }
  });

  await step("presence: each sees the other online", async () => {
    await alice.page.getByRole("list", { name: "Online" }).getByRole("button", { name: "bob" }).waitFor();
    await bob.page.getByRole("list", { name: "Online" }).getByRole("button", { name: "alice" }).waitFor();
  });

  await step("alice creates a DM with bob and sends; bob sees 1 unread", async () => {
    await alice.page.getByText("New conversation", { exact: true }).click();
    await alice.page.getByRole("group", { name: "New conversation" }).waitFor();
    await alice.page.getByRole("textbox", { name: "Start a direct conversation with" }).fill("bob");
    await alice.page.getByRole("button", { name: "Start" }).click();
    await alice.page.getByRole("heading", { name: "bob", level: 2 }).waitFor();
    await send(alice, "Hello Bob!");
    await conversation(bob, /alice.*1 unread/).waitFor();
  });

  await step("accessible names: 'Message' (not exact) is the message box alone, 'Send', a log, the named group", async () => {
    // the "New conversation" group is still open beside the conversation: its fields must not match
    const boxes = await alice.page.getByRole("textbox", { name: "Message" }).count();
    if (boxes !== 1) throw new Error(`getByRole('textbox', {name: 'Message'}) matches ${boxes} elements`);
    await alice.page.getByRole("textbox", { name: "Message", exact: true }).waitFor();
    await alice.page.getByRole("button", { name: "Send", exact: true }).waitFor();
    await alice.page.getByRole("log", { name: "Messages" }).waitFor();
    const sidebar = await alice.page.getByRole("complementary", { name: "Sidebar" }).ariaSnapshot();
    if (!/group "New conversation"/.test(sidebar)) throw new Error(`the group has no name:\n${sidebar}`);
  });

  await step("bob opens it: the message is there, the unread count goes, alice sees 'Seen by bob'", async () => {
    await conversation(bob, /alice/).click();
    await log(bob).getByText("Hello Bob!", { exact: true }).waitFor();
    await until(async () => !(await conversation(bob, /alice.*unread/).count()), "bob's unread count to clear");
    await log(alice).getByText("Seen by bob").waitFor();
  });

  await step("typing: bob types, alice sees 'bob is typing…'; bob sends with Enter", async () => {
    await messageBox(bob).pressSequentially("Hi Alice", { delay: 10 });
    await alice.page.getByRole("status").filter({ hasText: "bob is typing…" }).waitFor();
    await messageBox(bob).press("Enter");
    await log(alice).getByText("Hi Alice", { exact: true }).waitFor();
    await until(async () => !(await alice.page.getByText("bob is typing…").count()), "the typing indicator to go");
  });

  await step("alice edits her message; bob sees the new text and (edited)", async () => {
    const mine = article(alice, "Hello Bob!");
    await mine.hover();
    await mine.getByRole("button", { name: "Edit" }).click();
    const box = alice.page.getByRole("textbox", { name: "Edit message" });
    await box.fill("Hello Bob, edited!");
    await box.press("Enter");
    await log(bob).getByText("Hello Bob, edited!", { exact: true }).waitFor();
    await article(bob, "Hello Bob, edited!").getByText("(edited)").waitFor();
  });

  await step("bob reacts 👍 to it; both see the reaction; bob's second click takes it back", async () => {
    const theirs = article(bob, "Hello Bob, edited!");
    await theirs.hover();
    await theirs.getByRole("button", { name: "React 👍" }).click();
    await article(alice, "Hello Bob, edited!").getByRole("button", { name: /👍 1: bob/ }).waitFor();
    const chip = article(bob, "Hello Bob, edited!").getByRole("button", { name: /👍 1: bob/ });
    if ((await chip.getAttribute("aria-pressed")) !== "true") throw new Error("bob's own reaction is not pressed");
    await chip.click();
    await until(async () => !(await article(alice, "Hello Bob, edited!").locator(".chip").count()), "the reaction to go");
    await theirs.hover();
    await theirs.getByRole("button", { name: "React 🎉" }).click();
    await article(alice, "Hello Bob, edited!").getByRole("button", { name: /🎉 1: bob/ }).waitFor();
  });

  await step("alice deletes a message; bob sees the tombstone", async () => {
    await send(alice, "oops, wrong chat");
    await log(bob).getByText("oops, wrong chat", { exact: true }).waitFor();
    const mine = article(alice, "oops, wrong chat");
    await mine.hover();
    await mine.getByRole("button", { name: "Delete" }).click();
    await log(bob).getByText("This message was deleted").waitFor();
    if (await log(bob).getByText("oops, wrong chat").count()) throw new Error("the deleted text is still shown");
  });

  await step("a short network drop the connection survives: the banner comes, goes, messages keep coming", async () => {
    // the WebSocket stays open (the proxy is not cut), so the SDK stays online and says nothing
    await bob.context.setOffline(true);
    await bob.page.getByRole("status").filter({ hasText: /offline — reconnecting/i }).waitFor();
    await bob.context.setOffline(false);
    await until(async () => !(await bob.page.locator("#banner").isVisible()), "the banner to go after the drop", 5_000);
    await send(alice, "Still there, Bob?");
    await log(bob).getByText("Still there, Bob?", { exact: true }).waitFor();
    if (await bob.page.locator("#banner").isVisible()) throw new Error("the banner came back");
  });

  await step("bob goes offline ('offline — reconnecting' shown); alice's page sees him leave", async () => {
    await bob.context.setOffline(true);
    bobProxy.cut();
    await bob.page.getByRole("status").filter({ hasText: /offline — reconnecting/i }).waitFor();
    await until(
      async () => !(await alice.page.getByRole("list", { name: "Online" }).getByRole("button", { name: "bob" }).count()),
      "bob to leave alice's online list",
    );
  });

  const away = ["While you were away 1", "While you were away 2", "While you were away 3"];
  await step("alice sends three messages while bob is away", async () => {
    for (const text of away) await send(alice, text);
  });

  await step("bob comes back and catches up: each message once, in order", async () => {
    if (args.screenshots) mkdirSync(args.screenshots, { recursive: true });
    if (args.screenshots) await bob.page.screenshot({ path: join(args.screenshots, "offline-reconnecting.png") });
    bobProxy.restore();
    await bob.context.setOffline(false);
    await until(async () => (await texts(bob)).includes(away[2]), "the catch-up");
    await until(async () => !(await bob.page.locator("#banner").isVisible()), "the banner to go");
    const shown = (await texts(bob)).filter((t) => t.startsWith("While you were away"));
    if (JSON.stringify(shown) !== JSON.stringify(away)) throw new Error(`bob shows ${JSON.stringify(shown)}`);
    const all = await log(bob).getByRole("article").evaluateAll((els) => els.map((e) => Number(e.dataset.seq)));
    if (all.some((s, i) => i && s <= all[i - 1])) throw new Error(`not in seq order: ${all}`);
    await alice.page.getByRole("list", { name: "Online" }).getByRole("button", { name: "bob" }).waitFor();
  });

  if (args.screenshots) {
    mkdirSync(args.screenshots, { recursive: true });
    await step("screenshots of both pages", async () => {
      await alice.page.mouse.move(0, 0);
      await bob.page.mouse.move(0, 0);
      await messageBox(alice).fill("");
      const a = await alice.page.screenshot({ path: join(args.screenshots, "alice.png") });
      const b = await bob.page.screenshot({ path: join(args.screenshots, "bob.png") });
      const side = await alice.context.newPage();
      await side.setViewportSize({ width: 2220, height: 720 });
      const img = (buf) => `data:image/png;base64,${buf.toString("base64")}`;
      await side.setContent(
        `<body style="margin:0;background:#cfd4dc;display:flex;gap:20px;padding:20px">` +
          `<img src="${img(a)}" width="1090"><img src="${img(b)}" width="1090"></body>`,
      );
      await side.screenshot({ path: join(args.screenshots, "two-pages-chat.png") });
      await side.close();
    });
  }

  await step("search finds alice's messages", async () => {
    await bob.page.getByRole("searchbox", { name: "Search messages" }).fill("away");
    await bob.page.getByRole("searchbox", { name: "Search messages" }).press("Enter");
    const results = bob.page.getByRole("region", { name: /Search/ });
    await results.getByText("3 found").waitFor();
    await results.getByRole("button", { name: /While you were away 2/ }).click();
    await log(bob).getByText("While you were away 2", { exact: true }).waitFor();
  });

  if (seededGlobal > 0) {
    await step(`history: 'Load older' pages the ${seededGlobal} messages of global`, async () => {
      await conversation(alice, /global/).click();
      await until(async () => (await log(alice).getByRole("article").count()) === Math.min(50, seededGlobal), "the newest page");
      await alice.page.getByRole("button", { name: "Load older" }).click();
      await until(async () => (await log(alice).getByRole("article").count()) === seededGlobal, "the older page");
      const first = (await texts(alice))[0];
      if (first !== "seed 1") throw new Error(`the oldest message shown is ${first}`);
      if (await alice.page.getByRole("button", { name: "Load older" }).isVisible()) throw new Error("Load older still shown");
    });
  }

  await step("a group: alice creates it, bob sees it, bob leaves", async () => {
    await alice.page.getByText("New conversation", { exact: true }).click();
    await alice.page.getByLabel("Group participants").fill("bob");
    await alice.page.getByLabel("Group title").fill("Team");
    await alice.page.getByRole("button", { name: "Create group" }).click();
    await alice.page.getByRole("heading", { name: "Team", level: 2 }).waitFor();
    await send(alice, "Welcome to the team");
    await conversation(bob, /Team.*1 unread/).click();
    await log(bob).getByText("Welcome to the team").waitFor();
    await bob.page.getByRole("button", { name: "Leave" }).click();
    await until(async () => !(await conversation(bob, /Team/).count()), "Team to leave bob's list");
    await until(async () => !/bob/.test(await alice.page.locator("#conv-sub").textContent()), "bob to leave the group");
  });

  await step("no page errors", async () => {
    const real = problems.filter((p) => !/WebSocket connection to .* failed|ERR_INTERNET_DISCONNECTED/.test(p));
    if (real.length) throw new Error(real.join("\n"));
  });
} catch (err) {
  exitCode = 1;
  if (!failed) console.log(`not ok - ${String(err?.stack || err)}`);
  for (const p of [alice, bob]) {
    const path = join(tmpdir(), `chat-bridge-e2e-${p.user}-failure.png`);
    await p.page.screenshot({ path }).catch(() => undefined);
    console.log(`# ${p.user}'s page at the failure: ${path}`);
  }
  for (const line of problems) console.log(`# ${line}`);
} finally {
  bobProxy?.close();
  for (const p of [alice, bob]) await p.context.close().catch(() => undefined);
  for (const profile of profiles) rmSync(profile, { recursive: true, force: true });
}
console.log(`# ${((Date.now() - started) / 1000).toFixed(1)} s`);
console.log(`${passed} passed, ${failed} failed`);
process.exit(exitCode || (failed ? 1 : 0));
