-- Step 3 (SQLite): the event log, the truth behind WatchEvents. AUTOINCREMENT never reuses a
-- sequence, and SQLite has one writer at a time, so sequence order is commit order.
CREATE TABLE delegation_events (
    sequence                 INTEGER PRIMARY KEY AUTOINCREMENT,
    kind                     TEXT NOT NULL CHECK (kind IN ('delegation_created', 'delegation_accepted',
                                 'delegation_rejected', 'delegation_completed', 'delegation_cancelled',
                                 'task_completed')),
    occurred_at              TIMESTAMP NOT NULL,
    task_id                  TEXT NOT NULL,
    -- NULL for a task completed where it started, with no delegation.
    delegation_id            TEXT,
    -- The instances whose streams carry the event: the delegation's source and target (for a
    -- task_completed event, both are the instance where the task started).
    source_instance_id       TEXT NOT NULL,
    target_instance_id       TEXT NOT NULL,
    -- The delegation whose completion or cancellation caused this event, for bubbled and
    -- cascaded events.
    caused_by_delegation_id  TEXT,
    -- The delegation as it was right after the change.
    delegation               BLOB
);
CREATE INDEX delegation_events_occurred_at_idx ON delegation_events (occurred_at);

-- Everything up to `pruned_through` has been deleted by retention; a resume from before it
-- is OUT_OF_RANGE rather than a silent gap.
CREATE TABLE event_log_state (
    id              INTEGER NOT NULL PRIMARY KEY CHECK (id = 1),
    pruned_through  BIGINT NOT NULL
);
INSERT INTO event_log_state (id, pruned_through) VALUES (1, 0);
