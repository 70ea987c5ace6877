DROP TABLE task_delegations;
