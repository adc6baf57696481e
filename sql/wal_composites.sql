-- The attributes, in order and without dropped ones, of the composites made after initdb that
-- values can hold (src/wal/types.rs): those made with CREATE TYPE … AS, and tables' row types
-- that a column, a composite's attribute or a domain uses (itself or its array). Not every
-- table's row type: a database of many tables would send all their columns.
WITH used (oid) AS (
    SELECT atttypid FROM pg_attribute WHERE atttypid >= 16384 AND NOT attisdropped
    UNION
    SELECT typbasetype FROM pg_type WHERE typtype = 'd'
)
SELECT t.oid::int8, a.attname::text, a.atttypid::int8
  FROM pg_type t
  JOIN pg_class c ON c.oid = t.typrelid
  JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
 WHERE t.typtype = 'c' AND t.oid >= 16384
   AND (c.relkind = 'c' OR t.oid IN (SELECT oid FROM used) OR t.typarray IN (SELECT oid FROM used))
 ORDER BY t.oid, a.attnum
