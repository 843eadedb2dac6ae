-- Key changes reach every replica at once, and the audit trail cannot be
-- rewritten.

-- Every gateway caches the keys it has verified (src/auth/cache.rs) and
-- LISTENs on `verdict_keys_changed` (src/auth/revocations.rs). This trigger
-- notifies with the key's id in the very transaction that inserts, revokes
-- or deletes it, so the notification is delivered exactly when the change
-- commits, whoever made it: the gateway, `verdict keys revoke` (which
-- writes straight to the table), or an operator's SQL. A replica that hears
-- it drops the key from its cache and ends the key's open streams when it
-- is revoked or gone.
CREATE FUNCTION api_keys_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('verdict_keys_changed', OLD.id);
    ELSE
        PERFORM pg_notify('verdict_keys_changed', NEW.id);
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER api_keys_changed
    AFTER INSERT OR UPDATE OR DELETE ON api_keys
    FOR EACH ROW EXECUTE FUNCTION api_keys_notify();

-- The audit trail is append-only in the database too, not only by the
-- gateway's habit: UPDATE is always refused, and DELETE or TRUNCATE only
-- pass in a transaction of a retention job that said so with
-- `SET LOCAL verdict.audit_retention = on` (a transaction-local setting:
-- it cannot leak into another call's use of a pooled connection). This
-- guards against a bug or a compromised gateway rewriting history; the
-- owner of the table can still drop the trigger, which is itself visible.
CREATE FUNCTION audit_events_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP IN ('DELETE', 'TRUNCATE')
       AND current_setting('verdict.audit_retention', true) = 'on' THEN
        RETURN OLD;
    END IF;
    RAISE EXCEPTION 'audit_events is append-only: % is refused', TG_OP
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'only the audit retention job deletes rows (SET LOCAL verdict.audit_retention = on)';
END
$$;

CREATE TRIGGER audit_events_no_update_or_delete
    BEFORE UPDATE OR DELETE ON audit_events
    FOR EACH ROW EXECUTE FUNCTION audit_events_append_only();

CREATE TRIGGER audit_events_no_truncate
    BEFORE TRUNCATE ON audit_events
    FOR EACH STATEMENT EXECUTE FUNCTION audit_events_append_only();
