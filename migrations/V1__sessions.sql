-- Validation sessions: one row per validation run of a code migration.
CREATE TABLE sessions (
    id                uuid        PRIMARY KEY,
    -- The client's idempotency key: a retried CreateSession finds the stored row.
    request_id        text        NOT NULL UNIQUE,
    source_technology text        NOT NULL,
    target_technology text        NOT NULL,
    validation_scope  text        NOT NULL,
    status            text        NOT NULL DEFAULT 'pending'
        CHECK (status IN ('pending', 'processing', 'completed', 'failed', 'cancelled')),
    config            jsonb       NOT NULL DEFAULT '{}'::jsonb,
    input_refs        jsonb       NOT NULL DEFAULT '{}'::jsonb,
    metadata          jsonb       NOT NULL DEFAULT '{}'::jsonb,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    started_at        timestamptz,
    completed_at      timestamptz,
    -- Optimistic concurrency: every change increments it; callers may pass the
    -- version they read and get ABORTED when it moved.
    version           bigint      NOT NULL DEFAULT 1
);

-- ListSessions pages newest first by (created_at, id): the keyset needs an
-- index ending in that sort key, both unfiltered and filtered by status, the
-- most common filter.
CREATE INDEX sessions_created_idx ON sessions (created_at DESC, id DESC);
CREATE INDEX sessions_status_created_idx ON sessions (status, created_at DESC, id DESC);
-- Technology-pair filters (and later usage reports) group by the pair.
CREATE INDEX sessions_technologies_created_idx
    ON sessions (source_technology, target_technology, created_at DESC, id DESC);

-- Append-only processing log of a session.
CREATE TABLE session_logs (
    session_id uuid        NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    id         bigint      GENERATED ALWAYS AS IDENTITY,
    logged_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    level      text        NOT NULL CHECK (level IN ('debug', 'info', 'warning', 'error')),
    message    text        NOT NULL,
    fields     jsonb       NOT NULL DEFAULT '{}'::jsonb,
    -- (session_id, id) is both the identity and the keyset index of
    -- ListSessionLogs (by session, oldest first); it leads with session_id so
    -- the table can later be distributed by session.
    PRIMARY KEY (session_id, id)
);
