DROP TABLE tasks;
DROP TABLE hopper_instances;
