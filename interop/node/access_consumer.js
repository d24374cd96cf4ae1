#!/usr/bin/env node
'use strict';
// A Node.js agency using the broker's Access service (tabadol.platform.v1.Access) over mTLS,
// with nothing but the published .proto: the self-service access contract as another
// language's gRPC stack sees it. Prints one JSON document on stdout.
//
//   node access_consumer.js --broker ADDR --credentials DIR --protos DIR [--include DIR]...
//                           [--trust-domain TD] [--timeout SECONDS] CASE [ARGS...]
//
// --credentials is an agency bundle (ca.crt, agency.crt, agency.key); --protos is the
// repository's protos/ (tabadol/platform/v1/access.proto is loaded from it); --include names a
// directory for the imports that are not under protos/, such as google/api/annotations.proto.
//
// Cases (a JSON argument may be "-" or left out to read it from stdin):
//   access RPC JSON     Access/RPC (e.g. RequestAccess, ListRequests) with this request, in
//                       proto-loader's object form: field names as in the .proto, enums by
//                       name, int64 and uint64 as decimal strings
//   call METHOD TEXT    a unary agency method (package.Service/Method) with TEXT's UTF-8 bytes
//                       as the request message: the broker relays payloads as they are, so a
//                       call needs no contract to be admitted or refused
//
// Exit status: 0 when the call ends OK, 1 when it ends with another gRPC status (the document
// then has its code and details), 2 for a usage error.

const { parseArgs } = require('node:util');
const fs = require('node:fs');
const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const {
  INCLUDE_OPTION,
  UsageError,
  brokerDnsName,
  loadCredentials,
  loadProtos,
  metadataJson,
} = require('./agency');

const ACCESS_CONTRACT = path.join('tabadol', 'platform', 'v1', 'access.proto');

function parseCommandLine(argv) {
  const { values, positionals } = parseArgs({
    args: argv,
    options: {
      broker: { type: 'string' },
      credentials: { type: 'string' },
      protos: { type: 'string' },
      include: INCLUDE_OPTION,
      'trust-domain': { type: 'string' },
      timeout: { type: 'string', default: '10' },
    },
    allowPositionals: true,
  });
  for (const required of ['broker', 'credentials', 'protos']) {
    if (!values[required]) throw new UsageError(`--${required} is required`);
  }
  const [name, target, input] = positionals;
  if (name !== 'access' && name !== 'call') {
    throw new UsageError(`unknown case ${JSON.stringify(name)}; expected access or call`);
  }
  if (!target) {
    throw new UsageError(
      name === 'access'
        ? 'the access case needs an RPC of the Access service (e.g. RequestAccess)'
        : 'the call case needs a METHOD (package.Service/Method)',
    );
  }
  const timeout = Number(values.timeout);
  if (!(timeout > 0)) throw new UsageError(`--timeout ${values.timeout}: not a positive number`);
  return { options: values, name, target, input, timeout };
}

function readInput(input) {
  if (input === undefined || input === '-') return fs.readFileSync(0, 'utf8');
  return input;
}

/** The Access service's client class, from the .proto under ``protosDir``. */
function accessClientClass(protosDir, includeDirs) {
  const file = path.join(protosDir, ACCESS_CONTRACT);
  if (!fs.existsSync(file)) throw new UsageError(`${file}: no such file`);
  const definition = loadProtos(ACCESS_CONTRACT, protosDir, includeDirs);
  return grpc.loadPackageDefinition(definition).tabadol.platform.v1.Access;
}


/** One unary call, started by ``start(callback)``; resolves whatever status it ends with. */
function unary(start) {
  return new Promise((resolve) => {
    const outcome = { response: null, initial: null, status: null, answered: false };
    const settle = () => {
      if (outcome.status && outcome.answered) resolve(outcome);
    };
    const call = start((error, response) => {
      if (!error) outcome.response = response;
      outcome.answered = true;
      settle();
    });
    call.on('metadata', (initial) => {
      outcome.initial = initial;
    });
    call.on('status', (status) => {
      outcome.status = status;
      settle();
    });
  });
}

/** Access/RPC with the JSON request; the answer in proto-loader's object form. */
function callAccess(options, credentials, clientOptions, rpc, input, deadline) {
  const Access = accessClientClass(options.protos, options.include);
  if (!Access.service[rpc]) {
    throw new UsageError(
      `no RPC ${rpc} in ${ACCESS_CONTRACT}; expected one of ${Object.keys(Access.service).join(', ')}`,
    );
  }
  let request;
  try {
    request = JSON.parse(input.trim() || '{}');
  } catch (error) {
    throw new UsageError(`the request is not JSON: ${error.message}`);
  }
  const client = new Access(options.broker, credentials, clientOptions);
  const method = Access.service[rpc].path;
  const done = unary((callback) => client[rpc](request, new grpc.Metadata(), { deadline }, callback));
  return { client, method, done };
}

/** METHOD with TEXT's bytes as the request; the answer's bytes as UTF-8 text. */
function callRaw(options, credentials, clientOptions, method, input, deadline) {
  const route = `/${method.replace(/^\//, '')}`;
  if (!/^\/[A-Za-z_][\w.]*\/\w+$/.test(route)) {
    throw new UsageError(`${method}: expected package.Service/Method`);
  }
  const client = new grpc.Client(options.broker, credentials, clientOptions);
  const bytes = (buffer) => buffer;
  const done = unary((callback) => client.makeUnaryRequest(
    route, bytes, bytes, Buffer.from(input, 'utf8'), new grpc.Metadata(), { deadline },
    (error, response) => callback(error, response && response.toString('utf8')),
  ));
  return { client, method: route, done };
}

async function main() {
  const { options, name, target, input, timeout } = parseCommandLine(process.argv.slice(2));
  const bundle = loadCredentials(options.credentials);
  const trustDomain = options['trust-domain'] || bundle.trustDomain;
  const credentials = grpc.credentials.createSsl(bundle.ca, bundle.key, bundle.cert);
  // TLS verifies the broker by its platform name, whatever address it is dialed at.
  const clientOptions = { 'grpc.ssl_target_name_override': brokerDnsName(trustDomain) };
  const deadline = new Date(Date.now() + timeout * 1000);
  const start = name === 'access' ? callAccess : callRaw;
  const { client, method, done } = start(
    options, credentials, clientOptions, target, readInput(input), deadline,
  );
  const { response, initial, status } = await done;
  client.close();

  const trailing = metadataJson(status.metadata);
  const document = {
    case: name,
    method,
    consumer: bundle.agencyId,
    ok: status.code === grpc.status.OK,
    code: grpc.status[status.code] || String(status.code),
    details: status.details,
    request_id: (trailing['x-tabadol-request-id'] || [null])[0],
    metadata: { initial: metadataJson(initial), trailing },
    response,
  };
  process.stdout.write(`${JSON.stringify(document)}\n`);
  process.exitCode = document.ok ? 0 : 1;
}

main().catch((error) => {
  const usage = error instanceof UsageError;
  process.stdout.write(`${JSON.stringify({ ok: false, error: error.message })}\n`);
  if (!usage) process.stderr.write(`${error.stack}\n`);
  process.exitCode = 2;
});
