-- The post_save schema: the event ledger and the dead-letter list.
-- Owned by the role that runs `post-save migrate`; writers need no rights here because the
-- capture function runs as this owner (SECURITY DEFINER).

CREATE SCHEMA IF NOT EXISTS post_save;

-- One row per captured save of a table in `durable` mode. `payload` is the event JSON of
-- DESIGN.md without its `id` (the id is this row's key). `handled_at` is set when every handler
-- the event was routed to has finished (successfully, or by giving up into dead_letter).
CREATE TABLE post_save.event (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    sender      text        NOT NULL,
    op          text        NOT NULL,
    payload     json        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    handled_at  timestamptz
);

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
