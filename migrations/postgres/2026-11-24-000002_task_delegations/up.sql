-- Step 2: one row per hop of a task between two instances.
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
    result                JSONB,
    rejection_reason      TEXT,
    notes                 TEXT,
    delegated_by          TEXT,
    created_at            TIMESTAMP NOT NULL,
    updated_at            TIMESTAMP NOT NULL,
    CONSTRAINT task_delegations_not_to_self CHECK (source_instance_id <> target_instance_id)
);
CREATE INDEX task_delegations_task_id_idx ON task_delegations (task_id);
CREATE INDEX task_delegations_source_instance_id_idx ON task_delegations (source_instance_id);
CREATE INDEX task_delegations_target_instance_id_idx ON task_delegations (target_instance_id);
CREATE INDEX task_delegations_status_idx ON task_delegations (status);
CREATE INDEX task_delegations_target_status_idx ON task_delegations (target_instance_id, status);
CREATE INDEX task_delegations_parent_delegation_id_idx ON task_delegations (parent_delegation_id);
-- At most one pending delegation per task, whatever the application does.
CREATE UNIQUE INDEX task_delegations_one_pending_per_task ON task_delegations (task_id)
    WHERE status = 'pending';
