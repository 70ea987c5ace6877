-- Step 5: events are numbered in commit order by a sequencer instead of under a global lock.
-- A write transaction appends its events here, unnumbered, and commits without waiting for
-- anyone. The sequencer (one at a time across replicas, elected by a transaction-scoped
-- advisory lock) moves every committed row into delegation_events in insertion order, taking
-- sequence numbers as it goes. Readers read only delegation_events, so once they have seen
-- sequence N no row below N can appear later (see docs/ARCHITECTURE.md).
CREATE TABLE event_queue (
    id                       BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind                     TEXT NOT NULL,
    occurred_at              TIMESTAMP NOT NULL,
    task_id                  TEXT NOT NULL,
    delegation_id            TEXT,
    source_instance_id       TEXT NOT NULL,
    target_instance_id       TEXT NOT NULL,
    caused_by_delegation_id  TEXT,
    delegation               JSONB
);
