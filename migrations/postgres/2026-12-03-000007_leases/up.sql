-- Step 7: instance leases. An instance registered with a lease renews it; once it lapses the
-- instance is unresponsive and the hops whose task is at it expire. Instances from before
-- have no lease.
ALTER TABLE hopper_instances
    ADD COLUMN lease_ms          BIGINT CHECK (lease_ms BETWEEN 1000 AND 3600000),
    ADD COLUMN lease_expires_at  TIMESTAMP;
CREATE INDEX hopper_instances_lease_expires_at_idx ON hopper_instances (lease_expires_at)
    WHERE lease_expires_at IS NOT NULL;

-- The restart brake: every replica's sweeper beats here about once a second. A gap longer
-- than a beat or two means no replica was running (or none reached the database), so no lease
-- could be renewed: the first sweeper to see the gap gives every lease a full period.
CREATE TABLE sweeper_heartbeat (
    id       INTEGER NOT NULL PRIMARY KEY CHECK (id = 1),
    beat_at  TIMESTAMP NOT NULL
);
INSERT INTO sweeper_heartbeat (id, beat_at) VALUES (1, CAST(statement_timestamp() AT TIME ZONE 'UTC' AS TIMESTAMP));
