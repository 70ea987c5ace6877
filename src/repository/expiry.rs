//! Expiry: ending hops whose deadline passed or whose target stopped renewing its lease, and
//! the sweeper that finds them.
//!
//! **Exactly once.** Each expiry is one transaction under the task family's lock, like every
//! other write. Inside it the hop is read afresh and the rules decide from the database's clock
//! whether it is due ([`lifecycle::due`]: a deadline passed; [`lifecycle::abandoned`]: its
//! target's lease lapsed while the task is at it); if so, the hop ends EXPIRED through the same
//! compare-and-set and cascade as a cancellation (`completion::cancel_in`). A second sweeper
//! (another replica) or a racing accept, reject or completion that takes the lock first leaves
//! nothing due, so the hop has exactly one outcome and the log one event for it.
//!
//! **Prompt, without polling the table.** Each replica runs one [`sweeper`]. A pass beats the
//! restart brake's heartbeat, expires what is due (read from partial indexes that hold only
//! active hops with a deadline, and the lapsed instances' active hops), asks the indexes for the
//! next deadline or lease to lapse, and sleeps until then, or until a hop is written here with
//! an earlier deadline; at most [`HEARTBEAT`], so that a deadline written on another replica
//! (or a lost wake-up) waits at most that long.
//!
//! **The restart brake.** While no replica runs (or none reaches the database) no instance can
//! renew its lease. The first pass after such a gap (no heartbeat for [`BRAKE_GAP`]) gives every
//! lease a full period from now before anything expires for unresponsiveness. Hop deadlines are
//! not extended: they fire as soon as the service is back, late but once.

use std::{
    collections::{HashMap, HashSet},
    time::{Duration, Instant},
};

use chrono::NaiveDateTime;

use super::completion::cancel_in;
use crate::{
    domain::{
        DelegationStatus, ExpiryReason,
        lifecycle::{self, Expiry, Transition},
    },
    error::Error,
    store::{
        Db, Tx,
        delegations::{self, Change, Delegation},
        event_log::{self, NewEvent},
        instances, now, tasks,
    },
    telemetry,
};

/// How many due hops one pass reads before expiring them.
const BATCH: i64 = 256;

/// How many expiries share a transaction: enough that a storm is not a commit per hop, few
/// enough that writers waiting for the same families (or SQLite's one writer) wait little.
const CHUNK: usize = 64;

/// The longest the sweeper sleeps: the restart brake's heartbeat, and the bound on a lost
/// wake-up.
pub const HEARTBEAT: Duration = Duration::from_secs(1);

/// A heartbeat older than this means no replica was sweeping: leases get a full period.
pub const BRAKE_GAP: Duration = Duration::from_secs(3);

/// Expires delegation `id` if it is due by the database's clock; `false` if it is not (not due
/// yet, or answered, finished or expired meanwhile, or its task passed further down).
pub async fn expire_if_due(db: &Db, id: &str) -> Result<bool, Error> {
    Ok(expire_chunk(db, &[id]).await? == 1)
}

/// Expires those of `ids` that are due, in one transaction, under their families' locks (one
/// statement for all), judged at one clock read; returns how many expired.
///
/// Pending hops, the usual storm, go in bulk: nothing can be below a pending hop (its task
/// takes no subtask and no onward hop until it is accepted), so the compare-and-set, the
/// events and the tasks' return are one statement each for all of them. An accepted hop goes
/// through the cancellation's cascade (`completion::cancel_in`), one at a time.
async fn expire_chunk(db: &Db, ids: &[&str]) -> Result<usize, Error> {
    let expired = db
        .write(async |tx| {
            let now = delegations::clock_now(tx).await?;
            tasks::lock_families_of_delegations(tx, ids).await?;
            let mut targets = HashMap::new();
            let mut pending: HashMap<ExpiryReason, Vec<Delegation>> = HashMap::new();
            let mut expired = Vec::new();
            // Hops above first (a hop is made after the one it continues): an expired hop's
            // cascade cancels the due hops below it, which are then not expired again.
            let mut hops = delegations::find_many(tx, ids).await?;
            hops.sort_by(|a, b| (a.delegated_at, &a.id).cmp(&(b.delegated_at, &b.id)));
            let mut cancelled = HashSet::new();
            for hop in hops {
                if cancelled.contains(&hop.id) {
                    continue;
                }
                let Some((reason, was_due)) = verdict(tx, &hop, now, &mut targets).await? else {
                    continue;
                };
                if hop.status == DelegationStatus::Pending {
                    pending.entry(reason).or_default().push(hop);
                } else {
                    let expiry = Expiry { at: now, reason };
                    let cascade = cancel_in(tx, &hop, Some(expiry)).await?;
                    cancelled.extend(cascade.cancelled_descendants.into_iter().map(|d| d.id));
                    expired.push((expiry, was_due));
                }
            }
            for (reason, hops) in pending {
                let expiry = Expiry { at: now, reason };
                for hop in expire_pending(tx, &hops, expiry).await? {
                    let was_due = match reason {
                        ExpiryReason::AcceptDeadline => hop.accept_by,
                        ExpiryReason::CompleteDeadline => hop.complete_by,
                        ExpiryReason::TargetUnresponsive => {
                            targets.get(&hop.target_instance_id).copied().flatten()
                        }
                    };
                    expired.push((expiry, was_due));
                }
            }
            Ok(expired)
        })
        .await?;
    for (expiry, was_due) in &expired {
        record(*expiry, *was_due);
    }
    Ok(expired.len())
}

/// Whether `hop` expires at `now`, why, and when that was due: a deadline that passed, or a
/// target whose lease lapsed while the task is at it. `targets` keeps each target's lapse.
async fn verdict(
    tx: &mut Tx,
    hop: &Delegation,
    now: NaiveDateTime,
    targets: &mut HashMap<String, Option<NaiveDateTime>>,
) -> Result<Option<(ExpiryReason, Option<NaiveDateTime>)>, Error> {
    match lifecycle::due(hop.status, hop.accept_by, hop.complete_by, now) {
        Some(ExpiryReason::AcceptDeadline) => {
            return Ok(Some((ExpiryReason::AcceptDeadline, hop.accept_by)));
        }
        Some(reason) => return Ok(Some((reason, hop.complete_by))),
        None if !hop.status.is_active() => return Ok(None),
        None => {}
    }
    let target = &hop.target_instance_id;
    let lapsed = match targets.get(target) {
        Some(lapsed) => *lapsed,
        None => {
            let instance = instances::find(tx, target).await?;
            let lapsed = instance.and_then(|i| i.lapsed(now));
            targets.insert(target.clone(), lapsed);
            lapsed
        }
    };
    let Some(lapsed) = lapsed else {
        return Ok(None);
    };
    let onward = hop.status == DelegationStatus::Accepted
        && !delegations::active_below(tx, &hop.id).await?.is_empty();
    Ok(lifecycle::abandoned(hop.status, true, onward)
        .then_some((ExpiryReason::TargetUnresponsive, Some(lapsed))))
}

/// Ends pending `hops` EXPIRED for one reason: one compare-and-set (a hop answered meanwhile
/// stays as it is), one append of their events, their tasks back at their sources (a
/// statement per source). Returns the hops that expired.
async fn expire_pending(
    tx: &mut Tx,
    hops: &[Delegation],
    expiry: Expiry,
) -> Result<Vec<Delegation>, Error> {
    let ids: Vec<&str> = hops.iter().map(|h| h.id.as_str()).collect();
    let at = now();
    let change = Change {
        status: Some(Transition::Expire.to()),
        expired_at: Some(expiry.at),
        expiry_reason: Some(expiry.reason),
        ..Change::at(at)
    };
    let expired = delegations::update(tx, &ids, &[DelegationStatus::Pending], &change).await?;
    let events: Vec<_> = expired
        .iter()
        .map(|hop| NewEvent::of(Transition::Expire.event(), hop, None))
        .collect();
    event_log::append(tx, &events).await?;
    let mut by_source: HashMap<&str, Vec<&str>> = HashMap::new();
    for hop in &expired {
        by_source
            .entry(hop.source_instance_id.as_str())
            .or_default()
            .push(hop.task_id.as_str());
    }
    for (source, task_ids) in by_source {
        tasks::move_all_to(tx, &task_ids, source, at).await?;
    }
    Ok(expired)
}

fn record(expiry: Expiry, was_due: Option<NaiveDateTime>) {
    let lag = was_due
        .and_then(|due| (expiry.at - due).to_std().ok())
        .unwrap_or_default();
    telemetry::metrics().expired(expiry.reason.as_str(), lag);
}

/// Expires every hop due now, deadlines first, then those at unresponsive instances; returns
/// how many this call expired.
pub async fn expire_due(db: &Db) -> Result<usize, Error> {
    expire_beating(db, &mut Heart::default()).await
}

async fn expire_beating(db: &Db, heart: &mut Heart) -> Result<usize, Error> {
    let mut expired = 0;
    heart.beat(db).await?;
    for unresponsive in [false, true] {
        loop {
            let mut conn = db.conn().await?;
            let due = if unresponsive {
                delegations::at_unresponsive(&mut conn, BATCH).await?
            } else {
                delegations::due(&mut conn, BATCH).await?
            };
            drop(conn);
            let mut seen = HashSet::new();
            let ids: Vec<&str> = due
                .iter()
                .map(String::as_str)
                .filter(|id| seen.insert(*id))
                .collect();
            let mut now_expired = 0;
            for chunk in ids.chunks(CHUNK) {
                now_expired += expire_isolating(db, chunk).await?;
            }
            expired += now_expired;
            // A full batch of which nothing expired (work passed further down) is not read again.
            if due.len() < usize::try_from(BATCH).unwrap_or(usize::MAX) || now_expired == 0 {
                break;
            }
            // A storm takes a while: the heartbeat goes on, or the brake would think no
            // replica was sweeping.
            heart.beat(db).await?;
        }
    }
    Ok(expired)
}

/// [`expire_chunk`]; if it fails for any reason but a fault of the database, each hop again in
/// a transaction of its own, so that one hop the rules cannot end (a bug) holds up no other.
async fn expire_isolating(db: &Db, chunk: &[&str]) -> Result<usize, Error> {
    match expire_chunk(db, chunk).await {
        Ok(expired) => Ok(expired),
        Err(err @ (Error::Unavailable(_) | Error::Aborted(_) | Error::ResourceExhausted(_))) => {
            Err(err)
        }
        Err(_) if chunk.len() > 1 => {
            let mut expired = 0;
            for id in chunk {
                match expire_chunk(db, &[id]).await {
                    Ok(one) => expired += one,
                    Err(err) => tracing::error!(delegation = id, error = %err, "cannot expire"),
                }
            }
            Ok(expired)
        }
        Err(err) => {
            tracing::error!(delegation = chunk[0], error = %err, "cannot expire");
            Ok(0)
        }
    }
}

/// One sweeper's side of the restart brake: a beat at most every half [`HEARTBEAT`].
#[derive(Default)]
struct Heart {
    last: Option<Instant>,
}

impl Heart {
    /// Beats the heartbeat (unless it just did); after a gap, the restart brake.
    async fn beat(&mut self, db: &Db) -> Result<(), Error> {
        if self.last.is_some_and(|last| last.elapsed() < HEARTBEAT / 2) {
            return Ok(());
        }
        let extended = db
            .write(async |tx| Ok(instances::brake_leases(tx, BRAKE_GAP).await?))
            .await?;
        self.last = Some(Instant::now());
        if extended > 0 {
            tracing::warn!(
                leases = extended,
                "no replica swept for a while: every lease gets a full period before anything \
                 expires for unresponsiveness"
            );
        }
        Ok(())
    }
}

/// How long to sleep until the next deadline or lease to lapse, at most [`HEARTBEAT`], and the
/// database's clock now.
async fn until_next(db: &Db) -> Result<(Duration, NaiveDateTime), Error> {
    let mut conn = db.conn().await?;
    let (next_deadline, now) = delegations::next_due(&mut conn).await?;
    let (unresponsive, next_lapse) = instances::leases(&mut conn).await?;
    telemetry::metrics().unresponsive(unresponsive);
    let next = match (next_deadline, next_lapse) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    let sleep = next.map_or(HEARTBEAT, |next| {
        (next - now).to_std().unwrap_or(Duration::ZERO)
    });
    Ok((sleep.min(HEARTBEAT), now))
}

/// Expires hops as they become due, until the task is dropped. Between passes it sleeps until
/// the next deadline, waking earlier only for a deadline written here that falls before it
/// (another replica's reaches it within a heartbeat). A failure (the database away) is logged
/// and retried after a heartbeat; nothing is lost, since what is due stays due.
pub async fn sweeper(db: Db) {
    let mut heart = Heart::default();
    loop {
        let pass = async {
            let expired = expire_beating(&db, &mut heart).await?;
            let (sleep, db_now) = until_next(&db).await?;
            // Still due after a pass that expired nothing: a hop that cannot be ended (logged
            // by the pass). Waiting a heartbeat keeps it from spinning.
            let sleep = if expired == 0 && sleep.is_zero() {
                HEARTBEAT
            } else {
                sleep
            };
            Ok::<_, Error>((sleep, db_now))
        };
        let (sleep, db_now) = match pass.await {
            Ok(next) => (next.0, Some(next.1)),
            Err(err) => {
                tracing::warn!(error = %err, "expiry sweep failed; retrying");
                (HEARTBEAT, None)
            }
        };
        let start = Instant::now();
        let mut wake = start + sleep;
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(wake.into()) => break,
                due = db.deadline_written() => {
                    let (Some(due), Some(db_now)) = (due, db_now) else { continue };
                    let at = start + (due - db_now).to_std().unwrap_or(Duration::ZERO);
                    wake = wake.min(at);
                }
            }
        }
    }
}
