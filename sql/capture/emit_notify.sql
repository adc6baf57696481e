        v_item := json_build_array({{pk}}, {{instance}}, {{old}}, {{changed}})::text;
        v_note := {{start}};
        IF octet_length(v_note) + octet_length(v_item) < {{fits}} THEN
            PERFORM pg_notify('post_save', v_note || ',"rows":[' || v_item || ']}');
        ELSE
            {{too_long}}
        END IF;
