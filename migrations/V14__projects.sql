-- Projects: one gateway shared by many teams, each seeing only its own
-- data. Every record belongs to exactly one project (the migrations after
-- this one give every table its `project_id`); a call names its project in
-- the `x-verdict-project` header, or gets its key's project, or `default`.

CREATE TABLE projects (
    id           uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    -- The name a call uses (`x-verdict-project: <slug>`) and the client key
    -- CreateProject is idempotent on: lowercase letters, digits and inner
    -- hyphens, 1–63 characters (a DNS label, so it fits in URLs, metric
    -- labels and Kubernetes names). Never changes.
    slug         text        NOT NULL UNIQUE
        CHECK (slug ~ '^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$'),
    display_name text        NOT NULL DEFAULT ''
        CHECK (length(display_name) <= 200),
    description  text        NOT NULL DEFAULT ''
        CHECK (length(description) <= 4000),
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    -- Optimistic concurrency, as on sessions.
    version      bigint      NOT NULL DEFAULT 1
);

-- Everything stored before projects existed, and every call that names no
-- project with a key bound to none, belongs here. It cannot be deleted.
INSERT INTO projects (slug, display_name, description)
VALUES ('default', 'Default',
        'Data stored before projects existed, and calls that name no project.');

-- A key is bound to one project, or (NULL) to every project (operators).
-- Deleting a project deletes its keys; the api_keys trigger notifies every
-- replica, which drops them from its cache and ends their streams.
ALTER TABLE api_keys
    ADD COLUMN project_id uuid REFERENCES projects (id) ON DELETE CASCADE;
CREATE INDEX api_keys_project_idx ON api_keys (project_id) WHERE project_id IS NOT NULL;
