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
    collections::HashSet,
    time::{Duration, Instant},
};

use chrono::NaiveDateTime;

use super::{completion::cancel_in, delegations::Cancellation};
use crate::{
    domain::{
        DelegationStatus, ExpiryReason,
        lifecycle::{self, Expiry},
    },
    error::Error,
    store::{Db, Tx, delegations, instances, tasks},
    telemetry,
};

/// How many due hops one pass reads before expiring them.
const BATCH: i64 = 256;

/// How many expiries share a transaction: enough that a storm is not a commit per hop, few
/// enough that writers waiting for the same families (or SQLite's one writer) wait little.
const CHUNK: usize = 32;

/// The longest the sweeper sleeps: the restart brake's heartbeat, and the bound on a lost
/// wake-up.
pub const HEARTBEAT: Duration = Duration::from_secs(1);

/// A heartbeat older than this means no replica was sweeping: leases get a full period.
pub const BRAKE_GAP: Duration = Duration::from_secs(3);

/// Expires delegation `id` if it is due by the database's clock; `None` if it is not (not due
/// yet, or answered, finished or expired meanwhile, or its task passed further down).
pub async fn expire_if_due(db: &Db, id: &str) -> Result<Option<Cancellation>, Error> {
    Ok(expire_chunk(db, &[id]).await?.pop())
}

/// Expires those of `ids` that are due, in one transaction (one commit for many expiries, so
/// that a storm is not one fsync per hop), each under its family's lock; returns what each
/// expiry cancelled.
async fn expire_chunk(db: &Db, ids: &[&str]) -> Result<Vec<Cancellation>, Error> {
    let expired = db
        .write(async |tx| {
            let now = delegations::clock_now(tx).await?;
            let mut expired = Vec::new();
            for id in ids {
                if let Some(one) = expire_locked(tx, id, now).await? {
                    expired.push(one);
                }
            }
            Ok(expired)
        })
        .await?;
    Ok(expired
        .into_iter()
        .map(|(cancellation, expiry, was_due)| {
            record(expiry, was_due);
            cancellation
        })
        .collect())
}

/// One hop, inside the chunk's transaction: locks its family, reads it afresh and asks the
/// rules whether it is due at `now`; if so, ends it. Returns the cancellation, the expiry and
/// when it was due.
async fn expire_locked(
    tx: &mut Tx,
    id: &str,
    now: NaiveDateTime,
) -> Result<Option<(Cancellation, Expiry, Option<NaiveDateTime>)>, Error> {
    if !tasks::lock_family_of_delegation(tx, id).await? {
        return Ok(None);
    }
    let Some(hop) = delegations::find(tx, id).await? else {
        return Ok(None);
    };
    let (reason, was_due) = match lifecycle::due(hop.status, hop.accept_by, hop.complete_by, now)
    {
        Some(ExpiryReason::AcceptDeadline) => (ExpiryReason::AcceptDeadline, hop.accept_by),
        Some(reason) => (reason, hop.complete_by),
        None if hop.status.is_active() => {
            let target = instances::find(tx, &hop.target_instance_id).await?;
            let Some(lapsed) = target.and_then(|t| t.lapsed(now)) else {
                return Ok(None);
            };
            let onward = hop.status == DelegationStatus::Accepted
                && !delegations::active_below(tx, id).await?.is_empty();
            if !lifecycle::abandoned(hop.status, true, onward) {
                return Ok(None);
            }
            (ExpiryReason::TargetUnresponsive, Some(lapsed))
        }
        None => return Ok(None),
    };
    let expiry = Expiry { at: now, reason };
    let cancellation = cancel_in(tx, &hop, Some(expiry)).await?;
    Ok(Some((cancellation, expiry, was_due)))
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
        Ok(expired) => Ok(expired.len()),
        Err(err @ (Error::Unavailable(_) | Error::Aborted(_) | Error::ResourceExhausted(_))) => {
            Err(err)
        }
        Err(_) if chunk.len() > 1 => {
            let mut expired = 0;
            for id in chunk {
                match expire_chunk(db, &[id]).await {
                    Ok(one) => expired += one.len(),
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
            expire_beating(&db, &mut heart).await?;
            until_next(&db).await
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
