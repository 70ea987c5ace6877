DROP TABLE event_log_state;
DROP TABLE delegation_events;
