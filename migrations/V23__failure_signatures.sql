-- Failure triage of executions (issue 16).
--
-- Every failed execution gets an error signature: its error message
-- normalised (URLs, UUIDs, paths, IP addresses and ports, dates and times,
-- hex ids and numbers masked; whitespace collapsed) and hashed with
-- SHA-256. It is a STORED generated column, so every way executions are
-- written (RecordExecutions, IngestExecutions, runs; COPY included) gets it
-- without naming it, and ListFailureSignatures groups by it through an
-- index. A triage state is kept per signature (it applies to every failure
-- with the signature, also those written later: the state is joined at read
-- time, never copied onto executions) and per execution (an override that
-- wins over its signature's state). Every triage change is appended to
-- triage_history.

-- The normaliser. IMMUTABLE: the generated column and its index depend on
-- it, so it must never change in place. A new normaliser is a new migration
-- that drops the column, replaces the function and adds the column again
-- (the table is rewritten and every signature recomputed; triage states of
-- old signatures then no longer match and stay in history).
--
-- The masks are applied in this order (an earlier mask hides what a later
-- one would see): URLs <url>; UUIDs <uuid>; Windows paths and Unix paths
-- (absolute, ~/, ./ or ../ at the start of the message or after whitespace,
-- a quote, an opening bracket, = or a comma) <path>; IPv4 and bracketed
-- IPv6 addresses with an optional port <ip>; ISO dates with optional time
-- and zone, and times of day <ts>; 0x-prefixed hex and whole words of 8 or
-- more hex digits holding both a digit and a letter <hex>; then every
-- remaining run of digits (with decimal parts) <n>. Whitespace runs become
-- one space, none at the ends. Case is kept: class names and constants
-- carry meaning and the normalised text is shown to people; a message
-- differing only in case is a different failure. Relative paths without a
-- leading ./ (e.g. src/a.rs) keep their words (their numbers are masked).
CREATE FUNCTION verdict_normalise_error(message text) RETURNS text
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $$
DECLARE
    m text := message;
    -- Most masks need a digit; a message without one skips them. Each mask
    -- is also guarded by a character its pattern cannot match without
    -- (a regexp_replace costs tens of microseconds however little it
    -- matches; a position() check, well under one).
    digits boolean := translate(message, '0123456789', '') <> message;
BEGIN
    -- URLs (scheme://...), before paths: their path part is part of them.
    IF position('://' IN m) > 0 THEN
        m := regexp_replace(m, '[A-Za-z][A-Za-z0-9+.-]*://[^[:space:]''"<>()]+', '<url>', 'g');
    END IF;
    -- UUIDs, before numbers and hex words.
    IF position('-' IN m) > 0 THEN
        m := regexp_replace(m, '[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}', '<uuid>', 'g');
    END IF;
    -- Windows paths: a drive letter, a backslash, up to whitespace or a quote.
    IF position(':\' IN m) > 0 THEN
        m := regexp_replace(m, '\m[A-Za-z]:\\[^[:space:]''"]*', '<path>', 'g');
    END IF;
    -- Unix paths: /a/b, ~/a, ./a, ../a at the start or after whitespace, a
    -- quote, an opening bracket, = or a comma; up to whitespace, a quote, a
    -- bracket, a comma, ; or : (so "/a/b.rs:12" keeps its ":<n>").
    IF position('/' IN m) > 0 THEN
        m := regexp_replace(m, '(^|[[:space:]''"(\[=,])(~|\.\.?)?(/[^[:space:]''"()\[\],;:/]+)+/?', '\1<path>', 'g');
    END IF;
    IF digits THEN
        -- IPv4 addresses and bracketed IPv6 addresses, with an optional port.
        IF position('.' IN m) > 0 OR position('[' IN m) > 0 THEN
            m := regexp_replace(m, '(\m[0-9]{1,3}(\.[0-9]{1,3}){3}|\[[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*\])(:[0-9]{1,5})?', '<ip>', 'g');
        END IF;
        -- ISO dates with an optional time of day and zone.
        IF position('-' IN m) > 0 THEN
            m := regexp_replace(m, '[0-9]{4}-[0-9]{2}-[0-9]{2}([T ][0-9]{2}:[0-9]{2}(:[0-9]{2}([.,][0-9]+)?)?(Z|[+-][0-9]{2}(:?[0-9]{2})?)?)?', '<ts>', 'g');
        END IF;
        -- Times of day.
        IF position(':' IN m) > 0 THEN
            m := regexp_replace(m, '\m[0-9]{1,2}:[0-9]{2}:[0-9]{2}([.,][0-9]+)?', '<ts>', 'g');
        END IF;
        -- Hex: 0x..., and whole words of 8 or more hex digits holding a
        -- digit and a letter (a word of digits only is a number).
        m := regexp_replace(m, '\m(0[xX][0-9A-Fa-f]+|(?=[0-9A-Fa-f]*[0-9])(?=[0-9A-Fa-f]*[A-Fa-f])[0-9A-Fa-f]{8,})\M', '<hex>', 'g');
        -- Remaining numbers (integers and decimals), wherever they stand.
        m := regexp_replace(m, '[0-9]+([.,][0-9]+)*', '<n>', 'g');
    END IF;
    -- Whitespace runs become one space, none at the ends.
    RETURN btrim(regexp_replace(m, '[[:space:]]+', ' ', 'g'));
END
$$;

-- The signature of an execution: SHA-256 of the normalised message (UTF-8)
-- for a failure (status failed or error) whose normalised message is not
-- empty, else NULL. convert_to is STABLE only because it could name any
-- encoding; with the fixed 'UTF8' it depends on nothing but its input.
CREATE FUNCTION verdict_error_signature(status text, message text) RETURNS bytea
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN status IN ('failed', 'error')
                THEN sha256(convert_to(nullif(verdict_normalise_error(message), ''), 'UTF8'))
           END
$$;

ALTER TABLE test_executions
    ADD COLUMN error_signature bytea
        GENERATED ALWAYS AS (verdict_error_signature(status, error_message)) STORED;

-- ListFailureSignatures groups a project's failures by signature (optionally
-- in a time range or a run) and fetches one example per signature, the
-- newest; TriageFailureSignature checks that a signature exists; executions
-- read their signature's triage state through it. Failures only.
CREATE INDEX test_executions_project_signature_idx
    ON test_executions (project_id, error_signature, started_at DESC, id DESC)
    INCLUDE (test_case_id)
    WHERE error_signature IS NOT NULL;

-- Execution triage rows name their execution with its project, so an
-- override can never sit in another project than its execution.
ALTER TABLE test_executions
    ADD CONSTRAINT test_executions_project_id_id_key UNIQUE (project_id, id);

-- The triage state of a signature in a project. No row: TO_INVESTIGATE at
-- version 0 (TriageFailureSignature's expected_version 0 means "nobody
-- triaged it yet").
CREATE TABLE failure_signature_triage (
    project_id uuid        NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    signature  bytea       NOT NULL CHECK (octet_length(signature) = 32),
    state      text        NOT NULL CHECK (state IN
        ('to_investigate', 'product_bug', 'automation_bug', 'system_issue', 'no_defect')),
    comment    text        NOT NULL DEFAULT '' CHECK (length(comment) <= 4000),
    -- An http(s) URL of the issue tracking it, or empty.
    issue_url  text        NOT NULL DEFAULT '' CHECK (length(issue_url) <= 2000),
    actor      text        NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    -- Optimistic concurrency: 1 after the first triage, +1 per change.
    version    bigint      NOT NULL CHECK (version >= 0),
    PRIMARY KEY (project_id, signature)
);

-- The triage state of one failed execution, overriding its signature's.
CREATE TABLE execution_triage (
    project_id   uuid        NOT NULL,
    execution_id uuid        NOT NULL,
    state        text        NOT NULL CHECK (state IN
        ('to_investigate', 'product_bug', 'automation_bug', 'system_issue', 'no_defect')),
    comment      text        NOT NULL DEFAULT '' CHECK (length(comment) <= 4000),
    issue_url    text        NOT NULL DEFAULT '' CHECK (length(issue_url) <= 2000),
    actor        text        NOT NULL,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    version      bigint      NOT NULL CHECK (version >= 0),
    PRIMARY KEY (project_id, execution_id),
    FOREIGN KEY (project_id, execution_id)
        REFERENCES test_executions (project_id, id) ON DELETE CASCADE
);

-- Every triage change, of a signature (signature set) or of an execution
-- (execution_id set), with the state it set and the version it made.
-- Append-only: UPDATE and TRUNCATE are refused; rows go only with their
-- project (cascade). An execution's history outlives the execution (no
-- foreign key), as the audit trail does.
CREATE TABLE triage_history (
    id           bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    project_id   uuid        NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    signature    bytea,
    execution_id uuid,
    CHECK ((signature IS NULL) <> (execution_id IS NULL)),
    state        text        NOT NULL,
    comment      text        NOT NULL,
    issue_url    text        NOT NULL,
    actor        text        NOT NULL,
    version      bigint      NOT NULL,
    changed_at   timestamptz NOT NULL DEFAULT now()
);
-- ListTriageHistory pages one signature's or one execution's changes in
-- order.
CREATE INDEX triage_history_signature_idx
    ON triage_history (project_id, signature, id) WHERE signature IS NOT NULL;
CREATE INDEX triage_history_execution_idx
    ON triage_history (project_id, execution_id, id) WHERE execution_id IS NOT NULL;

CREATE FUNCTION triage_history_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'triage_history is append-only: % is refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$;

CREATE TRIGGER triage_history_no_update
    BEFORE UPDATE ON triage_history
    FOR EACH ROW EXECUTE FUNCTION triage_history_append_only();

CREATE TRIGGER triage_history_no_truncate
    BEFORE TRUNCATE ON triage_history
    FOR EACH STATEMENT EXECUTE FUNCTION triage_history_append_only();
