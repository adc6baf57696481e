v_note := v_note || ',"reread":true,"pk":' || ({{pk}})::text
                      || ',"update_fields":' || coalesce(to_json({{changed}})::text, 'null') || '}';
            IF octet_length(v_note) < {{NOTE_LIMIT}} THEN
                PERFORM pg_notify('post_save', v_note);
            ELSE
                {{too_big}}
            END IF;
