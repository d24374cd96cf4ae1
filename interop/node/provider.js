#!/usr/bin/env node
'use strict';
// A Node.js provider agency behind the Tabadol broker: the four demo contracts (every RPC
// kind) served with simple deterministic data, over mTLS, to the broker and nobody else.
//
//   node provider.js --credentials DIR --protos DIR [--include DIR]... [--listen 127.0.0.1:0]
//                    [--trust-domain TD]
//
// --credentials is an agency bundle: the broker dials this endpoint expecting that agency's
// DNS name, so the broker's [[service]] entries name that agency as the provider. --include
// names a directory for the imports that are not under protos/, such as
// google/api/annotations.proto.
//
// Prints "listening on PORT" once it accepts calls. Every response carries the consumer agency
// the broker named in x-tabadol-consumer back in its initial metadata, x-node-saw-consumer
// (all values, comma-separated), so that a test can see what the provider was told.

const { parseArgs } = require('node:util');
const grpc = require('@grpc/grpc-js');
const {
  INCLUDE_OPTION,
  UsageError,
  brokerSpiffeId,
  loadContracts,
  loadCredentials,
  serviceDefinition,
  uriSans,
} = require('./agency');

const CONSUMER_KEY = 'x-tabadol-consumer';
const SAW_CONSUMER_KEY = 'x-node-saw-consumer';
const ADDRESSES_PER_REGION = 12;

class Refusal extends Error {
  constructor(code, details) {
    super(details);
    this.code = code;
    this.details = details;
  }
}

// ---- The broker-only gate ----

/** Why the peer of this connection may not call, or null when it is the broker. */
function peerRefusal(authContext, brokerId) {
  const certificate = authContext && authContext.sslPeerCertificate;
  if (!certificate || !certificate.raw) {
    return 'this provider endpoint accepts calls only from the Tabadol broker, and the caller presented no verified certificate';
  }
  const ids = uriSans(certificate.raw);
  if (ids.length !== 1 || ids[0] !== brokerId) {
    return `this provider endpoint accepts calls only from the Tabadol broker (${brokerId}), not from ${ids.join(', ') || 'a certificate without a SPIFFE ID'}`;
  }
  return null;
}

/**
 * A server interceptor that admits only the broker's certificate. Every agency certificate
 * comes from the same CA, so TLS alone would admit any agency, and x-tabadol-consumer is
 * only meaningful when the broker set it.
 */
function brokerOnly(brokerId) {
  return (methodDescriptor, call) => {
    const refusal = peerRefusal(call.getAuthContext(), brokerId);
    return new grpc.ServerInterceptingCall(call, {
      start: (next) => {
        next({
          onReceiveMetadata: (metadata, pass) => {
            if (refusal === null) {
              pass(metadata);
            } else {
              call.sendStatus({
                code: grpc.status.PERMISSION_DENIED,
                details: refusal,
                metadata: new grpc.Metadata(),
              });
            }
          },
          // A refused call never reaches its handler: nothing of it passes the gate.
          onReceiveMessage: (message, pass) => {
            if (refusal === null) pass(message);
          },
          onReceiveHalfClose: (pass) => {
            if (refusal === null) pass();
          },
        });
      },
    });
  };
}

// ---- Deterministic data ----

function nationalIdProblem(value) {
  if (!/^[0-9]{10}$/.test(value || '')) {
    return `national id ${JSON.stringify(value)} must be 10 ASCII digits`;
  }
  if (new Set(value).size === 1) {
    return `national id ${value} is not valid: all its digits are identical`;
  }
  let sum = 0;
  for (let i = 0; i < 9; i += 1) sum += Number(value[i]) * (10 - i);
  const remainder = sum % 11;
  const expected = remainder < 2 ? remainder : 11 - remainder;
  if (Number(value[9]) !== expected) {
    return `national id ${value} fails its check digit: expected ${expected}, got ${value[9]}`;
  }
  return null;
}

function person(nationalId, birthDate) {
  return {
    national_id: nationalId,
    first_name: 'Node',
    last_name: `Person-${nationalId.slice(-4)}`,
    father_name: `Father-${nationalId.slice(0, 3)}`,
    birth_date: birthDate,
    gender: Number(nationalId[8]) % 2 === 0 ? 'GENDER_FEMALE' : 'GENDER_MALE',
    birth_place: 'Tehran',
    issue_place: 'Tehran',
    life_status: 'LIFE_STATUS_ALIVE',
  };
}

function verdict(query) {
  const problem = nationalIdProblem(query.national_id);
  if (problem !== null) return ['VERDICT_INVALID_NATIONAL_ID', problem];
  if (!query.birth_date) return ['VERDICT_NOT_FOUND', 'birth_date is missing'];
  const record = person(query.national_id, query.birth_date);
  for (const field of ['first_name', 'last_name']) {
    const given = (query[field] || '').trim().toLowerCase();
    if (given && given !== record[field].toLowerCase()) {
      return ['VERDICT_MISMATCH', `${field} does not match the record`];
    }
  }
  return ['VERDICT_MATCH', 'matches the record of a living person'];
}

function address(postalCode, province, city) {
  const serial = Number(postalCode.slice(-5));
  return {
    postal_code: postalCode,
    province,
    city,
    district: `District ${(serial % 3) + 1}`,
    street: 'Node Street',
    alley: '',
    building_number: String(serial),
    floor: serial % 4,
    unit: '',
    location: { latitude: 35.7 + serial / 1000, longitude: 51.4 + serial / 1000 },
  };
}

function postalCodeProblem(value) {
  if (!/^[0-9]{10}$/.test(value || '')) {
    return `postal code ${JSON.stringify(value)} must be 10 ASCII digits`;
  }
  if (value[0] === '0') return `postal code ${value} is not valid: postal codes do not start with 0`;
  return null;
}

/** The 11-digit form of an Iranian mobile number, or null. */
function normalizeMobile(value) {
  const national = /^(?:\+98|0098|98|0)?(9[0-9]{9})$/.exec(value || '');
  return national ? `0${national[1]}` : null;
}

function invoiceProblem(invoice) {
  if (!invoice.invoice_number) return 'invoice_number is empty';
  if (invoice.line_items.length === 0) return 'line_items is empty';
  const expected = invoice.line_items.reduce(
    (sum, item) => sum + BigInt(item.quantity) * BigInt(item.unit_price_rials) + BigInt(item.vat_rials),
    0n,
  );
  if (BigInt(invoice.total_rials) !== expected) {
    return `total_rials is ${invoice.total_rials} but the line items add up to ${expected}`;
  }
  return null;
}

// ---- The services ----

/** Tell the caller, in initial metadata, which consumer the broker named for this call. */
function echoConsumer(call) {
  const metadata = new grpc.Metadata();
  metadata.set(SAW_CONSUMER_KEY, call.metadata.get(CONSUMER_KEY).map(String).join(','));
  call.sendMetadata(metadata);
}

/** A unary-response handler from a function that returns the response or throws a Refusal. */
function unary(respond) {
  return (call, callback) => {
    echoConsumer(call);
    try {
      callback(null, respond(call.request));
    } catch (error) {
      if (!(error instanceof Refusal)) throw error;
      callback({ code: error.code, details: error.details });
    }
  };
}

const PersonRegistry = {
  InquirePerson: unary((request) => {
    const problem = nationalIdProblem(request.national_id);
    if (problem !== null) throw new Refusal(grpc.status.INVALID_ARGUMENT, problem);
    if (!request.birth_date) throw new Refusal(grpc.status.INVALID_ARGUMENT, 'birth_date is required');
    return person(request.national_id, request.birth_date);
  }),

  VerifyPeople(call) {
    echoConsumer(call);
    call.on('data', (query) => {
      const [result, reason] = verdict(query);
      call.write({ reference: query.reference, verdict: result, reason });
    });
    call.on('end', () => call.end());
  },
};

const AddressDirectory = {
  LookupPostalCode: unary((request) => {
    const problem = postalCodeProblem(request.postal_code);
    if (problem !== null) throw new Refusal(grpc.status.INVALID_ARGUMENT, problem);
    return address(request.postal_code, 'Tehran', 'Tehran');
  }),

  ListAddresses(call) {
    echoConsumer(call);
    const region = call.request.region;
    if (!region || !region.province) {
      call.emit('error', { code: grpc.status.INVALID_ARGUMENT, details: 'region.province is required' });
      return;
    }
    const limit = call.request.max_results || ADDRESSES_PER_REGION;
    const count = Math.min(limit, ADDRESSES_PER_REGION);
    for (let serial = 1; serial <= count; serial += 1) {
      const postalCode = `10000${String(serial).padStart(5, '0')}`;
      call.write(address(postalCode, region.province, region.city || region.province));
    }
    call.end();
  },
};

const MobileOwnership = {
  MatchMobile: unary((request) => {
    const problem = nationalIdProblem(request.national_id);
    if (problem !== null) throw new Refusal(grpc.status.INVALID_ARGUMENT, problem);
    const mobile = normalizeMobile(request.mobile);
    if (mobile === null) {
      throw new Refusal(
        grpc.status.INVALID_ARGUMENT,
        `mobile number ${JSON.stringify(request.mobile)} is not an Iranian mobile number`,
      );
    }
    // A line belongs to a person when its last digit is their national id's last digit.
    const matched = mobile.slice(-1) === request.national_id.slice(-1);
    return { result: matched ? 'MATCH_RESULT_MATCH' : 'MATCH_RESULT_NO_MATCH' };
  }),
};

const InvoiceRegistry = {
  SubmitInvoices(call, callback) {
    echoConsumer(call);
    const receipt = {
      receipt_id: '',
      accepted_count: 0,
      rejected_count: 0,
      rejections: [],
      accepted_total_rials: 0n,
      accepted_vat_rials: 0n,
    };
    let index = 0;
    call.on('data', (invoice) => {
      const problem = invoiceProblem(invoice);
      if (problem === null) {
        receipt.accepted_count += 1;
        receipt.accepted_total_rials += BigInt(invoice.total_rials);
        for (const item of invoice.line_items) receipt.accepted_vat_rials += BigInt(item.vat_rials);
      } else {
        receipt.rejected_count += 1;
        receipt.rejections.push({ index, invoice_number: invoice.invoice_number, reason: problem });
      }
      index += 1;
    });
    call.on('end', () => {
      receipt.receipt_id = `node-${index}`;
      receipt.accepted_total_rials = String(receipt.accepted_total_rials);
      receipt.accepted_vat_rials = String(receipt.accepted_vat_rials);
      callback(null, receipt);
    });
  },
};

// ---- The server ----

function parseCommandLine(argv) {
  const { values } = parseArgs({
    args: argv,
    options: {
      credentials: { type: 'string' },
      protos: { type: 'string' },
      include: INCLUDE_OPTION,
      listen: { type: 'string', default: '127.0.0.1:0' },
      'trust-domain': { type: 'string' },
    },
  });
  for (const required of ['credentials', 'protos']) {
    if (!values[required]) throw new UsageError(`--${required} is required`);
  }
  return values;
}

function main() {
  const options = parseCommandLine(process.argv.slice(2));
  const credentials = loadCredentials(options.credentials);
  const trustDomain = options['trust-domain'] || credentials.trustDomain;
  const contracts = loadContracts(options.protos, options.include);

  const server = new grpc.Server({ interceptors: [brokerOnly(brokerSpiffeId(trustDomain))] });
  const services = {
    'tabadol.agencies.nocr.v1.PersonRegistry': PersonRegistry,
    'tabadol.agencies.post.v1.AddressDirectory': AddressDirectory,
    'tabadol.agencies.cra.v1.MobileOwnership': MobileOwnership,
    'tabadol.agencies.tax.v1.InvoiceRegistry': InvoiceRegistry,
  };
  for (const [name, implementation] of Object.entries(services)) {
    server.addService(serviceDefinition(contracts, name), implementation);
  }
  const serverCredentials = grpc.ServerCredentials.createSsl(
    credentials.ca,
    [{ private_key: credentials.key, cert_chain: credentials.cert }],
    true, // require and verify a client certificate from the platform CA
  );
  server.bindAsync(options.listen, serverCredentials, (error, port) => {
    if (error) {
      process.stderr.write(`cannot listen on ${options.listen}: ${error.message}\n`);
      process.exit(1);
    }
    process.stdout.write(`listening on ${port}\n`);
  });
  const stop = () => server.tryShutdown(() => process.exit(0));
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
}

try {
  main();
} catch (error) {
  process.stderr.write(`${error instanceof UsageError ? error.message : error.stack}\n`);
  process.exit(2);
}
