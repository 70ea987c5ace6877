-- Whatever is still queued goes into the log, in order, before the queue goes, under the
-- lock that orders event inserts (the sequencer's, and the one earlier versions take).
SELECT pg_advisory_xact_lock(7243002);
INSERT INTO delegation_events (kind, occurred_at, task_id, delegation_id, source_instance_id,
                               target_instance_id, caused_by_delegation_id, delegation)
SELECT kind, occurred_at, task_id, delegation_id, source_instance_id, target_instance_id,
       caused_by_delegation_id, delegation
FROM (SELECT * FROM event_queue ORDER BY id) queued;
DROP FUNCTION hopper_number_events(BIGINT, TEXT);
DROP TABLE event_queue;
