-- Step 5: events are numbered in commit order by a sequencer instead of under a global lock.
-- A write transaction appends its events here, unnumbered, and commits without waiting for
-- anyone. The sequencer (one at a time across replicas, elected by a transaction-scoped
-- advisory lock) moves every committed row into delegation_events in insertion order, taking
-- sequence numbers as it goes. Readers read only delegation_events, so once they have seen
-- sequence N no row below N can appear later (see docs/ARCHITECTURE.md).
CREATE TABLE event_queue (
    id                       BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- The log's own check, so that a row the log would refuse fails its writer's transaction
    -- instead of every sequencer round after it.
    kind                     TEXT NOT NULL CHECK (kind IN ('delegation_created', 'delegation_accepted',
                                 'delegation_rejected', 'delegation_completed', 'delegation_cancelled',
                                 'task_completed')),
    occurred_at              TIMESTAMP NOT NULL,
    task_id                  TEXT NOT NULL,
    delegation_id            TEXT,
    source_instance_id       TEXT NOT NULL,
    target_instance_id       TEXT NOT NULL,
    caused_by_delegation_id  TEXT,
    delegation               JSONB
)
-- Every row is deleted soon after it is inserted: vacuum it often, or scans wade through
-- dead rows.
WITH (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 1000,
      autovacuum_analyze_scale_factor = 0, autovacuum_analyze_threshold = 1000);

-- One round of the sequencer: moves up to `batch` committed rows of the queue into the log,
-- oldest first, numbering them in that order; notifies `channel` if it moved any; returns how
-- many. The caller (store::events::sequence) passes both, so each is written down once. Call it in a transaction of its own (the advisory lock is held to its end).
--
-- The lock elects one caller at a time, so the numbers a call takes with nextval (after the
-- lock, above the ordered subquery) are higher than every number taken before, and they become
-- visible together when the call commits, after every earlier call's. A row whose writer has
-- not committed is not seen and waits for a later call. A function, so that its statements'
-- plans are kept for the session instead of being planned on every round.
CREATE FUNCTION hopper_number_events(batch BIGINT, channel TEXT) RETURNS BIGINT LANGUAGE plpgsql AS $$
DECLARE
    moved BIGINT;
BEGIN
    PERFORM pg_advisory_xact_lock(7243002);
    WITH queued AS (
        DELETE FROM event_queue
        WHERE id IN (SELECT id FROM event_queue ORDER BY id LIMIT batch)
        RETURNING *
    ), numbered AS (
        INSERT INTO delegation_events (sequence, kind, occurred_at, task_id, delegation_id,
            source_instance_id, target_instance_id, caused_by_delegation_id, delegation)
        OVERRIDING SYSTEM VALUE
        SELECT nextval(pg_get_serial_sequence('delegation_events', 'sequence')), kind,
               occurred_at, task_id, delegation_id, source_instance_id, target_instance_id,
               caused_by_delegation_id, delegation
        FROM (SELECT * FROM queued ORDER BY id) oldest_first
        RETURNING 1
    )
    SELECT count(*) INTO moved FROM numbered;
    IF moved > 0 THEN
        PERFORM pg_notify(channel, '');
    END IF;
    RETURN moved;
END
$$;
