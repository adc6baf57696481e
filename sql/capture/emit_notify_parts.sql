v_part := v_txid || '.' || (coalesce(nullif(current_setting('post_save.part', true), ''), '0')::bigint + 1);
            PERFORM set_config('post_save.part', split_part(v_part, '.', 2), true);
            v_bytes := convert_to(v_item, 'UTF8');
            -- bytes per part: three for every four base64 characters that fit
            v_room := ({{limit}} - octet_length(v_note)) / 4 * 3;
            IF v_room <= 0 THEN
                {{too_big}}
            ELSE
                v_parts := (octet_length(v_bytes) + v_room - 1) / v_room;
                FOR i IN 0 .. v_parts - 1 LOOP
                    PERFORM pg_notify('post_save', v_note || ',"part":[' || i || ',' || v_parts || ',"' || v_part || '"],"data":"'
                        || translate(encode(substring(v_bytes FROM i * v_room + 1 FOR v_room), 'base64'), chr(10), '') || '"}');
                END LOOP;
            END IF;
