'use strict';
// What a Node.js agency needs on both sides of the wire: its credentials bundle, the SPIFFE
// names of the platform (docs/pki.md) and the agency contracts loaded from protos/.

const crypto = require('node:crypto');
const fs = require('node:fs');
const path = require('node:path');
const protoLoader = require('@grpc/proto-loader');

// The options the interop tests expect: field names as in the .proto, int64 as decimal
// strings (like protobuf's JSON mapping), enums by name, and every scalar field present.
const PROTO_OPTIONS = {
  keepCase: true,
  longs: String,
  enums: String,
  defaults: true,
  oneofs: true,
};

class UsageError extends Error {}

function brokerSpiffeId(trustDomain) {
  return `spiffe://${trustDomain}/broker`;
}

function brokerDnsName(trustDomain) {
  return `broker.${trustDomain}`;
}

/** The URI SANs of a certificate (an X509Certificate, or the DER bytes of one). */
function uriSans(certificate) {
  const cert = certificate instanceof crypto.X509Certificate
    ? certificate
    : new crypto.X509Certificate(certificate);
  // Node quotes a name that holds a separator, so splitting on ", " cannot cut one in two.
  return (cert.subjectAltName || '')
    .split(', ')
    .filter((entry) => entry.startsWith('URI:'))
    .map((entry) => entry.slice('URI:'.length).replace(/^"(.*)"$/, '$1'));
}

/** ca.crt, agency.crt and agency.key of a bundle, with the identity agency.crt carries. */
function loadCredentials(directory) {
  const read = (name) => {
    try {
      return fs.readFileSync(path.join(directory, name));
    } catch (error) {
      throw new UsageError(`${path.join(directory, name)}: cannot read: ${error.message}`);
    }
  };
  const ca = read('ca.crt');
  const cert = read('agency.crt');
  const key = read('agency.key');
  for (const uri of uriSans(new crypto.X509Certificate(cert))) {
    const match = /^spiffe:\/\/([^/]+)\/agency\/([a-z][a-z0-9-]*)$/.exec(uri);
    if (match) {
      return { ca, cert, key, trustDomain: match[1], agencyId: match[2] };
    }
  }
  throw new UsageError(
    `${path.join(directory, 'agency.crt')}: carries no spiffe://<trust-domain>/agency/<id> identity`,
  );
}

// The agencies' contracts; their imports (tabadol/type/...) resolve from the same root, or
// from the extra include directories (google/api/annotations.proto, for the HTTP rules).
const AGENCY_CONTRACTS = path.join('tabadol', 'agencies');

// The option every program takes for the extra include directories; it may be repeated.
const INCLUDE_OPTION = { type: 'string', multiple: true, default: [] };

function protoFiles(root, under) {
  const found = [];
  const walk = (relative) => {
    for (const entry of fs.readdirSync(path.join(root, relative), { withFileTypes: true })) {
      const child = path.join(relative, entry.name);
      if (entry.isDirectory()) walk(child);
      else if (entry.name.endsWith('.proto')) found.push(child);
    }
  };
  walk(under);
  return found.sort();
}

/** The agency contracts under ``protosDir``: proto-loader's definitions, keyed by full name.
 * Imports not under ``protosDir`` are looked up in ``includeDirs``. */
function loadContracts(protosDir, includeDirs = []) {
  let files;
  try {
    files = protoFiles(protosDir, AGENCY_CONTRACTS);
  } catch (error) {
    throw new UsageError(`${path.join(protosDir, AGENCY_CONTRACTS)}: cannot read: ${error.message}`);
  }
  if (files.length === 0) {
    throw new UsageError(`${path.join(protosDir, AGENCY_CONTRACTS)}: no .proto files`);
  }
  return loadProtos(files, protosDir, includeDirs);
}

/** proto-loader's definitions of ``files`` (relative to ``protosDir``), with their imports. */
function loadProtos(files, protosDir, includeDirs = []) {
  for (const directory of includeDirs) {
    if (!fs.existsSync(directory)) {
      throw new UsageError(`--include ${directory}: no such directory`);
    }
  }
  try {
    return protoLoader.loadSync(files, {
      ...PROTO_OPTIONS,
      includeDirs: [protosDir, ...includeDirs],
    });
  } catch (error) {
    // protobufjs names the path it tried, not the import it could not find.
    const hint = error.code === 'ENOENT'
      ? `; an import that is not under ${protosDir} (such as google/api/annotations.proto, from `
        + 'googleapis-common-protos) needs --include with the directory that holds it'
      : '';
    throw new UsageError(`${protosDir}: cannot load the contracts: ${error.message}${hint}`);
  }
}

/** The service definition named ``service`` (e.g. tabadol.agencies.nocr.v1.PersonRegistry). */
function serviceDefinition(contracts, service) {
  const definition = contracts[service];
  if (!definition || definition.format !== undefined) {
    throw new UsageError(`no service ${service} in the contracts`);
  }
  return definition;
}

/** Call metadata as JSON: each key's values, binary ones in base64. */
function metadataJson(metadata) {
  const result = {};
  if (!metadata) return result;
  for (const [key, values] of Object.entries(metadata.toJSON())) {
    result[key] = values.map((v) => (Buffer.isBuffer(v) ? v.toString('base64') : v));
  }
  return result;
}

module.exports = {
  INCLUDE_OPTION,
  PROTO_OPTIONS,
  UsageError,
  brokerDnsName,
  brokerSpiffeId,
  loadContracts,
  loadCredentials,
  loadProtos,
  metadataJson,
  serviceDefinition,
  uriSans,
};
