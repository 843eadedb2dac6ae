// Verdict from TypeScript over gRPC-Web, the protocol a browser speaks: the
// same calls a page makes, run here under Node.js so CI can run them.
// Stubs are generated from proto/ (npm run generate: buf with protobuf-es v2
// into gen/); calls go through Connect's gRPC-Web transport over HTTP/1.1 to
// the gateway's own port (no proxy).
//
//   npm ci && npm run generate && npx tsx main.ts http://127.0.0.1:50051 [api-key]
//
// The walk: create a session, read it back, find it in a list, then watch
// it (WatchSession, server streaming over gRPC-Web) while another call moves
// it to PROCESSING and COMPLETED; the watch ends by itself after the final
// status. A missing session is NOT_FOUND. Ends with "web: N passed, M failed".

import { createClient, Code, ConnectError, type Interceptor } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-node";
import { randomUUID } from "node:crypto";
import { SessionService, SessionStatus } from "./gen/verdict/v1/sessions_pb.js";

const baseUrl = process.argv[2] ?? "http://127.0.0.1:50051";
const apiKey = process.argv[3] ?? process.env.VERDICT_API_KEY ?? "";

// Every call carries the key (when given) as `authorization: Bearer …`, and
// names the project (`x-verdict-project`; the gateway's `default` here).
const metadata: Interceptor = (next) => async (req) => {
  if (apiKey) req.header.set("authorization", `Bearer ${apiKey}`);
  req.header.set("x-verdict-project", "default");
  return next(req);
};
const transport = createGrpcWebTransport({
  baseUrl,
  httpVersion: "1.1",
  interceptors: [metadata],
});
const sessions = createClient(SessionService, transport);

let passed = 0;
let failed = 0;
function check(name: string, ok: boolean, detail: unknown = "") {
  if (ok) {
    passed++;
    console.log(`web: ok: ${name}`);
  } else {
    failed++;
    console.error(`web: FAILED: ${name}`, detail);
  }
}

async function main() {
  const requestId = `web-${randomUUID()}`;
  const created = await sessions.createSession(
    {
      requestId,
      sourceTechnology: "cobol",
      targetTechnology: "java",
      validationScope: "full",
      config: { threshold: 0.9 },
    },
    { timeoutMs: 10_000 },
  );
  const session = created.session!;
  check("CreateSession returns a PENDING session", created.created && session.status === SessionStatus.PENDING, created);

  const got = await sessions.getSession({ lookup: { case: "id", value: session.id } }, { timeoutMs: 10_000 });
  check(
    "GetSession reads the same session back",
    got.session?.id === session.id && got.session?.requestId === requestId && got.session?.version === session.version,
    got,
  );
  const byRequest = await sessions.getSession({ lookup: { case: "requestId", value: requestId } });
  check("GetSession by request id finds it too", byRequest.session?.id === session.id, byRequest);

  let listed = false;
  let pageToken = "";
  for (let page = 0; page < 100 && !listed; page++) {
    const list = await sessions.listSessions({ pageSize: 50, pageToken });
    listed = list.sessions.some((s) => s.id === session.id);
    pageToken = list.nextPageToken;
    if (!pageToken) break;
  }
  check("ListSessions lists it", listed);

  // Server streaming over gRPC-Web: the current state first, then each
  // committed change, until the final status ends the stream.
  const seen: SessionStatus[] = [];
  const abort = new AbortController();
  const guard = setTimeout(() => abort.abort(), 20_000);
  const watching = (async () => {
    for await (const event of sessions.watchSession({ id: session.id }, { signal: abort.signal })) {
      if (event.event.case === "session") {
        seen.push(event.event.value.status);
        if (seen.length === 1) {
          await sessions.updateSessionStatus({ id: session.id, status: SessionStatus.PROCESSING });
          await sessions.updateSessionStatus({ id: session.id, status: SessionStatus.COMPLETED });
        }
      }
    }
  })();
  await watching.finally(() => clearTimeout(guard));
  check(
    "WatchSession streams PENDING, then the newest states up to COMPLETED, then ends",
    seen[0] === SessionStatus.PENDING && seen[seen.length - 1] === SessionStatus.COMPLETED,
    seen.map((s) => SessionStatus[s]),
  );

  try {
    await sessions.getSession({ lookup: { case: "id", value: randomUUID() } });
    check("a missing session is NOT_FOUND", false, "it was found");
  } catch (e) {
    const err = ConnectError.from(e);
    check("a missing session is NOT_FOUND", err.code === Code.NotFound, err);
  }
}

main()
  .catch((e) => {
    failed++;
    console.error("web: FAILED:", e);
  })
  .finally(() => {
    console.log(`web: ${passed} passed, ${failed} failed`);
    process.exitCode = failed === 0 ? 0 : 1;
  });
