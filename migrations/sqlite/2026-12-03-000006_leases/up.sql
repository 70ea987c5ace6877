-- Step 6 (SQLite): instance leases and the restart brake (see the PostgreSQL migration).
ALTER TABLE hopper_instances ADD COLUMN lease_ms BIGINT CHECK (lease_ms BETWEEN 1000 AND 3600000);
ALTER TABLE hopper_instances ADD COLUMN lease_expires_at TIMESTAMP;
CREATE INDEX hopper_instances_lease_expires_at_idx ON hopper_instances (lease_expires_at)
    WHERE lease_expires_at IS NOT NULL;

CREATE TABLE sweeper_heartbeat (
    id       INTEGER NOT NULL PRIMARY KEY CHECK (id = 1),
    beat_at  TIMESTAMP NOT NULL
);
INSERT INTO sweeper_heartbeat (id, beat_at) VALUES (1, strftime('%Y-%m-%d %H:%M:%f', 'now'));
