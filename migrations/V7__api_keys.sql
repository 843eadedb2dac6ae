-- API keys: bearer tokens `vk_<id>_<secret>`. Only a SHA-256 of the secret
-- is stored; the id is public (it is how a presented key is found) and the
-- secret has 256 random bits, so an unsalted fast hash is enough: there is
-- nothing to brute-force that is cheaper than guessing the secret itself.
CREATE TABLE api_keys (
    -- 16 lowercase hex characters, random; part of the token.
    id          text        PRIMARY KEY CHECK (id ~ '^[0-9a-f]{16}$'),
    -- What the key is for, as given to `verdict keys create --name`.
    name        text        NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    -- SHA-256 of the token's secret part.
    secret_hash bytea       NOT NULL CHECK (length(secret_hash) = 32),
    -- Any of read, write, admin.
    scopes      text[]      NOT NULL CHECK (scopes <@ ARRAY['read', 'write', 'admin']::text[]),
    created_at  timestamptz NOT NULL DEFAULT now(),
    -- Set once by `verdict keys revoke`; a revoked key is refused from the
    -- next call on, on every replica (each call reads this row).
    revoked_at  timestamptz
);

-- Secrets every replica shares because they share the database. One row per
-- purpose; generated here, by the database, so no replica has to race to
-- create it. `page_tokens` signs page tokens (HMAC) unless
-- VERDICT_PAGE_TOKEN_SECRET overrides it.
CREATE TABLE gateway_secrets (
    purpose    text        PRIMARY KEY,
    secret     bytea       NOT NULL CHECK (length(secret) >= 32),
    created_at timestamptz NOT NULL DEFAULT now()
);

-- 2 × 122 random bits of gen_random_uuid (a CSPRNG in PostgreSQL 13+)
-- folded through SHA-256.
INSERT INTO gateway_secrets (purpose, secret)
VALUES ('page_tokens', sha256(uuid_send(gen_random_uuid()) || uuid_send(gen_random_uuid())));
