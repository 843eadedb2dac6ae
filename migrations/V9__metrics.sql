-- Free time series points.
CREATE TABLE metric_points (
    id          bigint           GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name        text             NOT NULL,
    value       double precision NOT NULL,
    unit        text             NOT NULL DEFAULT '',
    labels      jsonb            NOT NULL DEFAULT '{}'::jsonb,
    recorded_at timestamptz      NOT NULL
);
-- QueryTimeSeries reads one metric over a time range.
CREATE INDEX metric_points_name_time_idx ON metric_points (name, recorded_at);
-- Label filters (labels @> {...}).
CREATE INDEX metric_points_labels_idx ON metric_points USING gin (labels jsonb_path_ops);

-- Validation rollups per period; recomputation replaces a row (upsert).
CREATE TABLE metric_rollups (
    period                  text             NOT NULL CHECK (period IN ('day', 'week', 'month')),
    period_start            timestamptz      NOT NULL,
    sessions_total          bigint           NOT NULL,
    sessions_pending        bigint           NOT NULL,
    sessions_processing     bigint           NOT NULL,
    sessions_completed      bigint           NOT NULL,
    sessions_failed         bigint           NOT NULL,
    sessions_cancelled      bigint           NOT NULL,
    avg_fidelity            double precision,
    p95_fidelity            double precision,
    discrepancies_critical  bigint           NOT NULL,
    discrepancies_high      bigint           NOT NULL,
    discrepancies_medium    bigint           NOT NULL,
    discrepancies_low       bigint           NOT NULL,
    discrepancies_info      bigint           NOT NULL,
    avg_session_duration_ms double precision,
    test_executions         bigint           NOT NULL DEFAULT 0,
    test_passed             bigint           NOT NULL DEFAULT 0,
    test_failed_or_error    bigint           NOT NULL DEFAULT 0,
    technology_pairs        jsonb            NOT NULL DEFAULT '{}'::jsonb,
    computed_at             timestamptz      NOT NULL DEFAULT now(),
    PRIMARY KEY (period, period_start)
);

-- Incremental computation: the time up to which each period kind is computed.
CREATE TABLE rollup_watermarks (
    period      text        PRIMARY KEY,
    computed_to timestamptz NOT NULL
);

-- Finding what changed since the last computation.
CREATE INDEX sessions_updated_idx ON sessions (updated_at);
-- Periods touched by recorded discrepancies (incremental rollups).
CREATE INDEX discrepancies_created_idx ON discrepancies (created_at);
-- Periods touched by recorded test executions (incremental rollups).
CREATE INDEX test_executions_created_idx ON test_executions (created_at);
