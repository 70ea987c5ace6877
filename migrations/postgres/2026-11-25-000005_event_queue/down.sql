-- Whatever is still queued goes into the log, in order, before the queue goes.
INSERT INTO delegation_events (kind, occurred_at, task_id, delegation_id, source_instance_id,
                               target_instance_id, caused_by_delegation_id, delegation)
SELECT kind, occurred_at, task_id, delegation_id, source_instance_id, target_instance_id,
       caused_by_delegation_id, delegation
FROM (SELECT * FROM event_queue ORDER BY id) queued;
DROP FUNCTION hopper_number_events();
DROP TABLE event_queue;
