// The drift check of the generated types: `npm run check-generated` (scripts/generate.mjs --check)
// passes on the schemas the types came from and fails once a schema changes.
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { cpSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";

import { PACKAGE, REPO, tempDir } from "./helpers.js";

function check(schemas: string): { status: number | null; output: string } {
  const env = { ...process.env, CHAT_BRIDGE_SCHEMAS: schemas };
  const done = spawnSync(process.execPath, [join(PACKAGE, "scripts", "generate.mjs"), "--check"], { env, encoding: "utf8" });
  return { status: done.status, output: done.stdout + done.stderr };
}

describe("check-generated", () => {
  let dir: string;
  let schemas: string;

  before(() => {
    dir = tempDir("schemas");
  });
  after(() => rmSync(dir, { recursive: true, force: true }));

  const copy = (name: string): string => {
    schemas = join(dir, name);
    cpSync(join(REPO, "schemas"), schemas, { recursive: true });
    return schemas;
  };
  const edit = (file: string, change: (schema: Record<string, any>) => void): void => {
    const path = join(schemas, file);
    const schema = JSON.parse(readFileSync(path, "utf8"));
    change(schema);
    writeFileSync(path, JSON.stringify(schema, null, 2));
  };

  test("passes on an unchanged copy of schemas/", () => {
    const done = check(copy("same"));
    assert.equal(done.status, 0, done.output);
    assert.match(done.output, /matches/);
  });

  test("fails when a command gains a field", () => {
    copy("field");
    edit("commands/send-message.json", (s) => {
      s.properties.priority = { type: "integer" };
    });
    const done = check(schemas);
    assert.equal(done.status, 1, done.output);
    assert.match(done.output, /differs from what .* gives/);
    assert.match(done.output, /priority\?: number;/);
  });

  test("fails when an error code is added", () => {
    copy("code");
    edit("events/error.json", (s) => {
      s.$defs.ErrorData.properties.code.enum.push("teapot");
    });
    const done = check(schemas);
    assert.equal(done.status, 1, done.output);
    assert.match(done.output, /teapot/);
  });

  test("fails when a field changes type (a file of the same length)", () => {
    copy("type");
    edit("commands/mark-read.json", (s) => {
      s.properties.seq.type = "string";
    });
    const done = check(schemas);
    assert.equal(done.status, 1, done.output);
    assert.match(done.output, /file: +seq: number;\n +schemas: +seq: string;/);
  });

  test("fails when a command's schema is removed", () => {
    copy("gone");
    rmSync(join(schemas, "commands", "typing.json"));
    const done = check(schemas);
    assert.equal(done.status, 1, done.output);
  });
});
