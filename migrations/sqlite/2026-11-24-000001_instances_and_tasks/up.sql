-- Step 1, "the existing database": Hopper instances and the tasks they hold.
-- SQLite flavour: JSON columns hold SQLite binary JSONB in BLOBs (SQLite >= 3.45, bundled).
-- Timestamps are UTC without a zone; the application writes them truncated to microseconds.
CREATE TABLE hopper_instances (
    id          TEXT NOT NULL PRIMARY KEY,
    name        TEXT NOT NULL,
    scope       TEXT NOT NULL CHECK (scope IN
                    ('global', 'project', 'orchestration', 'personal', 'family', 'event', 'federated')),
    parent_id   TEXT REFERENCES hopper_instances (id),
    status      TEXT NOT NULL DEFAULT 'created' CHECK (status IN
                    ('created', 'starting', 'running', 'stopping', 'stopped', 'paused', 'error', 'terminated')),
    config      BLOB NOT NULL DEFAULT (jsonb('{}')),
    created_at  TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
    updated_at  TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP
);
CREATE INDEX hopper_instances_parent_id_idx ON hopper_instances (parent_id);

CREATE TABLE tasks (
    id              TEXT NOT NULL PRIMARY KEY,
    title           TEXT NOT NULL,
    description     TEXT NOT NULL DEFAULT '',
    instance_id     TEXT NOT NULL REFERENCES hopper_instances (id),
    parent_task_id  TEXT REFERENCES tasks (id),
    status          TEXT NOT NULL DEFAULT 'pending' CHECK (status IN
                        ('pending', 'claimed', 'in_progress', 'blocked', 'done', 'cancelled')),
    result          BLOB,
    created_at      TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
    updated_at      TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP
);
CREATE INDEX tasks_instance_id_idx ON tasks (instance_id);
CREATE INDEX tasks_parent_task_id_idx ON tasks (parent_task_id);
