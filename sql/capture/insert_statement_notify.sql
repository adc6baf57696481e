        v_note := {{start}};
        v_room := {{room}} - octet_length(v_note);
        IF v_room <= 0 THEN
            {{too_big}}
            RETURN NULL;
        END IF;
        SELECT count(*) FILTER (WHERE c.chunk < 0) INTO v_big
          FROM (SELECT r.chunk, CASE WHEN r.chunk >= 0 THEN pg_notify('post_save', v_note || ',"rows":[' || string_agg(r.item, ',') FILTER (WHERE r.chunk >= 0) || ']}') END
                  FROM (SELECT r.item, CASE WHEN octet_length(r.item) <= {{NOTE_ROW_MAX}}
                                THEN sum(CASE WHEN octet_length(r.item) <= {{NOTE_ROW_MAX}} THEN octet_length(r.item) + 1 END) OVER w / v_room
                                ELSE -1 END AS chunk
                          FROM (SELECT ({{item}})::text AS item FROM {{NEW_TABLE}} n) r
                        WINDOW w AS (ROWS UNBOUNDED PRECEDING)) r
                 GROUP BY r.chunk) c;
        IF v_big > 0 THEN
            PERFORM pg_notify('post_save', e.note)
               FROM (SELECT CASE WHEN octet_length(v_note) + octet_length(b.post_save_item) < {{fits}}
                                 THEN v_note || ',"rows":[' || b.post_save_item || ']}'
                                 ELSE v_note || ',"reread":true,"pk":' || b.post_save_pk || '}' END AS note
                       FROM (SELECT ({{item}})::text AS post_save_item, post_save.key_of(to_jsonb(n.*), v_keys)::text AS post_save_pk
                               FROM {{NEW_TABLE}} n OFFSET 0) b
                      WHERE octet_length(b.post_save_item) > {{NOTE_ROW_MAX}}) e
              WHERE octet_length(e.note) < {{NOTE_LIMIT}};
        END IF;
