        INSERT INTO post_save.event (sender, op, n, head, rows)
        VALUES ({{sender}}, '{{name}}', 1, v_head,
                json_build_array(json_build_array({{pk}}, {{instance}}, {{old}}, {{changed}})));
        v_rows := 1;
