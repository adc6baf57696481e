-- The ledger becomes three rotating partitions (PgQ's scheme). Writers insert into the current
-- one; the daemon switches to the next once the current one is old enough, after emptying the
-- next with TRUNCATE when everything in it was acknowledged more than `keep_handled` ago.
-- TRUNCATE gives the space back at once and needs no vacuum, so the ledger stays bounded even
-- while some transaction holds an old snapshot (which stops vacuum from reclaiming DELETEd or
-- UPDATEd rows anywhere in the database).
--
-- `post_save.ledger_slot` holds the current partition: a sequence, so a writer reads it without
-- a snapshot or a lock (`pg_sequence_last_value`), and a switch is seen by every session at once.
-- `post_save.ledger_rotation` records the switch (which slot, since when), so the daemons agree
-- on when the next one is due; the daemon that rotates holds its row lock.

ALTER TABLE post_save.event RENAME TO event_v4;
ALTER INDEX post_save.event_pkey RENAME TO event_v4_pkey;
ALTER INDEX post_save.event_pending_idx RENAME TO event_v4_pending_idx;
ALTER SEQUENCE post_save.event_id_seq RENAME TO event_v4_id_seq;

CREATE SEQUENCE post_save.ledger_slot MINVALUE 0 MAXVALUE 2 START WITH 0 NO CYCLE;

CREATE TABLE post_save.ledger_rotation (
    one     boolean     PRIMARY KEY DEFAULT true CHECK (one),
    slot    smallint    NOT NULL CHECK (slot BETWEEN 0 AND 2),
    since   timestamptz NOT NULL
);
INSERT INTO post_save.ledger_rotation (slot, since) VALUES (0, clock_timestamp());

-- Columns as in V1, plus `slot`: the partition a row went to. The primary key must include it;
-- ids still come from one sequence, so an id alone names one ledger row.
CREATE TABLE post_save.event (
    id          bigint      GENERATED ALWAYS AS IDENTITY (START WITH 1 INCREMENT BY 1000),
    slot        smallint    NOT NULL DEFAULT coalesce(pg_sequence_last_value('post_save.ledger_slot'), 0)::smallint,
    sender      text        NOT NULL,
    op          text        NOT NULL,
    n           integer     NOT NULL,
    head        json        NOT NULL,
    rows        json        NOT NULL,
    handled_at  timestamptz,
    PRIMARY KEY (id, slot)
) PARTITION BY LIST (slot);

CREATE TABLE post_save.event_0 PARTITION OF post_save.event FOR VALUES IN (0);
CREATE TABLE post_save.event_1 PARTITION OF post_save.event FOR VALUES IN (1);
CREATE TABLE post_save.event_2 PARTITION OF post_save.event FOR VALUES IN (2);

CREATE INDEX event_pending_idx ON post_save.event (id) WHERE handled_at IS NULL;

DO $$
DECLARE
    p text;
BEGIN
    FOREACH p IN ARRAY ARRAY['event_0', 'event_1', 'event_2'] LOOP
        EXECUTE format('ALTER TABLE post_save.%I ALTER COLUMN rows SET COMPRESSION lz4', p);
        EXECUTE format('ALTER TABLE post_save.%I ALTER COLUMN head SET COMPRESSION lz4', p);
    END LOOP;
EXCEPTION WHEN feature_not_supported OR invalid_parameter_value OR syntax_error THEN
    RAISE NOTICE 'post_save: lz4 compression unavailable; the ledger uses the default';
END
$$;

-- Everything the old ledger held moves to partition 0, ids kept; new ids continue where the old
-- sequence stood.
INSERT INTO post_save.event (id, slot, sender, op, n, head, rows, handled_at) OVERRIDING SYSTEM VALUE
SELECT id, 0, sender, op, n, head, rows, handled_at FROM post_save.event_v4;

SELECT setval(pg_get_serial_sequence('post_save.event', 'id'), last_value, is_called)
  FROM post_save.event_v4_id_seq;

DROP TABLE post_save.event_v4;
