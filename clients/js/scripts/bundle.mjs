#!/usr/bin/env node
// Writes dist/browser/chat-bridge-client.js: the SDK and MQTT.js's browser build in one ES module, for
// a page without a bundler (`<script type="module">` importing it). Bundlers need none of this: they
// take dist/index.js and pick MQTT.js's browser build themselves.
import { mkdirSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import * as esbuild from "esbuild";

const root = resolve(dirname(fileURLToPath(import.meta.url)), "..");
const outfile = join(root, "dist", "browser", "chat-bridge-client.js");
mkdirSync(dirname(outfile), { recursive: true });

const result = await esbuild.build({
  absWorkingDir: root,
  entryPoints: ["src/index.ts"],
  outfile,
  bundle: true,
  format: "esm",
  platform: "browser",
  target: ["es2022"],
  minify: true,
  sourcemap: true,
  legalComments: "eof",
  charset: "utf8",
  logLevel: "warning",
  metafile: true,
});
const bytes = result.metafile.outputs[join("dist", "browser", "chat-bridge-client.js")]?.bytes ?? 0;
console.log(`wrote ${outfile} (${bytes} bytes)`);
