#!/usr/bin/env node
// Writes src/generated/protocol.ts from the protocol's JSON Schemas (../../schemas), so that the SDK's
// types cannot drift from what the bridge sends and accepts. `--check` compares instead of writing
// and exits 1 (printing the first difference) when the file is not what the schemas give.
// No dependencies: it reads the subset of JSON Schema that bridge/protocol.py produces.
import { readFileSync, readdirSync, writeFileSync, mkdirSync, existsSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const root = resolve(here, "..");
const schemas = resolve(root, process.env.CHAT_BRIDGE_SCHEMAS ?? "../../schemas");
const target = join(root, "src", "generated", "protocol.ts");

const camel = (name) =>
  name
    .split(/[^A-Za-z0-9]+/)
    .filter(Boolean)
    .map((w) => w[0].toUpperCase() + w.slice(1))
    .join("");

const read = (path) => JSON.parse(readFileSync(path, "utf8"));
const jsonFiles = (dir) =>
  readdirSync(dir)
    .filter((f) => f.endsWith(".json"))
    .sort();

function doc(schema, indent) {
  const lines = [];
  if (schema.description) lines.push(...String(schema.description).split("\n"));
  const rules = [];
  for (const key of ["minLength", "maxLength", "minimum", "maximum", "pattern"]) {
    if (schema[key] !== undefined) rules.push(`${key} ${typeof schema[key] === "string" ? "`" + schema[key] + "`" : schema[key]}`);
  }
  if (schema.default !== undefined && schema.default !== null) rules.push(`default ${JSON.stringify(schema.default)}`);
  // constraints of the non-null branch of an optional value
  for (const branch of schema.anyOf ?? []) {
    for (const key of ["minLength", "maxLength", "minimum", "maximum", "pattern"]) {
      if (branch[key] !== undefined) rules.push(`${key} ${typeof branch[key] === "string" ? "`" + branch[key] + "`" : branch[key]}`);
    }
  }
  if (rules.length) lines.push(rules.join("; "));
  if (!lines.length) return "";
  const pad = " ".repeat(indent);
  const safe = lines.map((l) => l.replaceAll("*/", "*\\/"));
  if (safe.length === 1) return `${pad}/** ${safe[0]} */\n`;
  return `${pad}/**\n${safe.map((l) => `${pad} * ${l}`.trimEnd()).join("\n")}\n${pad} */\n`;
}

function typeOf(schema, indent) {
  if (schema === true || schema === undefined) return "unknown";
  if (schema.$ref) {
    const m = /^#\/\$defs\/(.+)$/.exec(schema.$ref);
    if (!m) throw new Error(`unsupported $ref ${schema.$ref}`);
    return m[1];
  }
  if (schema.const !== undefined) return JSON.stringify(schema.const);
  if (schema.enum) return schema.enum.map((v) => JSON.stringify(v)).join(" | ");
  if (schema.anyOf || schema.oneOf) {
    return (schema.anyOf ?? schema.oneOf).map((s) => typeOf(s, indent)).join(" | ");
  }
  const types = Array.isArray(schema.type) ? schema.type : schema.type ? [schema.type] : [];
  if (!types.length) return "unknown";
  return types
    .map((t) => {
      switch (t) {
        case "string":
          return "string";
        case "integer":
        case "number":
          return "number";
        case "boolean":
          return "boolean";
        case "null":
          return "null";
        case "array": {
          const item = typeOf(schema.items, indent);
          return /[ |]/.test(item) ? `Array<${item}>` : `${item}[]`;
        }
        case "object":
          return objectType(schema, indent);
        default:
          throw new Error(`unsupported type ${t}`);
      }
    })
    .join(" | ");
}

function objectType(schema, indent) {
  const props = schema.properties ?? {};
  const names = Object.keys(props);
  if (!names.length) {
    const value = schema.additionalProperties && schema.additionalProperties !== true ? typeOf(schema.additionalProperties, indent) : "unknown";
    return `{ [key: string]: ${value} }`;
  }
  const required = new Set(schema.required ?? []);
  const pad = " ".repeat(indent + 2);
  let out = "{\n";
  for (const name of names) {
    const prop = props[name];
    // an envelope's `type` is always sent (it has a default only because the bridge fills it in)
    const optional = !required.has(name) && prop.const === undefined;
    const key = /^[A-Za-z_$][A-Za-z0-9_$]*$/.test(name) ? name : JSON.stringify(name);
    out += doc(prop, indent + 2) + `${pad}${key}${optional ? "?" : ""}: ${typeOf(prop, indent + 2)};\n`;
  }
  return out + " ".repeat(indent) + "}";
}

function declare(name, schema) {
  const body = typeOf(schema, 0);
  return doc(schema, 0) + (body.startsWith("{\n") ? `export interface ${name} ${body}\n` : `export type ${name} = ${body};\n`);
}

export function generate() {
  const defs = new Map(); // name -> [schema json, file]
  const parts = [];
  const commands = [];
  const events = [];
  const addDefs = (schema, file) => {
    for (const [name, def] of Object.entries(schema.$defs ?? {})) {
      const text = JSON.stringify(def);
      if (defs.has(name) && defs.get(name)[0] !== text) {
        throw new Error(`$defs/${name} differs between ${defs.get(name)[1]} and ${file}`);
      }
      defs.set(name, [text, file]);
    }
  };
  for (const file of jsonFiles(join(schemas, "commands"))) {
    const schema = read(join(schemas, "commands", file));
    addDefs(schema, file);
    const command = file.replace(/\.json$/, "");
    commands.push([command, camel(command) + "Command"]);
    parts.push(declare(camel(command) + "Command", schema));
  }
  for (const file of jsonFiles(join(schemas, "events"))) {
    const schema = read(join(schemas, "events", file));
    addDefs(schema, file);
    const event = file.replace(/\.json$/, "");
    events.push([event, camel(event) + "Event"]);
    parts.push(declare(camel(event) + "Event", schema));
  }
  for (const file of jsonFiles(schemas)) {
    const schema = read(join(schemas, file));
    addDefs(schema, file);
    parts.push(declare(camel(file.replace(/\.json$/, "")), schema));
  }
  const objects = [...defs.keys()].sort().map((name) => declare(name, JSON.parse(defs.get(name)[0])));
  const errorCodes = read(join(schemas, "events", "error.json")).$defs.ErrorData.properties.code.enum;
  const map = (title, pairs) => `export interface ${title} {\n${pairs.map(([k, v]) => `  ${JSON.stringify(k)}: ${v};\n`).join("")}}\n`;
  return [
    "// Generated from the JSON Schemas in schemas/ by clients/js/scripts/generate.mjs. Do not edit:\n" +
      "// `npm run generate` writes it again, `npm run check-generated` fails when it differs.\n",
    "// -- objects inside `data` --\n",
    ...objects,
    "// -- commands, events, retained topics --\n",
    ...parts,
    "/** Each command's fields, by command name. */\n" + map("CommandFields", commands),
    "/** Each event's envelope, by event type. */\n" + map("EventEnvelopes", events),
    `export const COMMAND_NAMES = ${JSON.stringify(commands.map(([c]) => c))} as const;\n`,
    `export const EVENT_TYPES = ${JSON.stringify(events.map(([e]) => e))} as const;\n`,
    `export const ERROR_CODES = ${JSON.stringify(errorCodes)} as const;\n`,
  ].join("\n");
}

const text = generate();
if (process.argv.includes("--check")) {
  const current = existsSync(target) ? readFileSync(target, "utf8") : "";
  if (current !== text) {
    const a = current.split("\n");
    const b = text.split("\n");
    let i = 0;
    while (i < a.length && i < b.length && a[i] === b[i]) i++;
    console.error(
      `${target} differs from what ${schemas} gives (first at line ${i + 1}):\n` +
        `  file:    ${a[i] ?? "<end>"}\n  schemas: ${b[i] ?? "<end>"}\nRun \`npm run generate\` in clients/js.`,
    );
    process.exit(1);
  }
  console.log(`${target} matches ${schemas}`);
} else {
  mkdirSync(dirname(target), { recursive: true });
  writeFileSync(target, text);
  console.log(`wrote ${target}`);
}
