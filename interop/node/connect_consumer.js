#!/usr/bin/env node
'use strict';
// A Node.js agency calling a service through the broker's HTTP entry with the Connect
// protocol (@connectrpc/connect-node), as a JavaScript web application would. The services
// come from the broker's own FileDescriptorSet at run time: no generated code.
//
//   node connect_consumer.js --url https://HOST:PORT --credentials DIR --contracts FILE
//                            [--http-version 2|1.1] [--codec json|proto] [--gzip]
//                            [--timeout SECONDS] [CALL]
//
// --credentials is an agency bundle (ca.crt, agency.crt, agency.key): the client presents
// the certificate and verifies the broker by the URL's host name. --contracts is a
// FileDescriptorSet with its imports (build/contracts.pb). --gzip compresses every request
// message, however small.
//
// CALL (JSON; "-" or left out to read it from stdin):
//   {"method": "package.Service/Method", "kind": "unary", "request": {...}}
//   {"method": ..., "requests": [{...}, ...]}     for client and bidi streams
// "kind" is optional; when given, it must be the method's (unary, server_streaming,
// client_streaming, bidi_streaming). A bidi stream sends each request once the previous one
// is answered.
//
// Prints one JSON line per response, {"response": {...}}, then a last line with the
// outcome: {"ok": true, "code": "ok", ...} or {"ok": false, "code": "not_found",
// "message": ...}. Exit status: 0 when the call ends OK, 1 when it ends with an error, 2 for
// a usage error.

const { parseArgs } = require('node:util');
const fs = require('node:fs');
const { createFileRegistry, fromBinary, fromJson, toJson } = require('@bufbuild/protobuf');
const { FileDescriptorSetSchema } = require('@bufbuild/protobuf/wkt');
const { ConnectError, createClient } = require('@connectrpc/connect');
const { codeToString } = require('@connectrpc/connect/protocol-connect');
const { compressionGzip, createConnectTransport } = require('@connectrpc/connect-node');
const { UsageError, loadCredentials } = require('./agency');

const KINDS = ['unary', 'server_streaming', 'client_streaming', 'bidi_streaming'];

function parseCommandLine(argv) {
  const { values, positionals } = parseArgs({
    args: argv,
    options: {
      url: { type: 'string' },
      credentials: { type: 'string' },
      contracts: { type: 'string' },
      'http-version': { type: 'string', default: '2' },
      codec: { type: 'string', default: 'proto' },
      gzip: { type: 'boolean', default: false },
      timeout: { type: 'string', default: '10' },
    },
    allowPositionals: true,
  });
  for (const required of ['url', 'credentials', 'contracts']) {
    if (!values[required]) throw new UsageError(`--${required} is required`);
  }
  if (!['2', '1.1'].includes(values['http-version'])) {
    throw new UsageError(`--http-version ${values['http-version']}: expected 2 or 1.1`);
  }
  if (!['json', 'proto'].includes(values.codec)) {
    throw new UsageError(`--codec ${values.codec}: expected json or proto`);
  }
  const timeout = Number(values.timeout);
  if (!(timeout > 0)) throw new UsageError(`--timeout ${values.timeout}: not a positive number`);
  if (positionals.length > 1) throw new UsageError('expected at most one CALL argument');
  return { options: values, input: positionals[0], timeout };
}

function parseCall(text) {
  let call;
  try {
    call = JSON.parse(text);
  } catch (error) {
    throw new UsageError(`the call is not JSON: ${error.message}`);
  }
  if (call === null || typeof call !== 'object' || typeof call.method !== 'string') {
    throw new UsageError('the call must be a JSON object with a "method" (package.Service/Method)');
  }
  if (call.kind !== undefined && !KINDS.includes(call.kind)) {
    throw new UsageError(`kind ${JSON.stringify(call.kind)}: expected one of ${KINDS.join(', ')}`);
  }
  return call;
}

/** A FileDescriptorSet as a registry of services and messages. */
function loadRegistry(file) {
  let bytes;
  try {
    bytes = fs.readFileSync(file);
  } catch (error) {
    throw new UsageError(`${file}: cannot read: ${error.message}`);
  }
  try {
    return createFileRegistry(fromBinary(FileDescriptorSetSchema, bytes));
  } catch (error) {
    throw new UsageError(`${file}: not a FileDescriptorSet with its imports: ${error.message}`);
  }
}

function findMethod(registry, path) {
  const slash = path.lastIndexOf('/');
  if (slash < 0) throw new UsageError(`${path}: expected package.Service/Method`);
  const serviceName = path.slice(0, slash).replace(/^\//, '');
  const service = registry.getService(serviceName);
  if (!service) throw new UsageError(`no service ${serviceName} in the contracts`);
  const method = service.methods.find((m) => m.name === path.slice(slash + 1));
  if (!method) throw new UsageError(`no method ${path} in the contracts`);
  return { service, method };
}

/** Requests one at a time: the next is released only when the caller asks for it. */
class Outbox {
  constructor() {
    this.waiting = [];
    this.queued = [];
  }

  push(item) {
    const resolve = this.waiting.shift();
    if (resolve) resolve(item);
    else this.queued.push(item);
  }

  async *[Symbol.asyncIterator]() {
    for (;;) {
      const item = this.queued.length
        ? this.queued.shift()
        : await new Promise((resolve) => this.waiting.push(resolve));
      if (item === null) return;
      yield item;
    }
  }
}

async function* each(items) {
  yield* items;
}

/** Make the call; every response goes to ``emit`` as it arrives. */
async function call(client, method, requests, options, emit) {
  const invoke = client[method.localName].bind(client);
  switch (method.methodKind) {
    case 'unary':
      emit(await invoke(requests[0], options));
      return;
    case 'server_streaming':
      for await (const response of invoke(requests[0], options)) emit(response);
      return;
    case 'client_streaming':
      emit(await invoke(each(requests), options));
      return;
    default: {
      // One query at a time, each after the previous answer: the gateway must relay every
      // message as it comes, not at the end of the stream.
      const outbox = new Outbox();
      let sent = 0;
      const sendNext = () => outbox.push(sent < requests.length ? requests[sent++] : null);
      sendNext();
      for await (const response of invoke(outbox, options)) {
        emit(response);
        sendNext();
      }
    }
  }
}

async function main() {
  const { options, input, timeout } = parseCommandLine(process.argv.slice(2));
  const credentials = loadCredentials(options.credentials);
  const registry = loadRegistry(options.contracts);
  const text = input === undefined || input === '-' ? fs.readFileSync(0, 'utf8') : input;
  const spec = parseCall(text);
  const { service, method } = findMethod(registry, spec.method);
  if (spec.kind !== undefined && spec.kind !== method.methodKind) {
    throw new UsageError(`${spec.method} is ${method.methodKind}, not ${spec.kind}`);
  }
  const streamsIn = method.methodKind === 'client_streaming' || method.methodKind === 'bidi_streaming';
  const raw = streamsIn ? spec.requests : [spec.request ?? {}];
  if (!Array.isArray(raw)) throw new UsageError(`${spec.method} streams requests: give "requests", an array`);
  const requests = raw.map((json, index) => {
    try {
      return fromJson(method.input, json, { registry });
    } catch (error) {
      throw new UsageError(`request ${index + 1} is not a ${method.input.typeName}: ${error.message}`);
    }
  });

  const tls = { ca: credentials.ca, cert: credentials.cert, key: credentials.key };
  const transport = createConnectTransport({
    baseUrl: options.url,
    httpVersion: options['http-version'],
    useBinaryFormat: options.codec === 'proto',
    jsonOptions: { registry },
    nodeOptions: tls,
    ...(options.gzip ? { sendCompression: compressionGzip, compressMinBytes: 0 } : {}),
  });
  const client = createClient(service, transport);
  const print = (line) => process.stdout.write(`${JSON.stringify(line)}\n`);
  const outcome = { method: spec.method, kind: method.methodKind, consumer: credentials.agencyId };
  try {
    await call(client, method, requests, { timeoutMs: timeout * 1000 }, (response) => {
      print({ response: toJson(method.output, response, { registry }) });
    });
    print({ ok: true, code: 'ok', ...outcome });
  } catch (error) {
    const failure = ConnectError.from(error);
    print({
      ok: false,
      code: codeToString(failure.code),
      message: failure.rawMessage,
      ...outcome,
    });
    process.exitCode = 1;
  }
}

main().catch((error) => {
  const usage = error instanceof UsageError;
  process.stdout.write(`${JSON.stringify({ ok: false, error: error.message })}\n`);
  if (!usage) process.stderr.write(`${error.stack}\n`);
  process.exitCode = 2;
});
