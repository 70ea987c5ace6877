//! The embedded migrations on both backends: fresh, from an existing step-1 database with
//! rows, repeated, and reverted and re-applied with the schema compared.

mod common;

use common::{Backend, TestDb, execute, text_rows};
use hopper_delegation::auth::Caller;
use hopper_delegation::store::{self, Db, Migrate};

/// How many migrations there are: PostgreSQL has one more, the event queue its sequencer
/// needs (SQLite numbers events at insert, with its single writer).
fn steps(backend: Backend) -> usize {
    match backend {
        Backend::Sqlite => 6,
        Backend::Postgres => 7,
    }
}

/// The schema as text, without diesel's own bookkeeping table.
async fn schema(db: &Db, backend: Backend) -> Vec<String> {
    let sql = match backend {
        Backend::Sqlite => {
            "SELECT type || ' ' || name || ': ' || COALESCE(sql, '') AS line FROM sqlite_master
             WHERE name NOT LIKE '__diesel%' AND name NOT LIKE 'sqlite_%' ORDER BY 1"
        }
        Backend::Postgres => {
            "SELECT table_name || '.' || column_name || ' ' || data_type || ' ' || is_nullable
                    || ' ' || COALESCE(column_default, '') AS line
             FROM information_schema.columns
             WHERE table_schema = 'public' AND table_name NOT LIKE '__diesel%'
             UNION ALL
             SELECT indexdef FROM pg_indexes
             WHERE schemaname = 'public' AND tablename NOT LIKE '__diesel%'
             UNION ALL
             SELECT conrelid::regclass::text || ' ' || conname || ' ' || pg_get_constraintdef(oid)
             FROM pg_constraint
             WHERE connamespace = 'public'::regnamespace
               AND conrelid::regclass::text NOT LIKE '__diesel%'
             ORDER BY 1"
        }
    };
    text_rows(&mut db.conn().await.expect("conn"), sql).await
}

async fn a_fresh_database_migrates_to_the_latest_schema(backend: Backend) {
    let db = TestDb::empty(backend).await;
    let applied = store::migrate(&db.url, Migrate::Latest).await.unwrap();
    assert_eq!(applied.len(), steps(backend), "{applied:?}");
    let tables = schema(&db.pool(), backend).await.join("\n");
    for table in [
        "hopper_instances",
        "tasks",
        "task_delegations",
        "delegation_events",
        "event_log_state",
    ] {
        assert!(tables.contains(table), "{table} missing from\n{tables}");
    }
}

async fn running_migrations_twice_is_a_no_op(backend: Backend) {
    let db = TestDb::migrated(backend).await;
    let before = schema(&db.pool(), backend).await;
    assert_eq!(
        store::migrate(&db.url, Migrate::Latest).await.unwrap(),
        Vec::<String>::new()
    );
    assert_eq!(schema(&db.pool(), backend).await, before);
}

async fn an_existing_database_with_rows_migrates_with_its_rows_intact(backend: Backend) {
    let db = TestDb::empty(backend).await;
    let step_one = store::migrate(&db.url, Migrate::Steps(1)).await.unwrap();
    assert_eq!(step_one.len(), 1);
    let pool = db.pool();
    let mut conn = pool.conn().await.unwrap();
    // Rows as an older Hopper wrote them, relying on the column defaults.
    execute(
        &mut conn,
        "INSERT INTO hopper_instances (id, name, scope, status) VALUES
             ('global', 'Global', 'global', 'running');
         INSERT INTO hopper_instances (id, name, scope, parent_id, status) VALUES
             ('project', 'Project', 'project', 'global', 'running');
         INSERT INTO tasks (id, title, instance_id, status) VALUES
             ('old-task', 'Written before delegations existed', 'global', 'pending');",
    )
    .await;
    let rows = "SELECT id || ' ' || status AS line FROM hopper_instances
                UNION ALL SELECT id || ' ' || title || ' ' || instance_id FROM tasks
                ORDER BY 1";
    let before = text_rows(&mut conn, rows).await;
    drop(conn);

    let rest = store::migrate(&db.url, Migrate::Latest).await.unwrap();
    assert_eq!(rest.len(), steps(backend) - 1);
    let mut conn = pool.conn().await.unwrap();
    assert_eq!(text_rows(&mut conn, rows).await, before);
    drop(conn);

    // The old rows work with the new table: the old task can be delegated.
    common::hierarchy_rest(&pool).await;
    let hop = common::hop(
        "old-task",
        "global",
        "project",
        hopper_delegation::domain::DelegationType::Route,
    );
    let delegation = hopper_delegation::repository::delegations::create(&pool, &Caller::Admin, hop)
        .await
        .unwrap();
    assert_eq!(delegation.task_id, "old-task");
}

async fn every_migration_reverts_and_reapplies_cleanly(backend: Backend) {
    let db = TestDb::empty(backend).await;
    let pool = db.pool();
    let mut dumps = vec![schema(&pool, backend).await];
    for step in 1..=steps(backend) {
        assert_eq!(
            store::migrate(&db.url, Migrate::Steps(1))
                .await
                .unwrap()
                .len(),
            1
        );
        dumps.push(schema(&pool, backend).await);
        assert_ne!(dumps[step], dumps[step - 1], "step {step} changed nothing");
    }
    for level in (0..steps(backend)).rev() {
        assert_eq!(
            store::migrate(&db.url, Migrate::Revert(1))
                .await
                .unwrap()
                .len(),
            1
        );
        assert_eq!(
            schema(&pool, backend).await,
            dumps[level],
            "after reverting to {level}"
        );
    }
    assert_eq!(
        store::migrate(&db.url, Migrate::Latest)
            .await
            .unwrap()
            .len(),
        steps(backend)
    );
    assert_eq!(schema(&pool, backend).await, dumps[steps(backend)]);
}

on_both_backends!(
    a_fresh_database_migrates_to_the_latest_schema,
    running_migrations_twice_is_a_no_op,
    an_existing_database_with_rows_migrates_with_its_rows_intact,
    every_migration_reverts_and_reapplies_cleanly
);
