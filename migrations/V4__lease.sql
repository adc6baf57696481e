-- The dispatch lease (`daemon.lease`): of several daemons on one database, the one holding the
-- unexpired row dispatches; the others wait as standbys and take it over once it expires.
CREATE TABLE post_save.lease (
    name        text        PRIMARY KEY,
    holder      text        NOT NULL,
    expires_at  timestamptz NOT NULL,
    acquired_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
