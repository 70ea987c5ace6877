-- Expired hops become cancelled ones, and their events cancellations; the tables are rebuilt
-- as step 2 and 3 made them.
PRAGMA foreign_keys = OFF;
BEGIN IMMEDIATE;
UPDATE task_delegations SET status = 'cancelled' WHERE status = 'expired';
UPDATE delegation_events SET kind = 'delegation_cancelled',
    delegation = jsonb_set(delegation, '$.status', 'cancelled')
    WHERE kind = 'delegation_expired';

ALTER TABLE task_delegations RENAME TO task_delegations_old;
CREATE TABLE task_delegations (
    id                    TEXT NOT NULL PRIMARY KEY,
    task_id               TEXT NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    -- The accepted delegation this hop continues; NULL at the origin of the chain.
    parent_delegation_id  TEXT REFERENCES task_delegations (id),
    source_instance_id    TEXT NOT NULL REFERENCES hopper_instances (id),
    target_instance_id    TEXT NOT NULL REFERENCES hopper_instances (id),
    delegation_type       TEXT NOT NULL CHECK (delegation_type IN ('route', 'decompose', 'escalate', 'reassign')),
    status                TEXT NOT NULL DEFAULT 'pending' CHECK (status IN
                              ('pending', 'accepted', 'rejected', 'completed', 'cancelled')),
    delegated_at          TIMESTAMP NOT NULL,
    accepted_at           TIMESTAMP,
    completed_at          TIMESTAMP,
    result                BLOB,
    rejection_reason      TEXT,
    notes                 TEXT,
    delegated_by          TEXT,
    created_at            TIMESTAMP NOT NULL,
    updated_at            TIMESTAMP NOT NULL,
    CONSTRAINT task_delegations_not_to_self CHECK (source_instance_id <> target_instance_id)
);
INSERT INTO task_delegations (id, task_id, parent_delegation_id, source_instance_id, target_instance_id,
        delegation_type, status, delegated_at, accepted_at, completed_at, result,
        rejection_reason, notes, delegated_by, created_at, updated_at)
    SELECT id, task_id, parent_delegation_id, source_instance_id, target_instance_id,
        delegation_type, status, delegated_at, accepted_at, completed_at, result,
        rejection_reason, notes, delegated_by, created_at, updated_at
    FROM task_delegations_old;
DROP TABLE task_delegations_old;
CREATE INDEX task_delegations_task_id_idx ON task_delegations (task_id);
CREATE INDEX task_delegations_source_instance_id_idx ON task_delegations (source_instance_id);
CREATE INDEX task_delegations_target_instance_id_idx ON task_delegations (target_instance_id);
CREATE INDEX task_delegations_status_idx ON task_delegations (status);
CREATE INDEX task_delegations_target_status_idx ON task_delegations (target_instance_id, status);
CREATE INDEX task_delegations_parent_delegation_id_idx ON task_delegations (parent_delegation_id);
-- At most one pending delegation per task, whatever the application does.
CREATE UNIQUE INDEX task_delegations_one_pending_per_task ON task_delegations (task_id)
    WHERE status = 'pending';

ALTER TABLE delegation_events RENAME TO delegation_events_old;
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
INSERT INTO delegation_events SELECT * FROM delegation_events_old;
-- AUTOINCREMENT never reuses a sequence, even of pruned events: carry the high mark over.
DELETE FROM sqlite_sequence WHERE name = 'delegation_events';
UPDATE sqlite_sequence SET name = 'delegation_events' WHERE name = 'delegation_events_old';
DROP TABLE delegation_events_old;
CREATE INDEX delegation_events_occurred_at_idx ON delegation_events (occurred_at);

COMMIT;
PRAGMA foreign_keys = ON;
