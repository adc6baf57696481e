        v_new := to_jsonb(NEW);
        IF {{moving}} THEN
            v_old := nullif(current_setting('post_save.moved', true), '')::jsonb;
            PERFORM set_config('post_save.moved', '', true);
        END IF;
        IF v_old IS NOT NULL THEN
{{update}}
        ELSE
{{insert}}
        END IF;
