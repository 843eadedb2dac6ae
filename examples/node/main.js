// A small walk through Verdict from Node.js, in a project of its own:
// ProjectService (create the project; every later call names it in the
// `x-verdict-project` header), SessionService (create and a retried create,
// get, list page by page, one error code with its field violations, delete),
// DiscrepancyService (record a batch and replay it, list page by page), and
// the project's isolation (its session is NOT_FOUND from `default`), then
// the project's deletion.
//
//   npm install && node main.js 127.0.0.1:50051
//
// The .proto files are loaded at run time with @grpc/proto-loader (no code
// generation, no build step), from ../../proto or $VERDICT_PROTO_DIR.
'use strict';

const path = require('node:path');
const assert = require('node:assert/strict');
const crypto = require('node:crypto');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const target = process.argv[2] || '127.0.0.1:50051';
const protoDir = process.env.VERDICT_PROTO_DIR || path.resolve(__dirname, '../../proto');

const definition = protoLoader.loadSync(['verdict/v1/sessions.proto', 'verdict/v1/discrepancies.proto', 'verdict/v1/projects.proto'], {
  includeDirs: [protoDir],
  keepCase: true, // field names as in the .proto: request_id, not requestId
  longs: String, // int64 as decimal strings, never rounded
  enums: String, // enum values by name: 'SESSION_STATUS_PENDING'
  defaults: true,
  oneofs: true,
});
const verdict = grpc.loadPackageDefinition(definition).verdict.v1;
const sessions = new verdict.SessionService(target, grpc.credentials.createInsecure());
const discrepancies = new verdict.DiscrepancyService(target, grpc.credentials.createInsecure());
const projects = new verdict.ProjectService(target, grpc.credentials.createInsecure());

// The project every call of the walk works in, named by one header.
const runId = `node-${crypto.randomUUID().slice(0, 12)}`;
const inProject = new grpc.Metadata();
inProject.set('x-verdict-project', runId);

// Calls a unary method with a deadline (the gateway turns it into PostgreSQL's
// statement_timeout) in the walk's project (or in `metadata`'s) and returns a
// promise of the response.
function call(client, method, request, metadata = inProject) {
  const deadline = new Date(Date.now() + 10_000);
  return new Promise((resolve, reject) => {
    client[method](request, metadata, { deadline }, (error, response) => (error ? reject(error) : resolve(response)));
  });
}

// A google.protobuf.Struct from a flat object of strings and numbers. The
// well-known types come from protobufjs's built-in copies, whose field names
// stay camelCase (numberValue) whatever keepCase says.
function struct(values) {
  const fields = {};
  for (const [key, value] of Object.entries(values)) {
    fields[key] = typeof value === 'number' ? { numberValue: value } : { stringValue: String(value) };
  }
  return { fields };
}

// The field violations of an INVALID_ARGUMENT, as { field: description }. They
// travel in the `grpc-status-details-bin` trailer as a google.rpc.Status whose
// details hold a google.rpc.BadRequest; both are decoded here from the
// protobuf wire format (a few field numbers), so no extra package is needed.
function fieldViolations(error) {
  const violations = {};
  for (const trailer of error.metadata.get('grpc-status-details-bin')) {
    for (const [statusField, any] of wireFields(trailer)) {
      if (statusField !== 3) continue; // Status.details: repeated google.protobuf.Any
      const parts = Object.fromEntries(wireFields(any)); // Any: 1 type_url, 2 value
      if (!String(parts[1]).endsWith('/google.rpc.BadRequest')) continue;
      for (const [badRequestField, violation] of wireFields(parts[2] ?? Buffer.alloc(0))) {
        if (badRequestField !== 1) continue; // BadRequest.field_violations
        const v = Object.fromEntries(wireFields(violation)); // 1 field, 2 description
        violations[String(v[1])] = String(v[2] ?? '');
      }
    }
  }
  return violations;
}

// The (field number, value) pairs of a protobuf message: a Buffer for
// length-delimited fields, a number for varints (enough for google.rpc.Status).
function* wireFields(buffer) {
  let offset = 0;
  const varint = () => {
    let value = 0;
    for (let shift = 0; ; shift += 7) {
      const byte = buffer[offset++];
      value += (byte & 0x7f) * 2 ** shift;
      if (byte < 0x80) return value;
    }
  };
  while (offset < buffer.length) {
    const key = varint();
    const [field, wireType] = [Math.floor(key / 8), key % 8];
    if (wireType === 0) yield [field, varint()];
    else if (wireType === 2) {
      const length = varint();
      yield [field, buffer.subarray(offset, offset + length)];
      offset += length;
    } else if (wireType === 1) offset += 8;
    else if (wireType === 5) offset += 4;
    else throw new Error(`unexpected wire type ${wireType}`);
  }
}

// Severities, most severe first (the order ListDiscrepancies returns).
const SEVERITY_ORDER = ['SEVERITY_CRITICAL', 'SEVERITY_HIGH', 'SEVERITY_MEDIUM', 'SEVERITY_LOW', 'SEVERITY_INFO'];

const walk = { sessionId: '', pageIds: [] };

function createRequest(requestId, scope) {
  return {
    request_id: requestId,
    source_technology: 'cobol',
    target_technology: 'java',
    validation_scope: scope,
    config: struct({ threshold: 0.9 }),
  };
}

const steps = {
  async createProject() {
    // Idempotent on the slug: a retry returns the same project.
    const request = { slug: runId, display_name: 'Node walk', description: 'examples/node/main.js' };
    const first = await call(projects, 'CreateProject', request, new grpc.Metadata());
    assert.equal(first.created, true);
    const retry = await call(projects, 'CreateProject', request, new grpc.Metadata());
    assert.equal(retry.created, false);
    assert.equal(retry.project.id, first.project.id);
  },

  async createSession() {
    const first = await call(sessions, 'CreateSession', createRequest(`${runId}-main`, `${runId}/main`));
    assert.equal(first.created, true);
    assert.equal(first.session.status, 'SESSION_STATUS_PENDING');
    assert.equal(first.session.config.fields.threshold.numberValue, 0.9);
    // The same request_id again returns the stored session: retries are safe.
    const retry = await call(sessions, 'CreateSession', createRequest(`${runId}-main`, `${runId}/main`));
    assert.equal(retry.created, false);
    assert.equal(retry.session.id, first.session.id);
    walk.sessionId = first.session.id;
  },

  async getSession() {
    const byId = await call(sessions, 'GetSession', { id: walk.sessionId });
    assert.equal(byId.session.request_id, `${runId}-main`);
    const byRequestId = await call(sessions, 'GetSession', { request_id: `${runId}-main` });
    assert.equal(byRequestId.session.id, walk.sessionId);
  },

  async listSessionsByPage() {
    const scope = `${runId}/paging`;
    for (let i = 0; i < 5; i++) {
      const created = await call(sessions, 'CreateSession', createRequest(`${runId}-page-${i}`, scope));
      walk.pageIds.push(created.session.id);
    }
    const seen = [];
    let pages = 0;
    let pageToken = '';
    do {
      const page = await call(sessions, 'ListSessions', { validation_scope: scope, page_size: 2, page_token: pageToken });
      pages += 1;
      seen.push(...page.sessions.map((s) => s.id));
      pageToken = page.next_page_token;
    } while (pageToken);
    assert.equal(pages, 3, 'five sessions two per page make three pages');
    assert.equal(new Set(seen).size, seen.length, 'a session was listed twice');
    assert.deepEqual([...seen].sort(), [...walk.pageIds].sort());
  },

  async invalidArgument() {
    await assert.rejects(call(sessions, 'CreateSession', { request_id: '' }), (error) => {
      assert.equal(error.code, grpc.status.INVALID_ARGUMENT);
      const violations = fieldViolations(error);
      for (const field of ['request_id', 'source_technology', 'target_technology', 'validation_scope']) {
        assert.ok(field in violations, `no violation for ${field}: ${JSON.stringify(violations)}`);
      }
      return true;
    });
  },

  async recordDiscrepancies() {
    // Five differences found in the session, recorded in one atomic batch.
    const severities = [
      'SEVERITY_LOW',
      'SEVERITY_CRITICAL',
      'SEVERITY_MEDIUM',
      'SEVERITY_HIGH',
      'SEVERITY_CRITICAL',
    ];
    const items = severities.map((severity, i) => ({
      kind: i % 2 ? 'numeric_precision' : 'date_format',
      severity,
      description: `report ${i} differs`,
      source_element: `${runId}/REPORT.cbl:${10 + i}`,
      target_element: `${runId}/Report.java:${20 + i}`,
      confidence: 0.9,
    }));
    const request = { session_id: walk.sessionId, batch_id: `${runId}-batch`, items };
    const first = await call(discrepancies, 'RecordDiscrepancies', request);
    assert.equal(first.replayed, false);
    assert.equal(first.ids.length, items.length);
    // Replaying the batch_id (say, after a timeout) stores nothing.
    const replay = await call(discrepancies, 'RecordDiscrepancies', request);
    assert.equal(replay.replayed, true);
    assert.deepEqual(replay.ids, first.ids);

    // An invalid item fails the whole batch, naming the item.
    const bad = {
      ...request,
      batch_id: `${runId}-bad`,
      items: [items[0], { ...items[1], severity: 'SEVERITY_UNSPECIFIED' }],
    };
    await assert.rejects(call(discrepancies, 'RecordDiscrepancies', bad), (error) => {
      assert.equal(error.code, grpc.status.INVALID_ARGUMENT);
      assert.ok('items[1].severity' in fieldViolations(error), JSON.stringify(fieldViolations(error)));
      return true;
    });

    // Two per page: each once, most severe first.
    const seen = [];
    let pages = 0;
    let pageToken = '';
    do {
      const page = await call(discrepancies, 'ListDiscrepancies', {
        session_id: walk.sessionId,
        page_size: 2,
        page_token: pageToken,
      });
      pages += 1;
      seen.push(...page.discrepancies);
      pageToken = page.next_page_token;
    } while (pageToken);
    assert.equal(pages, 3, 'five discrepancies two per page make three pages');
    assert.deepEqual(seen.map((d) => d.id).sort(), [...first.ids].sort());
    const ranks = seen.map((d) => SEVERITY_ORDER.indexOf(d.severity));
    assert.deepEqual(ranks, [...ranks].sort((a, b) => a - b), 'not most severe first');
    assert.equal(seen[0].severity, 'SEVERITY_CRITICAL');
  },

  async projectIsolation() {
    // The walk's session exists in its project only: from `default` it is
    // NOT_FOUND, and `default`'s lists never show it.
    const inDefault = new grpc.Metadata();
    inDefault.set('x-verdict-project', 'default');
    await assert.rejects(call(sessions, 'GetSession', { id: walk.sessionId }, inDefault), (error) => {
      assert.equal(error.code, grpc.status.NOT_FOUND);
      return true;
    });
    const page = await call(sessions, 'ListSessions', { validation_scope: `${runId}/paging` }, inDefault);
    assert.equal(page.sessions.length, 0);
  },

  async deleteSessions() {
    for (const id of [walk.sessionId, ...walk.pageIds]) {
      await call(sessions, 'DeleteSession', { id });
    }
    await assert.rejects(call(sessions, 'GetSession', { id: walk.sessionId }), (error) => {
      assert.equal(error.code, grpc.status.NOT_FOUND);
      return true;
    });
  },

  async deleteProject() {
    // Empty now, so no `force` is needed.
    await call(projects, 'DeleteProject', { slug: runId }, new grpc.Metadata());
  },
};

async function main() {
  let passed = 0;
  try {
    for (const [name, step] of Object.entries(steps)) {
      try {
        await step();
      } catch (error) {
        console.log(`node: FAILED: ${name}`);
        console.error(error);
        break; // later steps build on earlier ones
      }
      passed += 1;
      console.log(`node: ok: ${name}`);
    }
  } finally {
    discrepancies.close();
    sessions.close();
    projects.close();
  }
  const total = Object.keys(steps).length;
  console.log(`node: ${passed} of ${total} steps passed`);
  process.exitCode = passed === total ? 0 : 1;
}

main();
