//! The fan-out of `WatchEvents`: one live tail per process reads the event log
//! (`store::event_log`) and hands each event to the streams it concerns, in memory.
//!
//! ```text
//!             commits (local signal, NOTIFY from other replicas, idle interval)
//!                 │ wake
//!                 ▼
//!  log ──page──▶ tail ──▶ window: the latest events, bounded by count and bytes
//!                 │         ▲
//!                 │ index   │ join: the window after my cursor, then live
//!                 ▼         │
//!        subscribers by instance / by subtree root ──▶ bounded buffer ──▶ client
//!                                                       │ full: detach
//!                                                       ▼
//!                                     catch up from the log at its own cursor, re-join
//! ```
//!
//! - [`tail`]: the only reader of new events. It reads the log once per wake-up, whatever the
//!   number of subscribers, keeps the newest events in a window, and offers each event to the
//!   subscribers it concerns, found through an index by instance and by subtree root (with the
//!   instances' ancestors cached for ever), never blocking on one.
//! - [`stream`]: one subscriber. It reads the log itself only while it is behind the window
//!   (an old cursor, or after it was detached for being slow); then it joins the tail, taking
//!   the window's events after its cursor and every later one, in one step under the tail's
//!   lock, so nothing is missed or repeated.
//!
//! The log stays the truth: a subscriber never depends on memory for events it has not been
//! handed, so a restart, a lost wake-up or a slow client only delays.

mod stream;
mod tail;

use std::{
    collections::HashSet,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use futures_util::Stream;
use tokio::sync::{OnceCell, watch};

use crate::{
    domain::EventKind,
    error::Error,
    store::{
        Db, event_log,
        event_log::{Event, Watched},
        instances,
    },
};

/// What a stream carries.
#[derive(Debug, Clone)]
pub enum Item {
    /// An event of the log, shared by every subscriber that receives it.
    Event(Arc<SharedEvent>),
    /// Every matching event up to this sequence has been delivered.
    Progress(i64),
}

/// An event as its subscribers share it: read once, encoded at most once.
#[derive(Debug)]
pub struct SharedEvent {
    /// The event.
    pub event: Event,
    encoded: OnceLock<Result<Bytes, String>>,
}

impl SharedEvent {
    fn new(event: Event) -> Arc<Self> {
        Arc::new(Self {
            event,
            encoded: OnceLock::new(),
        })
    }

    /// The event's sequence.
    pub fn sequence(&self) -> i64 {
        self.event.sequence
    }

    /// The event in wire form: `encode` runs for the first subscriber to send it; the others
    /// get the same bytes.
    pub(crate) fn encoded(
        &self,
        encode: impl FnOnce(&Event) -> Result<Bytes, Error>,
    ) -> Result<Bytes, Error> {
        self.encoded
            .get_or_init(|| encode(&self.event).map_err(|e| e.to_string()))
            .clone()
            .map_err(Error::Internal)
    }
}

/// A validated WatchEvents request.
#[derive(Debug, Clone)]
pub struct Subscription {
    /// Which instances' events.
    pub scope: Watched,
    /// Replay after this sequence; `None` for new events only.
    pub after: Option<i64>,
    /// Only these kinds; empty for all.
    pub kinds: HashSet<EventKind>,
}

/// What the tail keeps and how much a subscriber may fall behind before it is detached.
#[derive(Debug, Clone, Copy)]
pub struct TailLimits {
    /// Events kept in the window, at most.
    pub window_events: usize,
    /// Approximate bytes kept in the window, at most.
    pub window_bytes: usize,
    /// Events waiting for one subscriber before it is detached from the live tail.
    pub buffer: usize,
}

impl Default for TailLimits {
    fn default() -> Self {
        Self {
            window_events: 10_000,
            window_bytes: 64 << 20,
            buffer: 256,
        }
    }
}

/// Starts event streams and tracks them. Cheap to clone.
#[derive(Clone)]
pub struct Hub(Arc<Inner>);

struct Inner {
    db: Db,
    progress_interval: Duration,
    /// Set once, at shutdown: every stream ends with UNAVAILABLE.
    stop: watch::Sender<bool>,
    active: AtomicUsize,
    tail: tail::Tail,
    /// The tail's task, started by the first subscriber.
    started: OnceCell<()>,
}

impl Hub {
    /// Streams from `db`, marking progress after `progress_interval` of silence.
    pub fn new(db: Db, progress_interval: Duration) -> Self {
        Self::with_limits(db, progress_interval, TailLimits::default())
    }

    /// [`Hub::new`] with a window and buffers of the given size.
    pub fn with_limits(db: Db, progress_interval: Duration, limits: TailLimits) -> Self {
        Self(Arc::new(Inner {
            db,
            progress_interval,
            stop: watch::channel(false).0,
            active: AtomicUsize::new(0),
            tail: tail::Tail::new(limits),
            started: OnceCell::new(),
        }))
    }

    /// Ends every stream, now and from now on, with UNAVAILABLE ("resume elsewhere").
    pub(crate) fn stop_streams(&self) {
        self.0.stop.send_replace(true);
    }

    /// The database the streams read.
    pub fn db(&self) -> &Db {
        &self.0.db
    }

    /// How many streams are open right now.
    pub fn active_streams(&self) -> usize {
        self.0.active.load(Ordering::Relaxed)
    }

    /// How many streams are joined to the live tail right now (the others are catching up).
    pub fn live_subscribers(&self) -> usize {
        self.0.tail.subscribers()
    }

    /// The sequences the window holds, `(floor, head]`: a stream whose cursor is at least
    /// `floor` joins the tail without reading the log.
    pub fn window(&self) -> (i64, i64) {
        self.0.tail.window()
    }

    /// Checks the request against the log and starts its stream. NOT_FOUND for an unknown
    /// instance; OUT_OF_RANGE for a cursor older than the retained log or newer than its head.
    pub async fn watch(
        &self,
        subscription: Subscription,
    ) -> Result<impl Stream<Item = Result<Item, Error>> + Send + 'static, Error> {
        let mut conn = self.0.db.conn().await?;
        let instance_id = &subscription.scope.instance_id;
        if instances::find(&mut conn, instance_id).await?.is_none() {
            return Err(Error::not_found("instance", instance_id));
        }
        let bounds = event_log::bounds(&mut conn).await?;
        drop(conn);
        let cursor = match subscription.after {
            None => bounds.head,
            Some(after) => {
                check_cursor(after, bounds)?;
                after
            }
        };
        self.start_tail().await?;
        Ok(stream::open(self.clone(), subscription, cursor))
    }

    /// Starts the tail at the log's head, once.
    async fn start_tail(&self) -> Result<(), Error> {
        self.0
            .started
            .get_or_try_init(|| async {
                let head = event_log::bounds(&mut self.0.db.conn().await?).await?.head;
                self.0.tail.start_at(head);
                tokio::spawn(tail::run(Arc::downgrade(&self.0)));
                Ok::<_, Error>(())
            })
            .await
            .map(drop)
    }
}

fn check_cursor(after: i64, bounds: event_log::Bounds) -> Result<(), Error> {
    if after < bounds.pruned_through {
        return Err(Error::CursorExpired {
            after,
            pruned_through: bounds.pruned_through,
        });
    }
    if after > bounds.head {
        return Err(Error::OutOfRange(format!(
            "sequence {after} is ahead of the event log's head {}",
            bounds.head
        )));
    }
    Ok(())
}

/// Resolves once the shutdown flag is set.
async fn stopping(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;

    #[test]
    fn an_event_is_encoded_once_for_all_its_subscribers() {
        let event = Event {
            sequence: 7,
            kind: EventKind::DelegationCreated,
            occurred_at: chrono::DateTime::UNIX_EPOCH.naive_utc(),
            task_id: "t".into(),
            delegation_id: Some("d".into()),
            source_instance_id: "global".into(),
            target_instance_id: "project".into(),
            caused_by_delegation_id: None,
            delegation: None,
        };
        let shared = SharedEvent::new(event);
        let calls = Cell::new(0);
        let encode = |event: &Event| {
            calls.set(calls.get() + 1);
            Ok(Bytes::from(event.sequence.to_string()))
        };
        for _ in 0..1_000 {
            assert_eq!(shared.encoded(encode).unwrap(), "7");
        }
        assert_eq!(calls.get(), 1);
    }
}
