DROP TABLE sweeper_heartbeat;
DROP INDEX hopper_instances_lease_expires_at_idx;
ALTER TABLE hopper_instances DROP COLUMN lease_expires_at;
ALTER TABLE hopper_instances DROP COLUMN lease_ms;
