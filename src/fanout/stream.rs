//! One subscriber's stream: from the log while it is behind the tail's window, then live.
//!
//! The stream is a state machine polled by the client's connection, not a task: a client that
//! stops reading stops it, and one that leaves drops it (and its membership) at once.

use std::{collections::VecDeque, sync::Arc, sync::atomic::Ordering};

use futures_util::{Stream, stream};
use tokio::{
    sync::{mpsc::error::TryRecvError, watch},
    time::{Instant, sleep_until},
};

use super::{
    Hub, Item, SharedEvent, Subscription, check_cursor, stopping,
    tail::{Filter, Join, Joined},
};
use crate::{
    error::Error,
    store::{event_log, event_log::Watched},
};

/// Events read from the log per query while catching up.
const PAGE: i64 = 256;

/// The stream of `subscription`, whose matching events up to `cursor` are delivered.
pub(super) fn open(
    hub: Hub,
    subscription: Subscription,
    cursor: i64,
) -> impl Stream<Item = Result<Item, Error>> + Send + 'static {
    hub.0.active.fetch_add(1, Ordering::Relaxed);
    let subscriber = Subscriber {
        filter: Arc::new(Filter::new(&subscription)),
        scope: subscription.scope,
        cursor,
        pending: VecDeque::new(),
        through: cursor,
        live: None,
        announced: false,
        last_sent: Instant::now(),
        shutdown: hub.0.stop.subscribe(),
        hub,
    };
    // After an error the stream ends.
    stream::unfold(Some(subscriber), |subscriber| async move {
        let mut subscriber = subscriber?;
        match subscriber.next().await {
            Ok(item) => Some((Ok(item), Some(subscriber))),
            Err(err) => Some((Err(err), None)),
        }
    })
}

struct Subscriber {
    hub: Hub,
    scope: Watched,
    filter: Arc<Filter>,
    /// Every matching event up to here has been delivered.
    cursor: i64,
    /// Events to deliver before anything else.
    pending: VecDeque<Arc<SharedEvent>>,
    /// Where the cursor moves once `pending` is delivered.
    through: i64,
    /// Joined to the tail: its id and the events it offers.
    live: Option<(u64, tokio::sync::mpsc::Receiver<Arc<SharedEvent>>)>,
    /// The first progress mark, after the replay, has been sent.
    announced: bool,
    last_sent: Instant,
    shutdown: watch::Receiver<bool>,
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        if let Some((id, _)) = &self.live {
            self.hub.0.tail.leave(*id);
        }
        self.hub.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

fn shutting_down() -> Error {
    Error::Unavailable("the server is shutting down; resume from your last sequence".into())
}

impl Subscriber {
    /// The next message: an event after the cursor, or a progress mark.
    async fn next(&mut self) -> Result<Item, Error> {
        loop {
            if *self.shutdown.borrow() {
                return Err(shutting_down());
            }
            if let Some(event) = self.pending.pop_front() {
                // The tail may offer events a subscriber that joined ahead of it already has.
                if event.sequence() > self.cursor {
                    self.cursor = event.sequence();
                    self.last_sent = Instant::now();
                    return Ok(Item::Event(event));
                }
                continue;
            }
            self.cursor = self.cursor.max(self.through);
            let Some((_, events)) = &mut self.live else {
                let mut shutdown = self.shutdown.clone();
                tokio::select! {
                    () = stopping(&mut shutdown) => return Err(shutting_down()),
                    caught_up = self.catch_up() => caught_up?,
                }
                continue;
            };
            if !self.announced {
                self.announced = true;
                self.last_sent = Instant::now();
                return Ok(Item::Progress(self.cursor));
            }
            let progress_due = self.last_sent + self.hub.0.progress_interval;
            tokio::select! {
                () = stopping(&mut self.shutdown) => return Err(shutting_down()),
                event = events.recv() => match event {
                    Some(event) => self.pending.push_back(event),
                    // Detached for falling behind: catch up by itself.
                    None => self.live = None,
                },
                () = sleep_until(progress_due) => {
                    // The head first: every event up to it is in the buffer by then.
                    let head = self.hub.0.tail.head();
                    match events.try_recv() {
                        Ok(event) => self.pending.push_back(event),
                        Err(TryRecvError::Disconnected) => self.live = None,
                        Err(TryRecvError::Empty) => {
                            self.cursor = self.cursor.max(head);
                            self.last_sent = Instant::now();
                            return Ok(Item::Progress(self.cursor));
                        }
                    }
                }
            }
        }
    }

    /// Joins the tail if its window reaches back to the cursor (taking the window's events
    /// after it, a buffer's worth at a time); otherwise reads a page of the log after the
    /// cursor.
    async fn catch_up(&mut self) -> Result<(), Error> {
        match self.hub.0.tail.join(&self.filter, self.cursor) {
            Join::Joined(Joined {
                id,
                pending,
                through,
                receiver,
            }) => {
                self.pending = pending;
                self.through = through;
                self.live = Some((id, receiver));
                return Ok(());
            }
            Join::Partial { pending, through } => {
                self.pending = pending;
                self.through = through;
                return Ok(());
            }
            Join::Behind => {}
        }
        let mut conn = self.hub.0.db.conn().await?;
        let page = match event_log::page(&mut conn, Some(&self.scope), self.cursor, PAGE).await? {
            Ok(page) => page,
            Err(bounds) => return check_cursor(self.cursor, bounds),
        };
        drop(conn);
        let filter = &self.filter;
        self.pending = page
            .events
            .into_iter()
            .filter(|event| filter.wants_kind(event.kind))
            .map(SharedEvent::new)
            .collect();
        self.through = page.through;
        Ok(())
    }
}
