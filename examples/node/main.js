// A small walk through Verdict's SessionService from Node.js: create (and a
// retried create), get, list page by page, one error code, delete.
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

const definition = protoLoader.loadSync(['verdict/v1/sessions.proto'], {
  includeDirs: [protoDir],
  keepCase: true, // field names as in the .proto: request_id, not requestId
  longs: String, // int64 as decimal strings, never rounded
  enums: String, // enum values by name: 'SESSION_STATUS_PENDING'
  defaults: true,
  oneofs: true,
});
const verdict = grpc.loadPackageDefinition(definition).verdict.v1;
const sessions = new verdict.SessionService(target, grpc.credentials.createInsecure());

// Calls a unary method with a deadline (the gateway turns it into PostgreSQL's
// statement_timeout) and returns a promise of the response.
function call(client, method, request) {
  const deadline = new Date(Date.now() + 10_000);
  return new Promise((resolve, reject) => {
    client[method](request, { deadline }, (error, response) => (error ? reject(error) : resolve(response)));
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

const runId = `node-${crypto.randomUUID().slice(0, 12)}`;
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
      // The field violations travel as a google.rpc.Status in this trailer.
      assert.ok(error.metadata.get('grpc-status-details-bin').length > 0, 'no status details');
      return true;
    });
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
    sessions.close();
  }
  const total = Object.keys(steps).length;
  console.log(`node: ${passed} of ${total} steps passed`);
  process.exitCode = passed === total ? 0 : 1;
}

main();
