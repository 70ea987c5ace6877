//! The tables, declared once for both backends (see `migrations/` for the DDL).

diesel::table! {
    /// Hopper instances: the nodes of the Global -> Project -> Orchestration tree.
    hopper_instances (id) {
        id -> Text,
        name -> Text,
        scope -> Text,
        parent_id -> Nullable<Text>,
        status -> Text,
        config -> Jsonb,
        created_at -> Timestamp,
        updated_at -> Timestamp,
        lease_ms -> Nullable<BigInt>,
        lease_expires_at -> Nullable<Timestamp>,
    }
}

diesel::table! {
    /// Tasks, each held by one instance at a time.
    tasks (id) {
        id -> Text,
        title -> Text,
        description -> Text,
        instance_id -> Text,
        parent_task_id -> Nullable<Text>,
        status -> Text,
        result -> Nullable<Jsonb>,
        created_at -> Timestamp,
        updated_at -> Timestamp,
    }
}

diesel::table! {
    /// One row per hop of a task between two instances.
    task_delegations (id) {
        id -> Text,
        task_id -> Text,
        parent_delegation_id -> Nullable<Text>,
        source_instance_id -> Text,
        target_instance_id -> Text,
        delegation_type -> Text,
        status -> Text,
        delegated_at -> Timestamp,
        accepted_at -> Nullable<Timestamp>,
        completed_at -> Nullable<Timestamp>,
        result -> Nullable<Jsonb>,
        rejection_reason -> Nullable<Text>,
        notes -> Nullable<Text>,
        delegated_by -> Nullable<Text>,
        created_at -> Timestamp,
        updated_at -> Timestamp,
        accept_by -> Nullable<Timestamp>,
        complete_by -> Nullable<Timestamp>,
        expired_at -> Nullable<Timestamp>,
        expiry_reason -> Nullable<Text>,
    }
}

diesel::table! {
    /// The event log: one row per state change, in commit order.
    delegation_events (sequence) {
        sequence -> BigInt,
        kind -> Text,
        occurred_at -> Timestamp,
        task_id -> Text,
        delegation_id -> Nullable<Text>,
        source_instance_id -> Text,
        target_instance_id -> Text,
        caused_by_delegation_id -> Nullable<Text>,
        delegation -> Nullable<Jsonb>,
    }
}

diesel::table! {
    /// One row: how far retention has deleted the event log.
    event_log_state (id) {
        id -> Integer,
        pruned_through -> BigInt,
    }
}

diesel::table! {
    /// Create requests that carried a request_id, with what they created.
    idempotent_requests (request_id) {
        request_id -> Text,
        method -> Text,
        request -> Text,
        response -> Nullable<Text>,
        created_at -> Timestamp,
    }
}

diesel::joinable!(tasks -> hopper_instances (instance_id));
diesel::joinable!(task_delegations -> tasks (task_id));
diesel::allow_tables_to_appear_in_same_query!(
    hopper_instances,
    tasks,
    task_delegations,
    delegation_events,
    event_log_state,
    idempotent_requests
);
