-- What the capture functions (format 4) share.
--
-- A capture function reads rows as JSON and names no column, so ALTER TABLE cannot break the
-- writes it sees. It still knows some columns by name (the key, redacted and watched columns);
-- when a rename has made one of those names stale, it finds the current names from the
-- attribute numbers it was generated with.

-- The current names of a table's columns: `names` when the table still has every one of them,
-- otherwise the columns whose attribute numbers are `nums` (dropped ones left out). PL/pgSQL,
-- not SQL: its plans are kept for the session instead of made again at every call.
CREATE FUNCTION post_save.column_names(rel oid, names text[], nums smallint[]) RETURNS text[]
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $body$
BEGIN
    IF (SELECT count(*) FROM pg_attribute a
         WHERE a.attrelid = rel AND a.attnum > 0 AND NOT a.attisdropped
           AND a.attname = ANY (names)) = cardinality(names) THEN
        RETURN names;
    END IF;
    RETURN ARRAY(SELECT a.attname::text
                   FROM unnest(nums) WITH ORDINALITY u(num, o)
                   JOIN pg_attribute a ON a.attrelid = rel AND a.attnum = u.num AND NOT a.attisdropped
                  ORDER BY u.o);
END
$body$;

-- The `keys` members of a row, in key order.
CREATE FUNCTION post_save.key_of(r jsonb, keys text[]) RETURNS json
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $body$
BEGIN
    RETURN (SELECT coalesce(json_object_agg(u.k, r -> u.k ORDER BY u.o), '{}'::json)
              FROM unnest(keys) WITH ORDINALITY u(k, o));
END
$body$;

-- Every column whose value differs between two images of a row, in table order: the slow path
-- of an UPDATE capture, taken when a column added or renamed since install changed.
CREATE FUNCTION post_save.changed_columns(rel oid, n jsonb, o jsonb) RETURNS text[]
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $body$
BEGIN
    RETURN ARRAY(SELECT a.attname::text FROM pg_attribute a
                  WHERE a.attrelid = rel AND a.attnum > 0 AND NOT a.attisdropped
                    AND (n -> a.attname::text) IS DISTINCT FROM (o -> a.attname::text)
                  ORDER BY a.attnum);
END
$body$;

-- The loop guard's key. A handler's own session marks its saves with `post_save.origin`; the
-- capture believes the mark only when the session also holds this key, which only a role
-- allowed to run post_save.set_origin can read. A writer without rights on the post_save
-- schema cannot hide its saves by setting `post_save.origin` itself.
CREATE TABLE post_save.origin_key (
    one boolean PRIMARY KEY DEFAULT true CHECK (one),
    key text    NOT NULL
);
INSERT INTO post_save.origin_key (key) VALUES (replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', ''));
REVOKE ALL ON post_save.origin_key FROM PUBLIC;

-- Marks the saves of the rest of the calling transaction as made by `origin` (`handler@depth`).
CREATE FUNCTION post_save.set_origin(origin text) RETURNS void
LANGUAGE plpgsql VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $body$
BEGIN
    PERFORM set_config('post_save.origin', origin, true);
    PERFORM set_config('post_save.origin_key', (SELECT k.key FROM post_save.origin_key k), true);
END
$body$;
REVOKE ALL ON FUNCTION post_save.set_origin(text) FROM PUBLIC;

-- Statement triggers of a watched partitioned table. An UPDATE through the parent that moves a
-- row to another partition fires the row's DELETE trigger on the old partition, then its INSERT
-- trigger on the new one, and no UPDATE trigger: while `post_save.moving` names this statement
-- (the table and the trigger depth its row triggers run at), those two are one update. A
-- statement that also deletes (MERGE) sets `post_save.nomove`, and its rows are taken as they
-- come.
CREATE FUNCTION post_save.capture_statement() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $body$
DECLARE
    v_here text := TG_RELID::text || ':' || pg_trigger_depth();
BEGIN
    IF TG_WHEN = 'BEFORE' AND TG_OP = 'UPDATE' THEN
        PERFORM set_config('post_save.moving', v_here, true);
    ELSIF TG_WHEN = 'BEFORE' AND TG_OP = 'DELETE' THEN
        PERFORM set_config('post_save.nomove', v_here, true);
    ELSIF TG_OP = 'UPDATE' THEN
        PERFORM set_config('post_save.moving', '', true);
        PERFORM set_config('post_save.moved', '', true);
    ELSE
        PERFORM set_config('post_save.nomove', '', true);
    END IF;
    RETURN NULL;
END
$body$;
