#!/usr/bin/env node
'use strict';
// A Node.js agency calling the demo services through the Tabadol broker over mTLS, as
// another language's gRPC stack sees the platform. Prints one JSON document on stdout.
//
//   node consumer.js --broker ADDR --credentials DIR --protos DIR [--include DIR]...
//                    [--trust-domain TD] [--timeout SECONDS] CASE [ARGS...]
//
// --credentials is an agency bundle (ca.crt, agency.crt, agency.key); --protos is the
// repository's protos/ (the agency contracts under tabadol/agencies/ are loaded); --include
// names a directory for the imports that are not under protos/, such as
// google/api/annotations.proto.
//
// Cases (a JSON argument may be "-" or left out to read it from stdin):
//   unary JSON             nocr PersonRegistry/InquirePerson with this InquirePersonRequest
//   server_streaming JSON  post AddressDirectory/ListAddresses with this ListAddressesRequest
//   client_streaming JSON  tax InvoiceRegistry/SubmitInvoices: a JSON array or JSON lines of Invoice
//   bidi JSON              nocr PersonRegistry/VerifyPeople: a JSON array or JSON lines of
//                          VerifyPersonRequest, each sent once the previous one is answered
//   error METHOD JSON      any agency method (package.Service/Method), for the statuses the platform
//                          returns; streaming requests as for the cases above
//
// Exit status: 0 when the call ends OK, 1 when it ends with another gRPC status (the document
// then has its code and details), 2 for a usage error.

const { parseArgs } = require('node:util');
const fs = require('node:fs');
const grpc = require('@grpc/grpc-js');
const {
  INCLUDE_OPTION,
  UsageError,
  brokerDnsName,
  loadContracts,
  loadCredentials,
  metadataJson,
  serviceDefinition,
} = require('./agency');

const CASES = {
  unary: 'tabadol.agencies.nocr.v1.PersonRegistry/InquirePerson',
  server_streaming: 'tabadol.agencies.post.v1.AddressDirectory/ListAddresses',
  client_streaming: 'tabadol.agencies.tax.v1.InvoiceRegistry/SubmitInvoices',
  bidi: 'tabadol.agencies.nocr.v1.PersonRegistry/VerifyPeople',
};

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
  const [name, ...rest] = positionals;
  let method;
  let input;
  if (name === 'error') {
    [method, input] = rest;
    if (!method) throw new UsageError('the error case needs a METHOD (package.Service/Method)');
  } else if (CASES[name]) {
    method = CASES[name];
    [input] = rest;
  } else {
    throw new UsageError(
      `unknown case ${JSON.stringify(name)}; expected one of ${[...Object.keys(CASES), 'error'].join(', ')}`,
    );
  }
  const timeout = Number(values.timeout);
  if (!(timeout > 0)) throw new UsageError(`--timeout ${values.timeout}: not a positive number`);
  return { options: values, name, method, input, timeout };
}

function readInput(input) {
  if (input === undefined || input === '-') return fs.readFileSync(0, 'utf8');
  return input;
}

function parseJson(text, what) {
  try {
    return JSON.parse(text);
  } catch (error) {
    throw new UsageError(`${what} is not JSON: ${error.message}`);
  }
}

/** A stream of request messages: a JSON array, or one JSON object per line. */
function parseMessages(text) {
  const trimmed = text.trim();
  if (trimmed.startsWith('[')) {
    const messages = parseJson(trimmed, 'the request stream');
    if (!Array.isArray(messages)) throw new UsageError('the request stream is not a JSON array');
    return messages;
  }
  return trimmed
    .split('\n')
    .filter((line) => line.trim())
    .map((line, index) => parseJson(line, `request line ${index + 1}`));
}


/** Make the call; resolves with what the document reports, whatever status it ends with. */
function call(client, path, definition, requests, deadline) {
  return new Promise((resolve) => {
    const responses = [];
    const outcome = { initial: null, status: null, ended: false };
    const settle = () => {
      // Complete once the status arrived and, when it is OK, every response was delivered.
      const { status } = outcome;
      if (!status || (status.code === grpc.status.OK && !outcome.ended)) return;
      resolve({ responses, initial: outcome.initial, status });
    };
    const serialize = definition.requestSerialize;
    const deserialize = definition.responseDeserialize;
    const metadata = new grpc.Metadata();
    const options = { deadline };
    let stream;
    if (!definition.requestStream && !definition.responseStream) {
      stream = client.makeUnaryRequest(
        path, serialize, deserialize, requests[0], metadata, options,
        (error, response) => {
          if (!error) responses.push(response);
          outcome.ended = true;
          settle();
        },
      );
    } else if (!definition.requestStream) {
      stream = client.makeServerStreamRequest(
        path, serialize, deserialize, requests[0], metadata, options,
      );
    } else if (!definition.responseStream) {
      stream = client.makeClientStreamRequest(
        path, serialize, deserialize, metadata, options,
        (error, response) => {
          if (!error) responses.push(response);
          outcome.ended = true;
          settle();
        },
      );
      for (const request of requests) stream.write(request);
      stream.end();
    } else {
      stream = client.makeBidiStreamRequest(path, serialize, deserialize, metadata, options);
      // One query at a time: the next is sent only once the previous one is answered, which
      // proves that the broker relays each message as it comes, not at the end of the stream.
      let sent = 0;
      const sendNext = () => {
        if (sent < requests.length) stream.write(requests[sent++]);
        else stream.end();
      };
      stream.on('data', sendNext);
      sendNext();
    }
    if (definition.responseStream) {
      stream.on('data', (message) => responses.push(message));
      stream.on('end', () => {
        outcome.ended = true;
        settle();
      });
    }
    stream.on('error', () => {}); // reported through the 'status' event
    stream.on('metadata', (initial) => {
      outcome.initial = initial;
    });
    stream.on('status', (status) => {
      outcome.status = status;
      settle();
    });
  });
}

async function main() {
  const { options, name, method, input, timeout } = parseCommandLine(process.argv.slice(2));
  const credentials = loadCredentials(options.credentials);
  const trustDomain = options['trust-domain'] || credentials.trustDomain;
  const contracts = loadContracts(options.protos, options.include);
  const slash = method.lastIndexOf('/');
  if (slash < 0) throw new UsageError(`${method}: expected package.Service/Method`);
  const service = method.slice(0, slash).replace(/^\//, '');
  const definition = serviceDefinition(contracts, service)[method.slice(slash + 1)];
  if (!definition) throw new UsageError(`no method ${method} in the contracts`);

  const text = readInput(input);
  const requests = definition.requestStream
    ? parseMessages(text)
    : [parseJson(text.trim() || '{}', 'the request')];

  const client = new grpc.Client(
    options.broker,
    grpc.credentials.createSsl(credentials.ca, credentials.key, credentials.cert),
    // TLS verifies the broker by its platform name, whatever address it is dialed at.
    { 'grpc.ssl_target_name_override': brokerDnsName(trustDomain) },
  );
  const deadline = new Date(Date.now() + timeout * 1000);
  const { responses, initial, status } = await call(
    client, definition.path, definition, requests, deadline,
  );
  client.close();

  const trailing = metadataJson(status.metadata);
  const document = {
    case: name,
    method: definition.path,
    consumer: credentials.agencyId,
    ok: status.code === grpc.status.OK,
    code: grpc.status[status.code] || String(status.code),
    code_number: status.code,
    details: status.details,
    request_id: (trailing['x-tabadol-request-id'] || [null])[0],
    metadata: { initial: metadataJson(initial), trailing },
  };
  if (definition.responseStream) document.responses = responses;
  else document.response = responses[0] ?? null;
  process.stdout.write(`${JSON.stringify(document)}\n`);
  process.exitCode = document.ok ? 0 : 1;
}

main().catch((error) => {
  const usage = error instanceof UsageError;
  process.stdout.write(`${JSON.stringify({ ok: false, error: error.message })}\n`);
  if (!usage) process.stderr.write(`${error.stack}\n`);
  process.exitCode = 2;
});
