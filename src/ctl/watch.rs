//! `hopperctl watch`: prints an instance's events as they arrive and never loses its place.
//!
//! The cursor is the last sequence printed, or the head named by a progress mark (every
//! matching event up to it has been delivered). After a disconnect or a server restart the
//! stream is opened again with `after_sequence` set to the cursor, with a growing pause between
//! attempts, so nothing is missed or printed twice. Ctrl-C ends the command with success.

use std::time::Duration;

use tokio_stream::StreamExt;

use super::{
    connect::{Failure, Target, is_refusal},
    render::{self, Cell, Format, Printer},
};
use crate::{
    domain::EventKind,
    proto::{self as pb, watch_events_response::Payload},
};

/// The pause before the first reconnection attempt; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// The longest pause between reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// What to watch.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct WatchArgs {
    /// The instance whose delegations' events to print.
    pub instance: String,
    /// Also the events of every instance below it.
    #[arg(long)]
    pub descendants: bool,
    /// Replay the retained events after this sequence first.
    #[arg(long)]
    pub since: Option<u64>,
    /// Only these kinds (comma-separated), e.g. `delegation_completed,task_completed`.
    #[arg(long, value_delimiter = ',', value_parser = super::args::parse_word::<EventKind>)]
    pub kinds: Vec<EventKind>,
}

/// Watches until Ctrl-C or a closed standard output (success), or a refusal no retry can
/// change (NOT_FOUND, PERMISSION_DENIED, OUT_OF_RANGE, INVALID_ARGUMENT, UNAUTHENTICATED, …:
/// `connect::is_refusal`). Once a stream has delivered, every other ending (UNAVAILABLE,
/// ABORTED, DEADLINE_EXCEEDED, a reset, a GOAWAY) is resumed after the cursor, with backoff;
/// failing to open the very first stream ends the command (exit 3): the server or the address
/// may be wrong, and the user should hear so.
pub async fn run(target: &Target, args: WatchArgs, printer: &Printer) -> Result<(), Failure> {
    tokio::select! {
        result = follow(target, args, printer) => result,
        Ok(()) = tokio::signal::ctrl_c() => Ok(()),
    }
}

async fn follow(target: &Target, args: WatchArgs, printer: &Printer) -> Result<(), Failure> {
    let mut cursor = args.since;
    let mut backoff = FIRST_BACKOFF;
    // Until a stream has delivered something, failing to open one ends the command: the
    // instance or the server may be wrong, and the user should hear so.
    let mut streamed = false;
    loop {
        match subscribe(target, &args, cursor).await {
            Ok(mut stream) => {
                let (after, mut announced) = (cursor, !streamed);
                loop {
                    match stream.next().await {
                        Some(Ok(message)) => {
                            // Only a stream that works counts as a reconnection: one that
                            // opens and fails at once keeps the backoff growing.
                            if !announced {
                                let after = after.map_or_else(
                                    || "the log's head".into(),
                                    |c| format!("sequence {c}"),
                                );
                                eprintln!(
                                    "hopperctl: reconnected to {}; resuming after {after}",
                                    target.server
                                );
                                announced = true;
                            }
                            streamed = true;
                            backoff = FIRST_BACKOFF;
                            print(message, &mut cursor, printer);
                            if printer.closed() {
                                return Ok(());
                            }
                        }
                        Some(Err(status)) if is_refusal(&status) => return Err(status.into()),
                        Some(Err(status)) => {
                            eprintln!(
                                "hopperctl: the stream ended ({:?}: {}); reconnecting",
                                status.code(),
                                status.message()
                            );
                            break;
                        }
                        None => break,
                    }
                }
            }
            Err(failure @ (Failure::Refused(_) | Failure::Usage(_))) => return Err(failure),
            Err(failure) if !streamed => return Err(failure),
            Err(_) => {}
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

type Events = tonic::Streaming<pb::WatchEventsResponse>;

async fn subscribe(
    target: &Target,
    args: &WatchArgs,
    after: Option<u64>,
) -> Result<Events, Failure> {
    let mut clients = target.connect().await?;
    let request = pb::WatchEventsRequest {
        instance_id: args.instance.clone(),
        include_descendants: args.descendants,
        after_sequence: after,
        kinds: args
            .kinds
            .iter()
            .map(|kind| pb::EventKind::from(*kind) as i32)
            .collect(),
    };
    match clients.delegations.watch_events(request).await {
        Ok(response) => Ok(response.into_inner()),
        Err(status) if is_refusal(&status) => Err(Failure::Refused(status.message().into())),
        // Anything else may pass: try again, as after a stream that ended.
        Err(status) => Err(Failure::Unreachable(format!(
            "the server cannot open the stream: {}",
            status.message()
        ))),
    }
}

/// Prints an event and moves the cursor past it; a progress mark only moves the cursor.
fn print(message: pb::WatchEventsResponse, cursor: &mut Option<u64>, printer: &Printer) {
    let event = match message.payload {
        Some(Payload::Event(event)) => event,
        Some(Payload::Progress(progress)) => {
            *cursor = Some(cursor.unwrap_or(0).max(progress.sequence));
            return;
        }
        None => return,
    };
    // The server never repeats a sequence on one stream; this guards the resume.
    if cursor.is_some_and(|c| event.sequence <= c) {
        return;
    }
    *cursor = Some(event.sequence);
    match printer.format {
        Format::Json => printer.json(&render::event_json(&event)),
        Format::Text => printer.table(&[event_row(&event, printer)]),
    }
}

/// One event as a line: sequence, kind, delegation, source → target, task, time, caused-by.
fn event_row(event: &pb::DelegationEvent, printer: &Printer) -> Vec<Cell> {
    let d = event.delegation.clone().unwrap_or_default();
    let mut row = vec![
        Cell::plain(format!("{:>6}", event.sequence)),
        Cell::status(render::event_kind(event.kind)).padded(kind_width()),
        Cell::plain(d.id),
        Cell::plain(format!(
            "{} → {}",
            d.source_instance_id, d.target_instance_id
        )),
        Cell::plain(format!("task {}", event.task_id)),
        Cell::dim(printer.time(event.occurred_at.as_ref())),
    ];
    if let Some(reason) = render::expiry_reason(d.expiry_reason)
        .filter(|_| event.kind == pb::EventKind::DelegationExpired as i32)
    {
        row.push(Cell::plain(reason));
    }
    if !event.caused_by_delegation_id.is_empty() {
        row.push(Cell::dim(format!(
            "caused by {}",
            event.caused_by_delegation_id
        )));
    }
    row
}

/// The longest kind's word, so that the kinds of lines printed one by one align.
fn kind_width() -> usize {
    EventKind::ALL
        .iter()
        .map(|kind| kind.as_str().len())
        .max()
        .unwrap_or(0)
}
