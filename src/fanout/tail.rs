//! The live tail: the one reader of new events in a process, the window of recent events, and
//! the index that offers each event to exactly the subscribers it concerns.
//!
//! Everything lives behind one short-held mutex, so that the window and the subscribers move
//! together: an event is in the window and offered to every member at once, and a subscriber
//! joins by taking the window after its cursor and becoming a member in the same step.
//! Offering never waits: a member whose buffer is full is removed (its buffer's sender is
//! dropped, which it notices after the events already buffered) and catches up by itself.

use std::{
    collections::{HashMap, VecDeque},
    mem::size_of,
    sync::{Arc, Mutex, MutexGuard, PoisonError, Weak},
    time::Duration,
};

use tokio::{sync::mpsc, time::Instant};

use super::{Inner, SharedEvent, Subscription, TailLimits};
use crate::{
    domain::EventKind,
    error::Error,
    store::{Conn, Db, event_log, event_log::Event},
};

/// How often the tail looks at the log when nothing woke it.
const IDLE: Duration = Duration::from_secs(1);
/// The least time between two reads once there are [`GATHER_FROM`] members: under load, the
/// events of several commits are read, and reach each connection, together (one write for
/// several events), for at most this much delay. An idle tail reads at once.
const GATHER: Duration = Duration::from_millis(5);
/// Below this many members a read costs little and the tail reads on every wake-up.
const GATHER_FROM: usize = 100;
/// Events read from the log per query.
const PAGE: i64 = 1_000;

/// What one subscriber wants, in the form that is quick to match.
#[derive(Debug)]
pub(super) struct Filter {
    instance_id: String,
    descendants: bool,
    /// Bit `kind as u8` set for each wanted kind.
    kinds: u8,
}

impl Filter {
    pub(super) fn new(subscription: &Subscription) -> Self {
        let kinds = if subscription.kinds.is_empty() {
            u8::MAX
        } else {
            subscription
                .kinds
                .iter()
                .fold(0, |bits, kind| bits | bit(*kind))
        };
        Self {
            instance_id: subscription.scope.instance_id.clone(),
            descendants: subscription.scope.include_descendants,
            kinds,
        }
    }

    pub(super) fn wants_kind(&self, kind: EventKind) -> bool {
        self.kinds & bit(kind) != 0
    }

    /// The same rule as the index's, for one event of the window.
    fn matches(&self, entry: &Entry) -> bool {
        let event = &entry.event.event;
        let concerns = |lineage: &[String], id: &str| {
            id == self.instance_id || (self.descendants && lineage.contains(&self.instance_id))
        };
        self.wants_kind(event.kind)
            && (concerns(&entry.source, &event.source_instance_id)
                || concerns(&entry.target, &event.target_instance_id))
    }
}

fn bit(kind: EventKind) -> u8 {
    1 << kind as u8
}

const _: () = assert!(
    EventKind::ALL.len() <= 8,
    "the kinds of a filter are bits of a u8"
);

/// An event of the window, with its instances' lineages for matching subtrees.
struct Entry {
    event: Arc<SharedEvent>,
    /// The source instance and its ancestors, nearest first.
    source: Arc<[String]>,
    /// The target instance and its ancestors, nearest first.
    target: Arc<[String]>,
    /// Approximate bytes held, counting the encoded copy.
    size: usize,
}

impl Entry {
    fn new(event: Event, source: Arc<[String]>, target: Arc<[String]>) -> Self {
        let text = [
            &event.task_id,
            &event.source_instance_id,
            &event.target_instance_id,
        ]
        .iter()
        .map(|s| s.len())
        .sum::<usize>()
            + event.delegation_id.as_ref().map_or(0, String::len)
            + event
                .caused_by_delegation_id
                .as_ref()
                .map_or(0, String::len)
            + event.delegation.as_ref().map_or(0, json_size);
        Self {
            size: size_of::<Self>() + size_of::<SharedEvent>() + 2 * text,
            event: SharedEvent::new(event),
            source,
            target,
        }
    }
}

/// Roughly how many bytes a JSON value takes in memory.
fn json_size(value: &serde_json::Value) -> usize {
    use serde_json::Value;
    size_of::<Value>()
        + match value {
            Value::String(s) => s.len(),
            Value::Array(items) => items.iter().map(json_size).sum(),
            Value::Object(fields) => fields.iter().map(|(k, v)| k.len() + json_size(v)).sum(),
            _ => 0,
        }
}

/// A subscriber joined to the tail.
struct Member {
    filter: Arc<Filter>,
    sender: mpsc::Sender<Arc<SharedEvent>>,
}

/// What a subscriber gets when it asks to join.
pub(super) enum Join {
    /// The window no longer holds every event after the cursor: read the log.
    Behind,
    /// More events after the cursor than a buffer holds: deliver these, then ask again.
    Partial {
        /// The first matching events after the cursor, a buffer's worth.
        pending: VecDeque<Arc<SharedEvent>>,
        /// The last of them: the cursor once they are delivered.
        through: i64,
    },
    /// Joined.
    Joined(Joined),
}

/// A subscriber joined to the tail.
pub(super) struct Joined {
    /// Its id, to leave with.
    pub id: u64,
    /// The window's matching events after its cursor.
    pub pending: VecDeque<Arc<SharedEvent>>,
    /// Every matching event up to here is in `pending` or was before its cursor.
    pub through: i64,
    /// Every later matching event, unless it falls behind by a whole buffer.
    pub receiver: mpsc::Receiver<Arc<SharedEvent>>,
}

#[derive(Default)]
struct State {
    /// Every event up to here has been read and offered.
    head: i64,
    /// Every event after here, up to `head`, is in the window.
    floor: i64,
    window: VecDeque<Entry>,
    bytes: usize,
    members: HashMap<u64, Member>,
    /// Members watching one instance, by instance.
    exact: HashMap<String, Vec<u64>>,
    /// Members watching a subtree, by its root.
    subtree: HashMap<String, Vec<u64>>,
    next_id: u64,
}

/// The window and the subscribers joined to it.
pub(super) struct Tail {
    state: Mutex<State>,
    limits: TailLimits,
}

impl Tail {
    pub(super) fn new(limits: TailLimits) -> Self {
        Self {
            state: Mutex::default(),
            limits,
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts with an empty window at `head`.
    pub(super) fn start_at(&self, head: i64) {
        let mut state = self.state();
        state.head = head;
        state.floor = head;
    }

    /// Every event up to here has been offered to the members.
    pub(super) fn head(&self) -> i64 {
        self.state().head
    }

    /// `(floor, head)`.
    pub(super) fn window(&self) -> (i64, i64) {
        let state = self.state();
        (state.floor, state.head)
    }

    /// How many subscribers are joined.
    pub(super) fn subscribers(&self) -> usize {
        self.state().members.len()
    }

    /// Joins a subscriber whose matching events up to `cursor` are delivered, handing it the
    /// window's matching events after `cursor`, at most a buffer's worth at a time, so that a
    /// subscriber never holds more than that.
    pub(super) fn join(&self, filter: &Arc<Filter>, cursor: i64) -> Join {
        let buffer = self.limits.buffer.max(1);
        let mut state = self.state();
        if cursor < state.floor {
            return Join::Behind;
        }
        let start = state
            .window
            .partition_point(|entry| entry.event.sequence() <= cursor);
        let mut pending: VecDeque<_> = state
            .window
            .range(start..)
            .filter(|entry| filter.matches(entry))
            .take(buffer + 1)
            .map(|entry| entry.event.clone())
            .collect();
        if pending.len() > buffer {
            pending.truncate(buffer);
            let through = pending.back().map_or(cursor, |event| event.sequence());
            return Join::Partial { pending, through };
        }
        let (sender, receiver) = mpsc::channel(buffer);
        let id = state.next_id;
        state.next_id += 1;
        let index = if filter.descendants {
            &mut state.subtree
        } else {
            &mut state.exact
        };
        index
            .entry(filter.instance_id.clone())
            .or_default()
            .push(id);
        let member = Member {
            filter: filter.clone(),
            sender,
        };
        state.members.insert(id, member);
        Join::Joined(Joined {
            id,
            pending,
            through: cursor.max(state.head),
            receiver,
        })
    }

    /// Removes a member, if it is still one.
    pub(super) fn leave(&self, id: u64) {
        self.state().remove(id);
    }

    /// Offers `entries` (the log after `head`, in order) to the members, keeps them in the
    /// window, and moves the head to `through`.
    fn publish(&self, entries: Vec<Entry>, through: i64) {
        let mut state = self.state();
        for entry in entries {
            if entry.event.sequence() > state.head {
                state.offer(&entry);
                state.bytes += entry.size;
                state.window.push_back(entry);
            }
        }
        state.head = state.head.max(through);
        while state.window.len() > self.limits.window_events
            || state.bytes > self.limits.window_bytes
        {
            let Some(oldest) = state.window.pop_front() else {
                break;
            };
            state.bytes -= oldest.size;
            state.floor = oldest.event.sequence();
        }
    }

    /// With no member to offer them to, skips the events up to `head` (an empty window there)
    /// and returns true; false if a subscriber has joined meanwhile.
    fn skip_to(&self, head: i64) -> bool {
        let mut state = self.state();
        if !state.members.is_empty() {
            return false;
        }
        if head > state.head {
            state.window.clear();
            state.bytes = 0;
            state.head = head;
            state.floor = head;
        }
        true
    }

    /// Detaches every member and empties the window at `head`: the tail has lost events.
    fn reset(&self, head: i64) {
        let mut state = self.state();
        let next_id = state.next_id;
        *state = State {
            head,
            floor: head,
            next_id,
            ..State::default()
        };
    }
}

impl State {
    /// Sends the entry to every member it concerns; removes those whose buffer is full.
    fn offer(&mut self, entry: &Entry) {
        let Self {
            members,
            exact,
            subtree,
            ..
        } = self;
        let event = &entry.event.event;
        let mut lagging = Vec::new();
        let mut offer = |ids: Option<&Vec<u64>>| {
            for id in ids.into_iter().flatten() {
                let Some(member) = members.get(id) else {
                    continue;
                };
                if member.filter.wants_kind(event.kind)
                    && member.sender.try_send(entry.event.clone()).is_err()
                {
                    lagging.push(*id);
                }
            }
        };
        offer(exact.get(&event.source_instance_id));
        if event.target_instance_id != event.source_instance_id {
            offer(exact.get(&event.target_instance_id));
        }
        if !subtree.is_empty() {
            // Each root once: the two lineages usually share their upper part.
            for root in entry.source.iter() {
                offer(subtree.get(root));
            }
            for root in entry.target.iter() {
                if !entry.source.contains(root) {
                    offer(subtree.get(root));
                }
            }
        }
        for id in lagging {
            self.remove(id);
        }
    }

    fn remove(&mut self, id: u64) {
        let Some(member) = self.members.remove(&id) else {
            return;
        };
        let index = if member.filter.descendants {
            &mut self.subtree
        } else {
            &mut self.exact
        };
        let key = &member.filter.instance_id;
        if let Some(ids) = index.get_mut(key) {
            if let Some(at) = ids.iter().position(|other| *other == id) {
                ids.swap_remove(at);
            }
            if ids.is_empty() {
                index.remove(key);
            }
        }
    }
}

/// Reads new events whenever the log may have grown, until the hub is gone or stops.
pub(super) async fn run(hub: Weak<Inner>) {
    let Some((mut appended, mut stop)) = hub
        .upgrade()
        .map(|hub| (hub.db.appended(), hub.stop.subscribe()))
    else {
        return;
    };
    let mut last_read = Instant::now();
    loop {
        let Some(inner) = hub.upgrade() else { return };
        if inner.tail.subscribers() >= GATHER_FROM {
            tokio::time::sleep_until(last_read + GATHER).await;
        }
        last_read = Instant::now();
        // Marked seen before reading: events appended during the read wake the next round.
        appended.borrow_and_update();
        if let Err(err) = read_new(&inner).await {
            // Subscribers wait, joined; the next round reads from the same head.
            tracing::warn!(error = %err, "the event tail could not read the log; retrying");
        }
        drop(inner);
        tokio::select! {
            changed = appended.changed() => if changed.is_err() { return },
            () = tokio::time::sleep(IDLE) => {}
            () = super::stopping(&mut stop) => return,
        }
    }
}

/// Reads the log after the head, a page at a time, and publishes it.
async fn read_new(inner: &Inner) -> Result<(), Error> {
    loop {
        let after = inner.tail.head();
        let mut conn = inner.db.conn().await?;
        if inner.tail.subscribers() == 0 {
            // Nobody to offer events to: move to the head with an empty window.
            let head = event_log::bounds(&mut conn).await?.head;
            if inner.tail.skip_to(head) {
                return Ok(());
            }
        }
        let page = match event_log::tail(&mut conn, after, PAGE).await? {
            Ok(page) => page,
            Err(bounds) => {
                tracing::warn!(
                    after,
                    pruned_through = bounds.pruned_through,
                    "retention deleted events the tail had not read; subscribers resume from \
                     the log"
                );
                inner.tail.reset(bounds.head);
                return Ok(());
            }
        };
        let mut entries = Vec::with_capacity(page.events.len());
        for event in page.events {
            let source = lineage(&inner.db, &mut conn, &event.source_instance_id).await?;
            let target = lineage(&inner.db, &mut conn, &event.target_instance_id).await?;
            entries.push(Entry::new(event, source, target));
        }
        drop(conn);
        inner.tail.publish(entries, page.through);
        if !page.full {
            return Ok(());
        }
    }
}

/// The instance and its ancestors, from the cache after the first time; at least the instance.
async fn lineage(db: &Db, conn: &mut Conn, id: &str) -> Result<Arc<[String]>, Error> {
    let lineage = db.lineages().get(conn, id).await?;
    Ok(if lineage.is_empty() {
        Arc::from([id.to_owned()])
    } else {
        lineage
    })
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;
    use crate::store::event_log::Watched;

    fn event(sequence: i64, source: &str, target: &str) -> Entry {
        let event = Event {
            sequence,
            kind: EventKind::DelegationCreated,
            occurred_at: chrono::DateTime::UNIX_EPOCH.naive_utc(),
            task_id: "t".into(),
            delegation_id: Some(format!("d{sequence}")),
            source_instance_id: source.into(),
            target_instance_id: target.into(),
            caused_by_delegation_id: None,
            delegation: None,
        };
        let lineage = |id: &str| -> Arc<[String]> {
            match id {
                "leaf" => Arc::from(["leaf".to_owned(), "global".to_owned()]),
                other => Arc::from([other.to_owned()]),
            }
        };
        Entry::new(event, lineage(source), lineage(target))
    }

    fn filter(instance: &str, descendants: bool) -> Arc<Filter> {
        Arc::new(Filter::new(&Subscription {
            scope: Watched {
                instance_id: instance.into(),
                include_descendants: descendants,
            },
            after: None,
            kinds: HashSet::new(),
        }))
    }

    fn sequences(events: &VecDeque<Arc<SharedEvent>>) -> Vec<i64> {
        events.iter().map(|e| e.sequence()).collect()
    }

    /// A window of 3 over events 1..=5 (all of "global" → "leaf"): it holds 3, 4, 5.
    fn tail(buffer: usize) -> Tail {
        let limits = TailLimits {
            window_events: 3,
            window_bytes: usize::MAX,
            buffer,
        };
        let tail = Tail::new(limits);
        tail.start_at(0);
        tail.publish((1..=5).map(|s| event(s, "global", "leaf")).collect(), 5);
        tail
    }

    #[test]
    fn a_cursor_below_the_floor_must_read_the_log() {
        let tail = tail(8);
        assert_eq!(tail.window(), (2, 5));
        assert!(matches!(tail.join(&filter("leaf", false), 1), Join::Behind));
    }

    #[test]
    fn a_cursor_at_the_floor_gets_the_whole_window_then_everything_live() {
        let tail = tail(8);
        let Join::Joined(mut joined) = tail.join(&filter("global", true), 2) else {
            panic!("joined")
        };
        assert_eq!(
            (sequences(&joined.pending), joined.through),
            (vec![3, 4, 5], 5)
        );
        tail.publish(vec![event(6, "other", "leaf")], 6);
        assert_eq!(joined.receiver.try_recv().unwrap().sequence(), 6);
        assert_eq!(tail.subscribers(), 1);
        tail.leave(joined.id);
        assert_eq!(tail.subscribers(), 0);
    }

    #[test]
    fn a_cursor_at_the_head_gets_only_what_follows() {
        let tail = tail(8);
        let Join::Joined(joined) = tail.join(&filter("leaf", false), 5) else {
            panic!("joined")
        };
        assert!(joined.pending.is_empty());
        assert_eq!(joined.through, 5);
    }

    #[test]
    fn more_than_a_buffer_behind_is_handed_a_buffer_at_a_time() {
        let tail = tail(2);
        let Join::Partial { pending, through } = tail.join(&filter("leaf", false), 2) else {
            panic!("partial")
        };
        assert_eq!((sequences(&pending), through), (vec![3, 4], 4));
        assert_eq!(tail.subscribers(), 0);
        assert!(matches!(
            tail.join(&filter("leaf", false), 4),
            Join::Joined(_)
        ));
    }

    #[test]
    fn a_full_buffer_detaches_its_member_and_no_one_else() {
        let tail = tail(1);
        let Join::Joined(mut slow) = tail.join(&filter("leaf", false), 5) else {
            panic!("joined")
        };
        let Join::Joined(mut prompt) = tail.join(&filter("global", true), 5) else {
            panic!("joined")
        };
        tail.publish(vec![event(6, "global", "leaf")], 6);
        assert_eq!(prompt.receiver.try_recv().unwrap().sequence(), 6);
        tail.publish(vec![event(7, "global", "leaf")], 7);
        assert_eq!(prompt.receiver.try_recv().unwrap().sequence(), 7);
        // The slow one kept 6, was detached at 7, and hears so after 6.
        assert_eq!(slow.receiver.try_recv().unwrap().sequence(), 6);
        assert!(slow.receiver.try_recv().is_err());
        assert!(slow.receiver.is_closed());
        assert_eq!(tail.subscribers(), 1);
    }
}
