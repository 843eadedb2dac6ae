-- Discrepancies: differences found between a migration's source and target.
CREATE TABLE discrepancies (
    session_id            uuid             NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    id                    uuid             NOT NULL,
    result_id             uuid,
    kind                  text             NOT NULL,
    -- 1 critical, 2 high, 3 medium, 4 low, 5 info: stored as a rank so lists
    -- sort most severe first straight from an index.
    severity              smallint         NOT NULL CHECK (severity BETWEEN 1 AND 5),
    description           text             NOT NULL,
    source_element        text             NOT NULL DEFAULT '',
    target_element        text             NOT NULL DEFAULT '',
    recommendation        text             NOT NULL DEFAULT '',
    confidence            double precision NOT NULL CHECK (confidence BETWEEN 0 AND 1),
    -- Identity of the same difference across sessions (given or computed).
    fingerprint           text             NOT NULL,
    resolution            text             NOT NULL DEFAULT 'open'
        CHECK (resolution IN ('open', 'acknowledged', 'resolved', 'wont_fix', 'false_positive', 'muted')),
    resolved_by           text             NOT NULL DEFAULT '',
    resolution_note       text             NOT NULL DEFAULT '',
    resolution_updated_at timestamptz,
    -- Where the row came from: a RecordDiscrepancies batch (with its position,
    -- so a replay answers with the same ids in the same order) or an ingest.
    batch_id              text,
    batch_position        integer,
    created_at            timestamptz      NOT NULL DEFAULT now(),
    PRIMARY KEY (session_id, id),
    -- A result, when named, must be a result of the same session.
    FOREIGN KEY (session_id, result_id) REFERENCES results (session_id, id) ON DELETE CASCADE
);

-- ListDiscrepancies sorts by (severity, created_at DESC, id DESC): one index
-- per session (the common case) and one across sessions.
CREATE INDEX discrepancies_session_order_idx
    ON discrepancies (session_id, severity, created_at DESC, id DESC);
CREATE INDEX discrepancies_order_idx ON discrepancies (severity, created_at DESC, id DESC);
-- Fingerprint-wide resolution and the fingerprint filter.
CREATE INDEX discrepancies_fingerprint_idx ON discrepancies (fingerprint);
-- Replies to replayed batches.
CREATE INDEX discrepancies_batch_idx ON discrepancies (session_id, batch_id, batch_position)
    WHERE batch_id IS NOT NULL;
-- ResolveDiscrepancy finds a discrepancy by id alone.
CREATE INDEX discrepancies_id_idx ON discrepancies (id);

-- Every change of a discrepancy's resolution.
CREATE TABLE discrepancy_resolutions (
    session_id      uuid        NOT NULL,
    discrepancy_id  uuid        NOT NULL,
    id              bigint      GENERATED ALWAYS AS IDENTITY,
    from_resolution text        NOT NULL,
    to_resolution   text        NOT NULL,
    actor           text        NOT NULL,
    note            text        NOT NULL DEFAULT '',
    via_fingerprint boolean     NOT NULL DEFAULT false,
    changed_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (session_id, discrepancy_id, id),
    FOREIGN KEY (session_id, discrepancy_id) REFERENCES discrepancies (session_id, id) ON DELETE CASCADE
);

-- Fingerprints muted for good: discrepancies recorded later with one arrive muted.
CREATE TABLE fingerprint_rules (
    fingerprint text        PRIMARY KEY,
    resolution  text        NOT NULL CHECK (resolution = 'muted'),
    actor       text        NOT NULL,
    note        text        NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- Idempotency of batch writes: one row per committed batch, written in the
-- same transaction as the batch's rows. `digest` detects a batch_id reused
-- for different content.
CREATE TABLE ingest_batches (
    kind         text        NOT NULL,
    scope        text        NOT NULL,
    batch_id     text        NOT NULL,
    digest       bytea       NOT NULL,
    item_count   integer     NOT NULL,
    committed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (kind, scope, batch_id)
);

-- Resumable client-stream ingests: the last committed chunk sequence, written
-- in the same transaction as the chunk's rows.
CREATE TABLE ingest_marks (
    kind            text        NOT NULL,
    ingest_id       text        NOT NULL,
    scope           text        NOT NULL,
    high_water_mark bigint      NOT NULL,
    items           bigint      NOT NULL DEFAULT 0,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (kind, ingest_id)
);
