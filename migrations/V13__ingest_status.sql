-- GetIngestStatus reports whether an ingest's last committing call ended with
-- an orderly half-close (its tail committed, `finished`) or was cut off after
-- committing some batches (resume it with the same ingest_id). Marks written
-- before this migration came from calls whose end is unknown: false, so a
-- client resumes rather than trusts them.
ALTER TABLE ingest_marks ADD COLUMN finished boolean NOT NULL DEFAULT false;

