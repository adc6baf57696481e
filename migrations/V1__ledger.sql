-- The post_save schema: the event ledger and the dead-letter list.
-- Owned by the role that runs `post-save migrate`; writers need no rights here because the
-- capture function runs as this owner (SECURITY DEFINER).

CREATE SCHEMA IF NOT EXISTS post_save;

-- The ledger: one row per captured statement of a table in `durable` mode (chunks of at most
-- 1000 rows for bigger statements). `head` holds what the statement's events share (raw, txid,
-- at, actor, origin); `rows` is a JSON array with one [pk, instance, old, update_fields] per
-- saved row. Ids step by 1000: the events of ledger row N have ids N, N+1, …, so an event id is
-- unique, increases in commit order for one row, and names its ledger row. `handled_at` is set
-- when every handler of every event in the row has finished (done, or dead in dead_letter).
CREATE TABLE post_save.event (
    id          bigint      GENERATED ALWAYS AS IDENTITY (START WITH 1 INCREMENT BY 1000) PRIMARY KEY,
    sender      text        NOT NULL,
    op          text        NOT NULL,
    n           integer     NOT NULL,
    head        json        NOT NULL,
    rows        json        NOT NULL,
    handled_at  timestamptz
);

-- lz4 (where the server was built with it) compresses faster than pglz, and keeps a 100-row
-- statement's rows (about 14 kB of JSON) under 2 kB, inline rather than in TOAST.
DO $$
BEGIN
    ALTER TABLE post_save.event ALTER COLUMN rows SET COMPRESSION lz4;
    ALTER TABLE post_save.event ALTER COLUMN head SET COMPRESSION lz4;
EXCEPTION WHEN feature_not_supported OR invalid_parameter_value OR syntax_error THEN
    RAISE NOTICE 'post_save: lz4 compression unavailable; the ledger uses the default';
END
$$;

-- The daemon's catch-up scans only what is still pending.
CREATE INDEX event_pending_idx ON post_save.event (id) WHERE handled_at IS NULL;

-- Deliveries that kept failing after their last attempt. Never dropped silently: the CLI lists,
-- retries and purges them. `event_id` is NULL for events of `notify` tables (no ledger row).
CREATE TABLE post_save.dead_letter (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id    bigint,
    handler     text        NOT NULL,
    sender      text        NOT NULL,
    event       json        NOT NULL,
    attempts    integer     NOT NULL,
    last_error  text        NOT NULL,
    dead_at     timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE INDEX dead_letter_event_idx ON post_save.dead_letter (event_id);

REVOKE ALL ON SCHEMA post_save FROM PUBLIC;
