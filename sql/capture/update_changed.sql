        v_changed := array_remove({{known}}, NULL);
        -- a column added or renamed since install changed too: ask the catalog
        IF (v_new - {{names}}) <> '{}'::jsonb AND (v_new - v_changed) <> (v_old - v_changed) THEN
            v_changed := post_save.changed_columns(TG_RELID, v_new, v_old);
        END IF;
        IF cardinality(v_changed) = 0 THEN
            RETURN NULL;
        END IF;

