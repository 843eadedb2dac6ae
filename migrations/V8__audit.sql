-- The audit trail: one row per write or admin call, inserted in the same
-- transaction as the write it describes, so a rolled-back write leaves no
-- row and a committed one always has its row. Append-only: nothing in the
-- gateway updates or deletes these rows.
CREATE TABLE audit_events (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT now(),
    -- The API key of the caller; NULL when authentication is off (loopback
    -- developer default or --insecure-no-auth) or for the `verdict keys` CLI.
    key_id      text,
    -- Full gRPC path (`/verdict.v1.SessionService/CreateSession`), or
    -- `cli:keys.create` / `cli:keys.revoke` for the command line.
    rpc         text        NOT NULL,
    -- Ids of the objects written (sessions, results, discrepancies, keys).
    target_ids  text[]      NOT NULL DEFAULT '{}',
    -- What the call did: created, replayed, updated, deleted, ...
    outcome     text        NOT NULL,
    -- W3C trace id (32 hex) of the call, to join the row with its trace.
    trace_id    text
);

-- ListAuditEvents pages newest first by id, optionally per key, per RPC or
-- per target.
CREATE INDEX audit_events_key_idx ON audit_events (key_id, id DESC);
CREATE INDEX audit_events_rpc_idx ON audit_events (rpc, id DESC);
CREATE INDEX audit_events_target_idx ON audit_events USING gin (target_ids);
