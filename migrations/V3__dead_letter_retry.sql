-- `post-save dead retry` sets retry_requested_at; the running daemon picks such dead letters up
-- within a second, runs the event through that handler again, and deletes the dead letter when
-- it succeeds (or records the new attempts and error and clears the request when it fails).
ALTER TABLE post_save.dead_letter ADD COLUMN retry_requested_at timestamptz;

CREATE INDEX dead_letter_retry_idx ON post_save.dead_letter (id) WHERE retry_requested_at IS NOT NULL;
CREATE INDEX dead_letter_dead_at_idx ON post_save.dead_letter (dead_at);
