#!/usr/bin/env node
// Removes the output directories named on the command line (inside clients/js), so that a build or a
// test run never picks up files of sources that are gone.
import { rmSync } from "node:fs";
import { dirname, relative, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const root = resolve(dirname(fileURLToPath(import.meta.url)), "..");
for (const name of process.argv.slice(2)) {
  const dir = resolve(root, name);
  if (relative(root, dir).startsWith("..") || dir === root) throw new Error(`${name} is not inside ${root}`);
  rmSync(dir, { recursive: true, force: true });
}
