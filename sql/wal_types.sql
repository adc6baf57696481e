-- The WAL capture's view of the database's types (src/wal/types.rs): every type made after
-- initdb, every array type (a varlena with an element type: what PostgreSQL calls a true
-- array), and every type whose array text separates elements with something other than a
-- comma (box's ';'). Kind, domain base, array element and delimiter.
SELECT oid::int8,
       typtype::text,
       typbasetype::int8,
       CASE WHEN typlen = -1 THEN typelem ELSE 0 END::int8,
       typdelim::text
  FROM pg_type
 WHERE oid >= 16384 OR (typelem <> 0 AND typlen = -1) OR typdelim <> ','
