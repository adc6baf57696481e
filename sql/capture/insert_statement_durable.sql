        INSERT INTO post_save.event (sender, op, n, head, rows)
        SELECT {{sender}}, 'insert', count(*), v_head, json_agg(e.item)
          FROM (SELECT {{item}} AS item FROM {{NEW_TABLE}} n LIMIT {{CHUNK}}) e
        HAVING count(*) > 0
        RETURNING n INTO v_rows;
        IF v_rows = {{CHUNK}} THEN
            INSERT INTO post_save.event (sender, op, n, head, rows)
            SELECT {{sender}}, 'insert', count(*), v_head, json_agg(e.item)
              FROM (SELECT {{item}} AS item, (row_number() OVER () - 1) / {{CHUNK}} AS chunk
                      FROM (SELECT * FROM {{NEW_TABLE}} OFFSET {{CHUNK}}) n) e
             GROUP BY e.chunk;
        END IF;
        v_rows := coalesce(v_rows, 0);
