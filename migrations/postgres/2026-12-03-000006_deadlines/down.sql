-- Expired hops become cancelled ones, and their events cancellations (with the snapshot of
-- the hop in each event too, which the older binary must be able to read).
UPDATE task_delegations SET status = 'cancelled' WHERE status = 'expired';
UPDATE delegation_events SET kind = 'delegation_cancelled',
    delegation = jsonb_set(delegation, '{status}', '"cancelled"')
    WHERE kind = 'delegation_expired';
UPDATE event_queue SET kind = 'delegation_cancelled',
    delegation = jsonb_set(delegation, '{status}', '"cancelled"')
    WHERE kind = 'delegation_expired';
ALTER TABLE event_queue DROP CONSTRAINT event_queue_kind_check;
ALTER TABLE event_queue ADD CONSTRAINT event_queue_kind_check CHECK (kind IN
    ('delegation_created', 'delegation_accepted', 'delegation_rejected', 'delegation_completed',
     'delegation_cancelled', 'task_completed'));
ALTER TABLE delegation_events DROP CONSTRAINT delegation_events_kind_check;
ALTER TABLE delegation_events ADD CONSTRAINT delegation_events_kind_check CHECK (kind IN
    ('delegation_created', 'delegation_accepted', 'delegation_rejected', 'delegation_completed',
     'delegation_cancelled', 'task_completed'));
DROP INDEX task_delegations_complete_due_idx;
DROP INDEX task_delegations_accept_due_idx;
ALTER TABLE task_delegations DROP COLUMN expiry_reason, DROP COLUMN expired_at,
    DROP COLUMN complete_by, DROP COLUMN accept_by;
ALTER TABLE task_delegations DROP CONSTRAINT task_delegations_status_check;
ALTER TABLE task_delegations ADD CONSTRAINT task_delegations_status_check CHECK (status IN
    ('pending', 'accepted', 'rejected', 'completed', 'cancelled'));
