-- WatchSession is fed by LISTEN/NOTIFY so that a change committed through any
-- replica reaches watchers on every replica. The payload is only the session
-- id: watchers re-read the state they need, so a notification is a hint and a
-- lost or coalesced one costs nothing but latency. NOTIFY is delivered at
-- commit, so watchers never see uncommitted changes.
CREATE FUNCTION verdict_notify_session_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_TABLE_NAME = 'sessions' AND TG_OP = 'DELETE' THEN
        PERFORM pg_notify('verdict_session_changed', OLD.id::text);
    ELSIF TG_TABLE_NAME = 'sessions' THEN
        PERFORM pg_notify('verdict_session_changed', NEW.id::text);
    ELSE
        PERFORM pg_notify('verdict_session_changed', NEW.session_id::text);
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER sessions_notify
    AFTER UPDATE OR DELETE ON sessions
    FOR EACH ROW EXECUTE FUNCTION verdict_notify_session_changed();

CREATE TRIGGER session_logs_notify
    AFTER INSERT ON session_logs
    FOR EACH ROW EXECUTE FUNCTION verdict_notify_session_changed();
