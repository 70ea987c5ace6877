//! PostgreSQL: the sequencer, which numbers committed events in commit order.
//!
//! Writers append their events to `event_queue` and commit in parallel, sharing fsyncs; the
//! sequencer moves the committed ones into the log with increasing sequence numbers
//! ([`crate::store::event_log::sequence`]). Each [`Db`] on PostgreSQL runs one for as long as the `Db` lives,
//! and across replicas an advisory lock lets one at a time work. It wakes after every commit
//! through its own pool, so a burst of commits is numbered in one transaction, and every
//! [`IDLE`] in case another process committed events and died before numbering them. The
//! events it numbers wake this process's streams at once and other replicas' through NOTIFY.

use std::time::Duration;

use super::pool::WeakDb;

/// How often the sequencer looks at the queue when nothing woke it.
pub(super) const IDLE: Duration = Duration::from_secs(1);

/// Numbers events until the `Db` is gone.
pub(super) async fn run(db: WeakDb) {
    let Some(mut commits) = db.upgrade().map(|db| db.signals.commits.subscribe()) else {
        return;
    };
    loop {
        // Marked seen before numbering: a commit during the round wakes the next one at once.
        commits.borrow_and_update();
        let Some(db) = db.upgrade() else { return };
        if let Err(err) = db.sequence_events().await {
            // Writers still commit, but their events reach no subscriber until this succeeds.
            tracing::error!(error = %err, "could not number events; subscribers wait; retrying");
        }
        drop(db);
        tokio::select! {
            changed = commits.changed() => if changed.is_err() { return },
            () = tokio::time::sleep(IDLE) => {}
        }
    }
}
