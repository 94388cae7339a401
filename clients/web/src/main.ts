// Entry point: reads /config.json (where the broker's WebSocket listener is, the topic prefix, whether
// accounts are on), shows the login form, connects the SDK's ChatClient and hands over to ChatView.

import { ChatView } from "./app";
import { byId } from "./dom";
import { createClient } from "./sdk";
import type { ChatApi, PageConfig } from "./types";

const USER_ID = /^[A-Za-z0-9_-]{1,64}$/;
const STORED_URL = "chat-bridge.broker-url";
const STORED_USER = "chat-bridge.user";

const el = {
  login: byId("login"),
  form: byId<HTMLFormElement>("login-form"),
  hint: byId("login-hint"),
  user: byId<HTMLInputElement>("login-user"),
  passwordRow: byId("login-password-row"),
  password: byId<HTMLInputElement>("login-password"),
  advanced: byId<HTMLDetailsElement>("login-advanced"),
  url: byId<HTMLInputElement>("login-url"),
  submit: byId<HTMLButtonElement>("login-submit"),
  error: byId("login-error"),
  banner: byId("banner"),
};

let config: PageConfig = { ws_url: null, prefix: "chat/v1", accounts: null };
let chat: ChatApi | null = null;
let view: ChatView | null = null;

function banner(text: string | null, kind: "warn" | "ok" = "warn"): void {
  el.banner.hidden = !text;
  el.banner.textContent = text ?? "";
  el.banner.dataset.kind = kind;
}

async function loadConfig(): Promise<PageConfig> {
  try {
    const res = await fetch("config.json", { cache: "no-store" });
    if (res.ok) return { ...config, ...(await res.json()) };
  } catch {
    // served from elsewhere (a file, another server): the form asks for the broker
  }
  return config;
}

function storage(): Storage | null {
  try {
    return window.localStorage;
  } catch {
    return null;
  }
}

function prepareForm(): void {
  const stored = storage();
  el.user.value = stored?.getItem(STORED_USER) ?? "";
  el.url.value = stored?.getItem(STORED_URL) || config.ws_url || "";
  // accounts: true needs a password; null (an external broker: unknown) offers the field
  el.passwordRow.hidden = config.accounts === false;
  if (!config.ws_url) {
    el.advanced.open = true;
    el.hint.textContent = "Log in to chat. This bridge uses an external broker: give its WebSocket URL.";
  }
  el.login.hidden = false;
  (el.user.value ? (el.passwordRow.hidden ? el.submit : el.password) : el.user).focus();
}

async function logIn(ev: Event): Promise<void> {
  ev.preventDefault();
  const user = el.user.value.trim();
  const url = el.url.value.trim();
  el.error.textContent = "";
  if (!USER_ID.test(user)) {
    el.error.textContent = "A user id is 1–64 letters, digits, _ or -.";
    el.user.focus();
    return;
  }
  if (!/^wss?:\/\//.test(url)) {
    el.error.textContent = "The broker's WebSocket URL starts with ws:// or wss://.";
    el.advanced.open = true;
    el.url.focus();
    return;
  }
  el.submit.disabled = true;
  el.submit.textContent = "Connecting…";
  const client = createClient({
    user,
    url,
    password: el.password.value || undefined,
    prefix: config.prefix,
  });
  const pending = new ChatView({ chat: client, onLogout: () => void logOut(), banner });
  try {
    const session = await client.connect();
    chat = client;
    view = pending;
    const stored = storage();
    stored?.setItem(STORED_USER, user);
    if (url !== config.ws_url) stored?.setItem(STORED_URL, url);
    else stored?.removeItem(STORED_URL);
    el.password.value = "";
    el.login.hidden = true;
    banner(null);
    view.start(session);
    document.title = `${user} — chat-bridge`;
  } catch (err) {
    pending.destroy();
    void client.close().catch(() => undefined);
    el.error.textContent = `Could not connect: ${err instanceof Error ? err.message : String(err)}`;
  } finally {
    el.submit.disabled = false;
    el.submit.textContent = "Log in";
  }
}

async function logOut(): Promise<void> {
  const client = chat;
  view?.destroy();
  view = null;
  chat = null;
  banner(null);
  document.title = "chat-bridge";
  await client?.close().catch(() => undefined);
  prepareForm();
}

async function main(): Promise<void> {
  config = await loadConfig();
  el.form.addEventListener("submit", (ev) => void logIn(ev));
  prepareForm();
}

void main();
