-- post_save.capture(): the AFTER ROW trigger function that turns a save into an event.
--
-- Trigger arguments (written by `post-save triggers install`, see src/triggers.rs):
--   0  mode            'durable' (ledger row + NOTIFY) or 'notify' (NOTIFY only)
--   1  include_old     'true' or 'false'
--   2  watched columns text[] literal; '{}' = every column. An UPDATE counts only if one changed.
--   3  redacted cols   text[] literal; their values never leave the database (their names may
--                      appear in update_fields: a name is not a secret)
--   4  pk columns      text[] literal, read from the table's primary key at install time
--
-- Rules it keeps:
--   * it never makes the writer's statement fail because of the row's size: a NOTIFY payload
--     that would reach PostgreSQL's 8000-byte limit is replaced by a reference;
--   * an UPDATE that changes no (watched) column produces no event;
--   * it runs as the schema owner with a fixed search_path, so writers need no rights on the
--     ledger and cannot redirect it.
CREATE OR REPLACE FUNCTION post_save.capture() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $capture$
DECLARE
    v_mode      text    := TG_ARGV[0];
    v_old_on    boolean := TG_ARGV[1]::boolean;
    v_watch     text[]  := TG_ARGV[2]::text[];
    v_redact    text[]  := TG_ARGV[3]::text[];
    v_pkcols    text[]  := TG_ARGV[4]::text[];
    v_sender    text    := TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME;
    v_op        text    := lower(TG_OP);
    v_role      text    := current_setting('role');
    v_row       json;
    v_old       json;
    v_changed   text[];
    v_pk        json;
    v_head      text;
    v_body      text;
    v_note      text;
    v_id        bigint;
BEGIN
    IF TG_OP = 'DELETE' THEN
        v_row := row_to_json(OLD);
    ELSE
        v_row := row_to_json(NEW);
    END IF;

    IF TG_OP = 'UPDATE' THEN
        v_old := row_to_json(OLD);
        SELECT array_agg(n.key ORDER BY n.ord)
          INTO v_changed
          FROM json_each_text(v_row) WITH ORDINALITY AS n(key, value, ord)
          JOIN json_each_text(v_old) AS o(key, value) ON o.key = n.key
         WHERE n.value IS DISTINCT FROM o.value;
        IF v_changed IS NULL THEN
            RETURN NULL;
        END IF;
        IF cardinality(v_watch) > 0 AND NOT (v_changed && v_watch) THEN
            RETURN NULL;
        END IF;
    END IF;

    SELECT json_object_agg(key, value) INTO v_pk
      FROM json_each(v_row) WHERE key = ANY (v_pkcols);

    IF cardinality(v_redact) > 0 THEN
        SELECT json_object_agg(key, value) INTO v_row
          FROM json_each(v_row) WHERE key <> ALL (v_redact);
        IF v_old IS NOT NULL THEN
            SELECT json_object_agg(key, value) INTO v_old
              FROM json_each(v_old) WHERE key <> ALL (v_redact);
        END IF;
    END IF;

    -- Everything but the row images; the row images are spliced in as text below so the
    -- (possibly large) row JSON is never parsed again.
    v_head := json_build_object(
        'signal',        CASE WHEN TG_OP = 'DELETE' THEN 'post_delete' ELSE 'post_save' END,
        'sender',        v_sender,
        'op',            v_op,
        'created',       TG_OP = 'INSERT',
        'pk',            v_pk,
        'update_fields', v_changed,
        'raw',           current_setting('session_replication_role') = 'replica',
        'using',         current_database(),
        'txid',          txid_current(),
        'at',            clock_timestamp(),
        'actor',         json_build_object(
                             'role',             CASE WHEN v_role = 'none' THEN session_user::text ELSE v_role END,
                             'application_name', current_setting('application_name'),
                             'client_addr',      inet_client_addr(),
                             'pid',              pg_backend_pid(),
                             'actor',            current_setting('post_save.actor', true)),
        'origin',        nullif(current_setting('post_save.origin', true), '')
    )::text;

    v_body := '{"instance":' || coalesce(v_row::text, 'null')
           || ',"old":' || CASE WHEN v_old_on AND v_old IS NOT NULL THEN v_old::text ELSE 'null' END
           || ',' || substr(v_head, 2);

    IF v_mode = 'durable' THEN
        INSERT INTO post_save.event (sender, op, payload)
        VALUES (v_sender, v_op, v_body::json)
        RETURNING id INTO v_id;
        v_note := '{"id":' || v_id || ',' || substr(v_body, 2);
        IF octet_length(v_note) >= 8000 THEN
            v_note := '{"id":' || v_id || ',"ref":"ledger"}';
        END IF;
    ELSE
        v_note := v_body;
        IF octet_length(v_note) >= 8000 THEN
            -- Too big to travel inline and there is no ledger row: send the event without its
            -- row images; the daemon re-reads the row by primary key and flags the event.
            v_note := '{"reread":true,' || substr(v_head, 2);
            IF octet_length(v_note) >= 8000 THEN
                RAISE WARNING 'post_save: event of % too large to notify even by reference; skipped', v_sender;
                RETURN NULL;
            END IF;
        END IF;
    END IF;

    PERFORM pg_notify('post_save', v_note);
    RETURN NULL;
END
$capture$;

REVOKE ALL ON FUNCTION post_save.capture() FROM PUBLIC;
