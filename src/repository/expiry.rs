//! Expiry: ending hops whose deadline passed, and the sweeper that finds them.
//!
//! **Exactly once.** Each expiry is one transaction under the task family's lock, like every
//! other write. Inside it the hop is read afresh and [`lifecycle::due`] decides, from the
//! database's clock, whether a deadline has passed; if so, the hop ends EXPIRED through the same
//! compare-and-set and cascade as a cancellation (`completion::cancel_in`). A second sweeper
//! (another replica) or a racing accept, reject or completion that takes the lock first leaves
//! nothing due, so the hop has exactly one outcome and the log one event for it.
//!
//! **Prompt, without polling.** Each replica runs one [`sweeper`]: it expires what is due (read
//! from two partial indexes of due hops), asks the indexes for the next deadline, and sleeps
//! until then, or until a hop with a deadline is written here or, through NOTIFY, on another
//! replica, which may be earlier; at most [`MAX_SLEEP`], in case a notification was lost.

use std::{collections::HashSet, time::Duration};

use super::{completion::cancel_in, delegations::Cancellation};
use crate::{
    domain::lifecycle::{self, Expiry},
    error::Error,
    store::{Db, delegations, tasks},
};

/// How many due hops one pass reads before expiring them.
const BATCH: i64 = 256;

/// The longest the sweeper sleeps without looking, in case a wake-up was lost.
pub const MAX_SLEEP: Duration = Duration::from_secs(5);

/// Expires delegation `id` if one of its deadlines has passed by the database's clock; `None`
/// if none has (not due yet, or answered, finished or expired meanwhile).
pub async fn expire_if_due(db: &Db, id: &str) -> Result<Option<Cancellation>, Error> {
    db.write(async |tx| {
        if !tasks::lock_family_of_delegation(tx, id).await? {
            return Ok(None);
        }
        let Some(hop) = delegations::find(tx, id).await? else {
            return Ok(None);
        };
        let now = delegations::clock_now(tx).await?;
        let Some(reason) = lifecycle::due(hop.status, hop.accept_by, hop.complete_by, now) else {
            return Ok(None);
        };
        let expiry = Expiry { at: now, reason };
        cancel_in(tx, &hop, Some(expiry)).await.map(Some)
    })
    .await
}

/// Expires every hop due now; returns how many this call expired.
pub async fn expire_due(db: &Db) -> Result<usize, Error> {
    let mut expired = 0;
    loop {
        let due = delegations::due(&mut db.conn().await?, BATCH).await?;
        let mut seen = HashSet::new();
        for id in due.iter().filter(|id| seen.insert(id.as_str())) {
            if expire_if_due(db, id).await?.is_some() {
                expired += 1;
            }
        }
        if due.len() < usize::try_from(BATCH).unwrap_or(usize::MAX) {
            return Ok(expired);
        }
    }
}

/// How long to sleep until the next deadline of an active hop, at most [`MAX_SLEEP`].
async fn until_next(db: &Db) -> Result<Duration, Error> {
    let (next, now) = delegations::next_due(&mut db.conn().await?).await?;
    Ok(next
        .map_or(MAX_SLEEP, |next| {
            (next - now).to_std().unwrap_or(Duration::ZERO)
        })
        .min(MAX_SLEEP))
}

/// Expires hops as their deadlines pass, until the task is dropped. A failure (the database
/// away) is logged and retried after a second; nothing is lost, since what is due stays due.
pub async fn sweeper(db: Db) {
    let mut written = db.deadlines();
    loop {
        // Marked seen before the pass: a deadline written during it wakes the next sleep.
        written.borrow_and_update();
        let pass = async {
            expire_due(&db).await?;
            until_next(&db).await
        };
        let sleep = match pass.await {
            Ok(sleep) => sleep,
            Err(err) => {
                tracing::warn!(error = %err, "expiry sweep failed; retrying");
                Duration::from_secs(1)
            }
        };
        tokio::select! {
            () = tokio::time::sleep(sleep) => {}
            changed = written.changed() => {
                if changed.is_err() {
                    return; // the database handle is gone: the server is stopping
                }
            }
        }
    }
}
