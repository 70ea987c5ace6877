-- Step 6: deadlines on a hop. A hop may carry an accept deadline and a complete deadline
-- (absolute, from the database's clock at creation); one that passes ends the hop EXPIRED,
-- with its reason, and writes a delegation_expired event. Hops from before have none.
ALTER TABLE task_delegations DROP CONSTRAINT task_delegations_status_check;
ALTER TABLE task_delegations ADD CONSTRAINT task_delegations_status_check CHECK (status IN
    ('pending', 'accepted', 'rejected', 'completed', 'cancelled', 'expired'));
ALTER TABLE task_delegations
    ADD COLUMN accept_by      TIMESTAMP,
    ADD COLUMN complete_by    TIMESTAMP,
    -- When it expired, or when an expiry above it cancelled it; and why.
    ADD COLUMN expired_at     TIMESTAMP,
    ADD COLUMN expiry_reason  TEXT CHECK (expiry_reason IN
        ('accept_deadline', 'complete_deadline', 'target_unresponsive'));

-- What is due, for the sweepers: only active hops with a deadline are in these indexes, so
-- the next due time is one index probe whatever the size of the table.
CREATE INDEX task_delegations_accept_due_idx ON task_delegations (accept_by)
    WHERE status = 'pending' AND accept_by IS NOT NULL;
CREATE INDEX task_delegations_complete_due_idx ON task_delegations (complete_by)
    WHERE status IN ('pending', 'accepted') AND complete_by IS NOT NULL;

ALTER TABLE delegation_events DROP CONSTRAINT delegation_events_kind_check;
ALTER TABLE delegation_events ADD CONSTRAINT delegation_events_kind_check CHECK (kind IN
    ('delegation_created', 'delegation_accepted', 'delegation_rejected', 'delegation_completed',
     'delegation_cancelled', 'task_completed', 'delegation_expired'));
ALTER TABLE event_queue DROP CONSTRAINT event_queue_kind_check;
ALTER TABLE event_queue ADD CONSTRAINT event_queue_kind_check CHECK (kind IN
    ('delegation_created', 'delegation_accepted', 'delegation_rejected', 'delegation_completed',
     'delegation_cancelled', 'task_completed', 'delegation_expired'));
