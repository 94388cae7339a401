// Test helpers: a real `chat-bridge serve` in a child process, an optional Mosquitto, and a TCP proxy
// that can cut connections. Everything waits on events with timeouts; nothing sleeps a fixed time.
import { type ChildProcess, spawn, spawnSync } from "node:child_process";
import { existsSync, mkdtempSync, openSync, readFileSync, rmSync, writeFileSync, closeSync } from "node:fs";
import net from "node:net";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

import { connect as mqttConnect } from "mqtt";

import { ChatClient, type ChatClientOptions } from "../src/index.js";

const here = dirname(fileURLToPath(import.meta.url));
// build/test -> clients/js -> repository
export const PACKAGE = resolve(here, "..", "..");
export const REPO = resolve(PACKAGE, "..", "..");
export const CHAT_BRIDGE = process.env.CHAT_BRIDGE_EXE ?? join(REPO, ".venv", "bin", "chat-bridge");

export function freePort(): Promise<number> {
  return new Promise((ok, fail) => {
    const server = net.createServer();
    server.once("error", fail);
    server.listen(0, "127.0.0.1", () => {
      const port = (server.address() as net.AddressInfo).port;
      server.close(() => ok(port));
    });
  });
}

export function tempDir(name: string): string {
  return mkdtempSync(join(tmpdir(), `chat-bridge-js-${name}-`));
}

/** Resolves when `check()` is true, polling on a short interval until the deadline. */
export async function until(check: () => boolean | Promise<boolean>, what: string, timeout = 10_000): Promise<void> {
  const deadline = Date.now() + timeout;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** Waits for the retained bridge/status to be online with an epoch other than `notEpoch`. */
export function waitOnline(url: string, notEpoch: string | null, timeout = 30_000, prefix = "chat/v1"): Promise<string> {
  return new Promise((ok, fail) => {
    const client = mqttConnect(url, { clientId: `probe:p${Math.random().toString(16).slice(2, 10)}`, reconnectPeriod: 100 });
    const timer = setTimeout(() => {
      client.end(true);
      fail(new Error(`the bridge at ${url} did not come online within ${timeout} ms`));
    }, timeout);
    client.on("connect", () => client.subscribe(`${prefix}/bridge/status`, { qos: 1 }));
    client.on("message", (_topic, payload) => {
      try {
        const status = JSON.parse(payload.toString());
        if (status.status === "online" && typeof status.epoch === "string" && status.epoch !== notEpoch) {
          clearTimeout(timer);
          client.end(true);
          ok(status.epoch);
        }
      } catch {
        /* not JSON */
      }
    });
    client.on("error", () => undefined);
  });
}

export interface BridgeOptions {
  /** An external broker (mqtt://host:port); default: the embedded one on a free port. */
  brokerUrl?: string;
  args?: string[];
  name?: string;
  /** Let the embedded broker serve MQTT over WebSockets too (on a free port: see wsUrl); default off. */
  ws?: boolean;
}

/** `chat-bridge serve` in a child process; restart() keeps its port and database. */
export class Bridge {
  readonly dir: string;
  readonly port: number;
  readonly url: string;
  /** The embedded broker's MQTT over WebSockets (null unless started with `ws: true`). */
  readonly wsUrl: string | null;
  epoch: string | null = null;
  private proc: ChildProcess | null = null;

  private constructor(
    readonly options: BridgeOptions,
    port: number,
    private readonly wsPort: number | null,
  ) {
    this.dir = tempDir(options.name ?? "bridge");
    this.port = port;
    this.url = options.brokerUrl ?? `mqtt://127.0.0.1:${port}`;
    this.wsUrl = wsPort === null ? null : `ws://127.0.0.1:${wsPort}/mqtt`;
  }

  static async start(options: BridgeOptions = {}): Promise<Bridge> {
    const port = options.brokerUrl ? Number(new URL(options.brokerUrl).port) : await freePort();
    const bridge = new Bridge(options, port, options.ws && !options.brokerUrl ? await freePort() : null);
    await bridge.run();
    return bridge;
  }

  get logPath(): string {
    return join(this.dir, "chat-bridge.log");
  }

  log(): string {
    return existsSync(this.logPath) ? readFileSync(this.logPath, "utf8") : "";
  }

  get pid(): number {
    return this.proc?.pid ?? -1;
  }

  private async run(): Promise<void> {
    const args = ["serve", "--database-url", `sqlite:///${join(this.dir, "db.sqlite3")}`, "--http-listen", "off"];
    if (this.options.brokerUrl) args.push("--broker-url", this.options.brokerUrl);
    else {
      args.push("--listen", `127.0.0.1:${this.port}`);
      // never the default 127.0.0.1:9001, which another broker may hold
      args.push("--ws-listen", this.wsPort === null ? "off" : `127.0.0.1:${this.wsPort}`);
    }
    args.push(...(this.options.args ?? []));
    const env = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith("CHAT_BRIDGE_")));
    const out = openSync(this.logPath, "a");
    const proc = spawn(CHAT_BRIDGE, args, { stdio: ["ignore", out, out], env });
    closeSync(out);
    this.proc = proc;
    const exited = new Promise<never>((_, fail) =>
      proc.once("exit", (code) => fail(new Error(`chat-bridge exited (${code}) before it came online:\n${this.log()}`))),
    );
    try {
      this.epoch = await Promise.race([waitOnline(this.url, this.epoch), exited]);
    } catch (err) {
      this.kill("SIGKILL");
      throw err;
    }
    exited.catch(() => undefined);
  }

  kill(signal: NodeJS.Signals = "SIGTERM"): Promise<void> {
    const proc = this.proc;
    if (proc === null || proc.exitCode !== null || proc.signalCode !== null) return Promise.resolve();
    return new Promise((ok) => {
      proc.once("exit", () => ok());
      proc.kill(signal);
    });
  }

  async restart(signal: NodeJS.Signals = "SIGTERM"): Promise<void> {
    await this.kill(signal);
    await this.run();
  }

  async stop(): Promise<void> {
    await this.kill("SIGTERM");
    rmSync(this.dir, { recursive: true, force: true });
  }

  client(user: string, options: Partial<ChatClientOptions> = {}): ChatClient {
    return new ChatClient({ user, url: this.url, timeout: 10_000, reconnectPeriod: 200, ...options });
  }
}

/** A Mosquitto of our own on a free port (null where it is not installed). */
export class Mosquitto {
  private constructor(
    readonly port: number,
    readonly dir: string,
    private readonly proc: ChildProcess,
  ) {}

  get url(): string {
    return `mqtt://127.0.0.1:${this.port}`;
  }

  static binary(): string | null {
    for (const path of ["/usr/sbin/mosquitto", "/usr/bin/mosquitto", "/usr/local/sbin/mosquitto"]) {
      if (existsSync(path)) return path;
    }
    const found = spawnSync("sh", ["-c", "command -v mosquitto"], { encoding: "utf8" });
    return found.status === 0 && found.stdout.trim() ? found.stdout.trim() : null;
  }

  static async start(): Promise<Mosquitto> {
    const bin = Mosquitto.binary();
    if (bin === null) throw new Error("mosquitto is not installed");
    const port = await freePort();
    const dir = tempDir("mosquitto");
    const conf = join(dir, "mosquitto.conf");
    writeFileSync(conf, `listener ${port} 127.0.0.1\nallow_anonymous true\npersistence false\n`);
    const proc = spawn(bin, ["-c", conf], { stdio: "ignore" });
    await until(
      () =>
        new Promise<boolean>((ok) => {
          const s = net.connect(port, "127.0.0.1", () => {
            s.destroy();
            ok(true);
          });
          s.on("error", () => ok(false));
        }),
      "mosquitto to listen",
    );
    return new Mosquitto(port, dir, proc);
  }

  stop(): Promise<void> {
    return new Promise((ok) => {
      if (this.proc.exitCode !== null) return ok();
      this.proc.once("exit", () => {
        rmSync(this.dir, { recursive: true, force: true });
        ok();
      });
      this.proc.kill("SIGTERM");
    });
  }
}

/** A TCP proxy to a broker that can cut every connection (as a network failure would) and refuse new ones. */
export class Proxy {
  refusing = false;
  accepted = 0;
  private readonly sockets = new Set<net.Socket>();

  private constructor(
    private readonly server: net.Server,
    readonly port: number,
  ) {}

  get url(): string {
    return `mqtt://127.0.0.1:${this.port}`;
  }

  static start(targetPort: number): Promise<Proxy> {
    return new Promise((ok) => {
      let proxy: Proxy;
      const server = net.createServer((client) => {
        if (proxy.refusing) {
          client.destroy();
          return;
        }
        proxy.accepted += 1;
        const upstream = net.connect(targetPort, "127.0.0.1");
        for (const s of [client, upstream]) {
          proxy.sockets.add(s);
          s.on("close", () => proxy.sockets.delete(s));
          s.on("error", () => undefined);
        }
        client.pipe(upstream);
        upstream.pipe(client);
        client.on("close", () => upstream.destroy());
        upstream.on("close", () => client.destroy());
      });
      server.listen(0, "127.0.0.1", () => {
        proxy = new Proxy(server, (server.address() as net.AddressInfo).port);
        ok(proxy);
      });
    });
  }

  /** Cuts every open connection without an MQTT DISCONNECT, so the broker publishes their wills. */
  cut(): void {
    for (const s of this.sockets) s.resetAndDestroy();
  }

  close(): Promise<void> {
    this.cut();
    return new Promise((ok) => this.server.close(() => ok()));
  }
}

/** A raw MQTT.js client (for publishing what the bridge would, or listening in). */
export async function rawClient(url: string, clientId: string): Promise<ReturnType<typeof mqttConnect>> {
  const client = mqttConnect(url, { clientId, reconnectPeriod: 0 });
  await new Promise<void>((ok, fail) => {
    client.once("connect", () => ok());
    client.once("error", fail);
  });
  return client;
}
