//! Event streams for `WatchEvents`: one task per subscriber that tails the event log.
//!
//! The log is the truth; nothing is kept in memory but one page per subscriber. A subscriber's
//! task reads the events after its cursor a page at a time, sends them into a small bounded
//! channel, and when it has caught up waits for [`Db::appended`] (bumped when events become
//! readable: by local commits on SQLite, by the sequencer and its notifications on PostgreSQL), the idle interval, shutdown, or the client
//! leaving. Consequences:
//!
//! - A slow consumer blocks only its own task on the full channel; it holds no database
//!   connection while blocked and resumes from the log, so writers and other subscribers never
//!   wait for it and it never loses an event.
//! - A lost wake-up only delays: every idle interval the task re-reads the log anyway.
//! - A client that goes away closes the channel; its task ends at once (even while idle).
//! - The head is read before each page, and sequence order is commit order (see
//!   `store::events`), so once a short page is read everything up to the head has been seen:
//!   the cursor (and a `Progress` mark) can move to the head with nothing skipped.

use std::{
    collections::HashSet,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::{
    sync::{mpsc, watch},
    time::{Instant, sleep_until},
};

use crate::{
    domain::EventKind,
    error::Error,
    store::{
        Db, events,
        events::{Event, Scope},
        instances,
    },
};

/// Events read from the log per query.
const PAGE: i64 = 256;
/// Messages buffered per subscriber before its task waits for the client.
const BUFFER: usize = 64;

/// What a stream carries.
#[derive(Debug, Clone, PartialEq)]
pub enum Item {
    /// An event of the log.
    Event(Event),
    /// Every matching event up to this sequence has been delivered.
    Progress(i64),
}

/// A validated WatchEvents request.
#[derive(Debug, Clone)]
pub struct Subscription {
    /// Which instances' events.
    pub scope: Scope,
    /// Replay after this sequence; `None` for new events only.
    pub after: Option<i64>,
    /// Only these kinds; empty for all.
    pub kinds: HashSet<EventKind>,
}

/// Starts event streams and tracks them. Cheap to clone.
#[derive(Clone)]
pub struct Hub {
    db: Db,
    progress_interval: Duration,
    /// Set once, at shutdown: every stream ends with UNAVAILABLE.
    stop: Arc<watch::Sender<bool>>,
    active: Arc<AtomicUsize>,
}

impl Hub {
    /// Streams from `db`, marking progress after `progress_interval` of silence.
    pub fn new(db: Db, progress_interval: Duration) -> Self {
        let stop = Arc::new(watch::channel(false).0);
        Self {
            db,
            progress_interval,
            stop,
            active: Arc::default(),
        }
    }

    /// Ends every stream, now and from now on, with UNAVAILABLE ("resume elsewhere").
    pub fn stop_streams(&self) {
        self.stop.send_replace(true);
    }

    /// The database the streams read.
    pub fn db(&self) -> &Db {
        &self.db
    }

    /// How many streams are open right now.
    pub fn active_streams(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// Checks the request against the log and starts its stream. NOT_FOUND for an unknown
    /// instance; OUT_OF_RANGE for a cursor older than the retained log or newer than its head.
    pub async fn watch(
        &self,
        subscription: Subscription,
    ) -> Result<mpsc::Receiver<Result<Item, Error>>, Error> {
        let mut conn = self.db.conn().await?;
        let instance_id = &subscription.scope.instance_id;
        if instances::find(&mut conn, instance_id).await?.is_none() {
            return Err(Error::not_found("instance", instance_id));
        }
        let bounds = events::bounds(&mut conn).await?;
        drop(conn);
        let cursor = match subscription.after {
            None => bounds.head,
            Some(after) => {
                check_cursor(after, bounds)?;
                after
            }
        };
        let (sender, receiver) = mpsc::channel(BUFFER);
        let stream = Stream {
            hub: self.clone(),
            subscription,
            cursor,
            sender,
        };
        tokio::spawn(stream.run());
        Ok(receiver)
    }
}

fn check_cursor(after: i64, bounds: events::Bounds) -> Result<(), Error> {
    if after < bounds.pruned_through {
        return Err(Error::OutOfRange(format!(
            "events after sequence {after} were pruned; the oldest available is {}: re-read \
             the state and resume after sequence {}",
            bounds.pruned_through + 1,
            bounds.pruned_through
        )));
    }
    if after > bounds.head {
        return Err(Error::OutOfRange(format!(
            "sequence {after} is ahead of the event log's head {}",
            bounds.head
        )));
    }
    Ok(())
}

/// Counts a stream while it lives.
struct Active(Arc<AtomicUsize>);

impl Active {
    fn new(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self(count.clone())
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Resolves once the shutdown flag is set.
async fn stopping(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// One subscriber's tail of the log.
struct Stream {
    hub: Hub,
    subscription: Subscription,
    cursor: i64,
    sender: mpsc::Sender<Result<Item, Error>>,
}

impl Stream {
    async fn run(mut self) {
        let _active = Active::new(&self.hub.active);
        let mut appended = self.hub.db.appended();
        let mut shutdown = self.hub.stop.subscribe();
        let mut last_sent = Instant::now();
        let mut replayed = false;
        let mut idle = false;
        loop {
            // Seen before reading: events appended during the read wake the next wait at once.
            appended.borrow_and_update();
            let sent = match self.catch_up().await {
                Ok(sent) => sent,
                Err(err) => {
                    let _ = self.sender.send(Err(err)).await;
                    return;
                }
            };
            let Some(sent) = sent else { return }; // the client left
            if sent > 0 {
                last_sent = Instant::now();
            }
            if !replayed || (idle && sent == 0) {
                if self
                    .sender
                    .send(Ok(Item::Progress(self.cursor)))
                    .await
                    .is_err()
                {
                    return;
                }
                replayed = true;
                last_sent = Instant::now();
            }
            idle = false;
            tokio::select! {
                changed = appended.changed() => if changed.is_err() { return },
                () = sleep_until(last_sent + self.hub.progress_interval) => idle = true,
                () = stopping(&mut shutdown) => {
                    let bye = Error::Unavailable(
                        "the server is shutting down; resume from your last sequence".into(),
                    );
                    let _ = self.sender.send(Err(bye)).await;
                    return;
                }
                () = self.sender.closed() => return,
            }
        }
    }

    /// Sends every matching event after the cursor; returns how many, or `None` if the client
    /// left. Afterwards the cursor is at the head the log had when the last page was read.
    async fn catch_up(&mut self) -> Result<Option<usize>, Error> {
        let mut sent = 0;
        loop {
            let mut conn = self.hub.db.conn().await?;
            let bounds = events::bounds(&mut conn).await?;
            check_cursor(self.cursor, bounds)?;
            let page = events::read(&mut conn, &self.subscription.scope, self.cursor, PAGE).await?;
            // Retention may have deleted events after the cursor between the two reads: then
            // this page may have a hole, and the subscriber must hear so.
            let pruned_through = events::bounds(&mut conn).await?.pruned_through;
            check_cursor(
                self.cursor,
                events::Bounds {
                    pruned_through,
                    ..bounds
                },
            )?;
            drop(conn);
            let full = page.len() == usize::try_from(PAGE).unwrap_or(usize::MAX);
            for event in page {
                self.cursor = event.sequence;
                let kinds = &self.subscription.kinds;
                if kinds.is_empty() || kinds.contains(&event.kind) {
                    if self.sender.send(Ok(Item::Event(event))).await.is_err() {
                        return Ok(None);
                    }
                    sent += 1;
                }
            }
            if !full {
                self.cursor = self.cursor.max(bounds.head);
                return Ok(Some(sent));
            }
        }
    }
}
