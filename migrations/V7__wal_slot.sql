-- What the WAL capture knows about its replication slot, in a table so that it is replicated
-- with the rest of the database. A slot lives only on the server that made it: after a
-- failover to a standby without it, or once someone drops it, the new primary has no slot but
-- still has this row, which says since when saves may not have been delivered. The daemon
-- never makes a slot itself; `post-save triggers install` does, and writes the row.
CREATE TABLE post_save.wal_slot (
    slot_name        text        PRIMARY KEY,
    -- when `triggers install` made the slot (or found it, for a slot made before this table)
    created_at       timestamptz NOT NULL DEFAULT clock_timestamp(),
    -- how far the daemon had confirmed the slot, and the commit time of the last save it had
    -- delivered there: saves committed after it may be missing if the slot is lost
    confirmed_lsn    pg_lsn,
    confirmed_commit timestamptz,
    recorded_at      timestamptz
);
