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
    store::{Db, delegations, instances, tasks},
    telemetry,
};

/// How many due hops one pass reads before expiring them.
const BATCH: i64 = 256;

/// The longest the sweeper sleeps: the restart brake's heartbeat, and the bound on a lost
/// wake-up.
pub const HEARTBEAT: Duration = Duration::from_secs(1);

/// A heartbeat older than this means no replica was sweeping: leases get a full period.
pub const BRAKE_GAP: Duration = Duration::from_secs(3);

/// Expires delegation `id` if it is due by the database's clock; `None` if it is not (not due
/// yet, or answered, finished or expired meanwhile, or its task passed further down).
pub async fn expire_if_due(db: &Db, id: &str) -> Result<Option<Cancellation>, Error> {
    let expired = db
        .write(async |tx| {
            if !tasks::lock_family_of_delegation(tx, id).await? {
                return Ok(None);
            }
            let Some(hop) = delegations::find(tx, id).await? else {
                return Ok(None);
            };
            let now = delegations::clock_now(tx).await?;
            let (reason, was_due) =
                match lifecycle::due(hop.status, hop.accept_by, hop.complete_by, now) {
                    Some(ExpiryReason::AcceptDeadline) => {
                        (ExpiryReason::AcceptDeadline, hop.accept_by)
                    }
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
        })
        .await?;
    Ok(expired.map(|(cancellation, expiry, was_due)| {
        record(expiry, was_due);
        cancellation
    }))
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
            let mut now_expired = 0;
            for id in due.iter().filter(|id| seen.insert(id.as_str())) {
                if expire_if_due(db, id).await?.is_some() {
                    now_expired += 1;
                }
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
