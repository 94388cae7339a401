// Builds the page into bridge/web/ (index.html, app.js, app.css), which the Python package ships.
// `node build.mjs --check` builds in memory and fails when the committed files differ (drift).
// esbuild's output depends only on its version (pinned) and the sources, so a build is reproducible.

import { readFile, writeFile, mkdir } from "node:fs/promises";
import { dirname, join, relative } from "node:path";
import { fileURLToPath } from "node:url";
import * as esbuild from "esbuild";

const here = dirname(fileURLToPath(import.meta.url));
export const outDir = join(here, "..", "..", "bridge", "web");

// The SDK's `import mqtt from "mqtt"` gets MQTT.js's browser build (the "browser" condition of its
// package.json), from the copy clients/js installed (its package-lock.json pins it).

/** Every output file: name in bridge/web/ -> contents. */
export async function build() {
  const common = {
    bundle: true,
    minify: true,
    write: false,
    legalComments: "eof",
    charset: "utf8",
    logLevel: "warning",
    absWorkingDir: here,
  };
  const js = await esbuild.build({
    ...common,
    entryPoints: ["src/main.ts"],
    format: "esm",
    platform: "browser",
    target: ["es2022"],
    outfile: "app.js",
  });
  const css = await esbuild.build({
    ...common,
    entryPoints: ["src/app.css"],
    outfile: "app.css",
  });
  const files = new Map();
  for (const out of [...js.outputFiles, ...css.outputFiles]) {
    files.set(relative(here, out.path), Buffer.from(out.contents));
  }
  for (const name of ["index.html", "favicon.svg"]) files.set(name, await readFile(join(here, name)));
  return files;
}

async function main() {
  const check = process.argv.includes("--check");
  const files = await build();
  const stale = [];
  for (const [name, contents] of files) {
    const target = join(outDir, name);
    if (check) {
      const current = await readFile(target).catch(() => null);
      if (!current || !current.equals(contents)) stale.push(name);
    } else {
      await mkdir(dirname(target), { recursive: true });
      await writeFile(target, contents);
      console.log(`bridge/web/${name}  ${contents.length} bytes`);
    }
  }
  if (stale.length) {
    console.error(`bridge/web/ differs from a fresh build: ${stale.join(", ")} (run npm run build in clients/web)`);
    process.exit(1);
  }
  if (check) console.log(`bridge/web/ matches a fresh build (${[...files.keys()].join(", ")})`);
}

if (process.argv[1] === fileURLToPath(import.meta.url)) await main();
