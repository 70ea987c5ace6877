//! The `delegation_events` log: appended in the transaction of the change it records, read by
//! sequence, pruned by age.
//!
//! Sequence order must be commit order, or a reader that has seen sequence N and asks for
//! "> N" could miss a row with a lower sequence that commits later. SQLite has one writer at a
//! time, so events numbered at insert hold it by construction. On PostgreSQL a number taken at
//! insert becomes visible only at commit, so writers append to `event_queue` unnumbered and
//! commit without waiting for one another; [`sequence`] (run by `store::sequencer`, one at a
//! time across replicas under an advisory lock) moves the committed rows into the log in
//! insertion order, numbering them as it goes. Readers read only the log.

use chrono::NaiveDateTime;
use diesel::{
    prelude::*,
    sql_types::{Array, BigInt, Bool, Jsonb, Nullable, Text, Timestamp},
};
use diesel_async::RunQueryDsl;

use super::{
    Bind, Conn, Tx,
    delegations::Delegation,
    schema::{delegation_events as de, event_log_state},
    sql,
    tasks::Task,
    with_conn,
};
use crate::domain::EventKind;

/// The PostgreSQL channel on which the sequencer of any replica announces newly numbered
/// events, waking the event streams of every replica.
pub(crate) const CHANNEL: &str = "hopper_events";

/// One entry of the log.
#[derive(Debug, Clone, PartialEq, Queryable, QueryableByName, Selectable)]
#[diesel(table_name = de)]
pub struct Event {
    /// Server-wide position, increasing in commit order.
    pub sequence: i64,
    /// What happened.
    pub kind: EventKind,
    /// When it happened.
    pub occurred_at: NaiveDateTime,
    /// The task concerned.
    pub task_id: String,
    /// The delegation concerned; `None` for a task completed where it started.
    pub delegation_id: Option<String>,
    /// One of the two instances whose streams carry the event.
    pub source_instance_id: String,
    /// The other one.
    pub target_instance_id: String,
    /// The delegation whose completion or cancellation caused this event.
    pub caused_by_delegation_id: Option<String>,
    /// The delegation right after the change.
    pub delegation: Option<serde_json::Value>,
}

/// An entry to append.
#[derive(Debug, Clone, Insertable)]
#[diesel(table_name = de, treat_none_as_default_value = false)]
pub struct NewEvent {
    kind: EventKind,
    occurred_at: NaiveDateTime,
    task_id: String,
    delegation_id: Option<String>,
    source_instance_id: String,
    target_instance_id: String,
    caused_by_delegation_id: Option<String>,
    delegation: Option<serde_json::Value>,
}

impl NewEvent {
    /// A change of `delegation`, carried by the streams of its source and target.
    pub fn of(kind: EventKind, delegation: &Delegation, caused_by: Option<&str>) -> Self {
        Self {
            kind,
            occurred_at: delegation.updated_at,
            task_id: delegation.task_id.clone(),
            delegation_id: Some(delegation.id.clone()),
            source_instance_id: delegation.source_instance_id.clone(),
            target_instance_id: delegation.target_instance_id.clone(),
            caused_by_delegation_id: caused_by.map(str::to_owned),
            delegation: serde_json::to_value(delegation).ok(),
        }
    }

    /// The task of `origin` is done; the event belongs to the instance where the task started.
    pub fn task_completed(origin: &Delegation) -> Self {
        Self {
            target_instance_id: origin.source_instance_id.clone(),
            ..Self::of(EventKind::TaskCompleted, origin, Some(&origin.id))
        }
    }
}

impl NewEvent {
    /// A task with no delegation completed where it is; carried by that instance's stream.
    pub(crate) fn task_completed_in_place(task: &Task) -> Self {
        Self {
            kind: EventKind::TaskCompleted,
            occurred_at: task.updated_at,
            task_id: task.id.clone(),
            delegation_id: None,
            source_instance_id: task.instance_id.clone(),
            target_instance_id: task.instance_id.clone(),
            caused_by_delegation_id: None,
            delegation: None,
        }
    }
}

impl Event {
    /// The delegation as recorded in the event, if the event concerns one.
    pub fn delegation(&self) -> Result<Option<Delegation>, serde_json::Error> {
        self.delegation
            .clone()
            .map(serde_json::from_value)
            .transpose()
    }
}

/// Appends events, in order, inside the caller's transaction: on PostgreSQL to the queue, in
/// one statement; on SQLite to the log itself.
pub async fn append(tx: &mut Tx, events: &[NewEvent]) -> QueryResult<()> {
    if events.is_empty() {
        return Ok(());
    }
    tx.appended = true;
    let queued = !tx.db.number_at_insert;
    let conn: &mut Conn = tx;
    if let Conn::Pg(c) = conn
        && queued
    {
        // unnest keeps the array order, so the queue's ids follow the order of `events`.
        const QUEUE: &str = "
            INSERT INTO event_queue (kind, occurred_at, task_id, delegation_id,
                source_instance_id, target_instance_id, caused_by_delegation_id, delegation)
            SELECT * FROM unnest($1::text[], $2::timestamp[], $3::text[], $4::text[], $5::text[],
                                 $6::text[], $7::text[], $8::jsonb[])";
        fn column<'a, T>(events: &'a [NewEvent], f: impl Fn(&'a NewEvent) -> T) -> Vec<T> {
            events.iter().map(f).collect()
        }
        return sql(QUEUE)
            .bind::<Array<Text>, _>(column(events, |e| e.kind))
            .bind::<Array<Timestamp>, _>(column(events, |e| e.occurred_at))
            .bind::<Array<Text>, _>(column(events, |e| e.task_id.as_str()))
            .bind::<Array<Nullable<Text>>, _>(column(events, |e| e.delegation_id.as_deref()))
            .bind::<Array<Text>, _>(column(events, |e| e.source_instance_id.as_str()))
            .bind::<Array<Text>, _>(column(events, |e| e.target_instance_id.as_str()))
            .bind::<Array<Nullable<Text>>, _>(column(events, |e| {
                e.caused_by_delegation_id.as_deref()
            }))
            .bind::<Array<Nullable<Jsonb>>, _>(column(events, |e| e.delegation.as_ref()))
            .execute(&mut **c)
            .await
            .map(drop);
    }
    // One row per statement: diesel-async has no multi-row insert with nullable columns on
    // SQLite, and an operation appends few rows (its delegation, plus one per bubbled hop).
    for event in events {
        with_conn!(conn, |c| diesel::insert_into(de::table)
            .values(event)
            .execute(c)
            .await)?;
    }
    Ok(())
}

/// How many queued events one [`sequence`] call moves at most.
pub(crate) const SEQUENCE_BATCH: i64 = 10_000;

/// PostgreSQL: moves up to [`SEQUENCE_BATCH`] committed events of the queue into the log,
/// oldest first, numbering them in that order, announces them on [`CHANNEL`], and returns how
/// many it moved; 0 on SQLite, which has no queue. Run it outside a transaction: it is one
/// statement, its own transaction, calling `hopper_number_events` (migration 5), whose
/// advisory lock lets one caller at a time number events and is held to the commit.
///
/// Why this keeps sequence order = commit order: each call takes its numbers (`nextval`, above
/// an ordered subquery) after the previous call has committed, so they are higher than every
/// number visible; they all become visible at once, when the call commits. A queued row whose
/// writer has not committed is not seen and waits for a later call.
pub async fn sequence(conn: &mut Conn) -> QueryResult<i64> {
    #[derive(QueryableByName)]
    struct Moved {
        #[diesel(sql_type = BigInt)]
        moved: i64,
    }
    let Conn::Pg(c) = conn else { return Ok(0) };
    let Moved { moved } = sql("SELECT hopper_number_events($1, $2) AS moved")
        .bind::<BigInt, _>(SEQUENCE_BATCH)
        .bind::<Text, _>(CHANNEL)
        .get_result(&mut **c)
        .await?;
    Ok(moved)
}

/// Which instances' events a reader wants: one instance's, or also those of every instance
/// below it (not to be confused with `domain::Scope`, an instance's place in the tree).
#[derive(Debug, Clone)]
pub struct Watched {
    /// The instance watched.
    pub instance_id: String,
    /// Also every instance below it, including ones registered later.
    pub include_descendants: bool,
}

/// Events of `scope` (every event for `None`) with a sequence above `after`, oldest first, at
/// most `limit`.
pub async fn read(
    conn: &mut Conn,
    scope: Option<&Watched>,
    after: i64,
    limit: i64,
) -> QueryResult<Vec<Event>> {
    const READ_SCOPE: &str = "
        WITH RECURSIVE scope (id) AS (
            SELECT id FROM hopper_instances WHERE id = $1
            UNION
            SELECT i.id FROM hopper_instances i JOIN scope s ON i.parent_id = s.id WHERE $2
        )
        SELECT e.* FROM delegation_events e
        WHERE e.sequence > $3
          AND (e.source_instance_id IN (SELECT id FROM scope)
               OR e.target_instance_id IN (SELECT id FROM scope))
        ORDER BY e.sequence
        LIMIT $4";
    let Some(scope) = scope else {
        return with_conn!(conn, |c| de::table
            .filter(de::sequence.gt(after))
            .order(de::sequence)
            .limit(limit)
            .select(Event::as_select())
            .load(c)
            .await);
    };
    with_conn!(conn, |c| sql(READ_SCOPE)
        .bind::<Text, _>(&scope.instance_id)
        .bind::<Bool, _>(scope.include_descendants)
        .bind::<BigInt, _>(after)
        .bind::<BigInt, _>(limit)
        .load(c)
        .await)
}

/// A page of the log after a cursor.
#[derive(Debug)]
pub struct Page {
    /// The matching events, oldest first.
    pub events: Vec<Event>,
    /// Every event up to here has been looked at: the last event's sequence for a full page,
    /// the log's head for a short one. A cursor may move here once `events` are delivered.
    pub through: i64,
    /// The page is full: more events may follow.
    pub full: bool,
}

/// Reads up to `limit` events of `scope` after `after`, in three statements: the bounds, the
/// events, the pruning watermark again. `Err` with the bounds if retention has deleted, or
/// may have deleted while reading, events after `after`: the page could have a hole.
///
/// The head is read before the events, and sequence order is commit order, so after a short
/// page nothing up to that head remains unseen.
pub async fn page(
    conn: &mut Conn,
    scope: Option<&Watched>,
    after: i64,
    limit: i64,
) -> QueryResult<Result<Page, Bounds>> {
    let before = bounds(conn).await?;
    if after < before.pruned_through {
        return Ok(Err(before));
    }
    let events = read(conn, scope, after, limit).await?;
    let pruned_through = bounds(conn).await?.pruned_through;
    if after < pruned_through {
        return Ok(Err(Bounds {
            pruned_through,
            ..before
        }));
    }
    let full = i64::try_from(events.len()).unwrap_or(i64::MAX) >= limit;
    let last = events.last().map_or(after, |e| e.sequence);
    let through = if full { last } else { last.max(before.head) };
    Ok(Ok(Page {
        events,
        through,
        full,
    }))
}

/// Up to `limit` events after `after`, with the log's bounds, in one statement, so that both
/// come from one snapshot: for the live tail, which reads every event. `Err` with the bounds
/// if retention deleted events after `after`. An empty page moves nothing (`through` is
/// `after`): its bounds are not read.
pub async fn tail(conn: &mut Conn, after: i64, limit: i64) -> QueryResult<Result<Page, Bounds>> {
    #[derive(QueryableByName)]
    struct Row {
        #[diesel(embed)]
        event: Event,
        #[diesel(sql_type = BigInt)]
        head: i64,
        #[diesel(sql_type = BigInt)]
        pruned_through: i64,
    }
    const TAIL: &str = "
        SELECT e.*, b.head, b.pruned_through
        FROM delegation_events e
        CROSS JOIN (SELECT COALESCE((SELECT max(sequence) FROM delegation_events), 0) AS head,
                           pruned_through
                    FROM event_log_state) b
        WHERE e.sequence > $1
        ORDER BY e.sequence
        LIMIT $2";
    let rows: Vec<Row> = with_conn!(conn, |c| sql(TAIL)
        .bind::<BigInt, _>(after)
        .bind::<BigInt, _>(limit)
        .load(c)
        .await)?;
    let Some(&Row {
        head,
        pruned_through,
        ..
    }) = <[Row]>::first(&rows)
    else {
        return Ok(Ok(Page {
            events: Vec::new(),
            through: after,
            full: false,
        }));
    };
    if after < pruned_through {
        return Ok(Err(Bounds {
            head,
            pruned_through,
        }));
    }
    let full = i64::try_from(rows.len()).unwrap_or(i64::MAX) >= limit;
    let events: Vec<Event> = rows.into_iter().map(|row| row.event).collect();
    let last = events.last().map_or(after, |e| e.sequence);
    Ok(Ok(Page {
        through: if full { last } else { last.max(head) },
        events,
        full,
    }))
}

/// Where the log stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    /// The highest sequence written so far (0 for an empty log).
    pub head: i64,
    /// Every event up to here was deleted by retention.
    pub pruned_through: i64,
}

/// Reads the log's head and pruning watermark.
pub async fn bounds(conn: &mut Conn) -> QueryResult<Bounds> {
    let (max, pruned_through) = with_conn!(conn, |c| event_log_state::table
        .select((
            de::table
                .select(diesel::dsl::max(de::sequence))
                .single_value(),
            event_log_state::pruned_through,
        ))
        .first::<(Option<i64>, i64)>(c)
        .await)?;
    Ok(Bounds {
        head: max.unwrap_or(0).max(pruned_through),
        pruned_through,
    })
}

/// Deletes the events that occurred before `cutoff` and moves the watermark; returns how many
/// were deleted.
pub(crate) async fn prune(conn: &mut Conn, cutoff: NaiveDateTime) -> QueryResult<usize> {
    let through: Option<i64> = with_conn!(conn, |c| de::table
        .filter(de::occurred_at.lt(cutoff))
        .select(diesel::dsl::max(de::sequence))
        .first(c)
        .await)?;
    let Some(through) = through else { return Ok(0) };
    with_conn!(conn, |c| {
        let deleted = diesel::delete(de::table.filter(de::sequence.le(through)))
            .execute(c)
            .await?;
        diesel::update(event_log_state::table.filter(event_log_state::pruned_through.lt(through)))
            .set(event_log_state::pruned_through.eq(through))
            .execute(c)
            .await?;
        Ok(deleted)
    })
}
