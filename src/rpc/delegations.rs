//! `hopper.delegation.v1.DelegationService`.

use tonic::{Request, Response, Status};

use std::pin::Pin;

use tokio_stream::{Stream, StreamExt};

use prost::Message;

use super::{
    Encoded, FromProto, all, deadline, id, optional_text, page, parse_result, text, timestamp,
};
use crate::{
    auth::Caller,
    domain::{DelegationDirection, DelegationStatus, DelegationType, EventKind, limits},
    error::Error,
    fanout::{Hub, Item, Subscription},
    proto::{
        self as pb, server::delegation_service_server::DelegationService,
        watch_events_response::Payload,
    },
    repository::{
        delegations::{self, Deadlines, Listing, NewDelegation},
        tasks,
    },
    store::{
        Db,
        event_log::{Event, Watched},
    },
    telemetry,
};

/// Serves DelegationService from a database, with event streams from `hub`.
#[derive(Clone)]
pub struct DelegationApi {
    db: Db,
    hub: Hub,
    defaults: Deadlines,
}

impl DelegationApi {
    /// A service over the hub's database, with default deadlines.
    pub fn new(hub: Hub, defaults: Deadlines) -> Self {
        Self {
            db: hub.db().clone(),
            hub,
            defaults,
        }
    }
}

/// The response stream of WatchEvents, its messages encoded.
type EventStream = Pin<Box<dyn Stream<Item = Result<Encoded, Status>> + Send>>;

#[tonic::async_trait]
impl DelegationService for DelegationApi {
    type WatchEventsStream = EventStream;

    async fn watch_events(
        &self,
        request: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let caller = Caller::of(&request)?;
        let r = request.into_inner();
        let subscription = Subscription {
            scope: Watched {
                instance_id: id("instance_id", r.instance_id)?,
                include_descendants: r.include_descendants,
            },
            after: r
                .after_sequence
                .map(|after| {
                    i64::try_from(after)
                        .map_err(|_| Error::invalid("after_sequence", "is beyond any sequence"))
                })
                .transpose()?,
            kinds: r
                .kinds
                .into_iter()
                .map(|kind| EventKind::required("kinds", kind))
                .collect::<Result<_, _>>()?,
        };
        let items = delegations::watch(&self.hub, &caller, subscription).await?;
        let stream = items.map(|item| {
            let payload = match item? {
                Item::Event(event) => {
                    let encoded = Encoded(event.encoded(encode_event)?);
                    telemetry::metrics().delivered();
                    return Ok(encoded);
                }
                Item::Progress(sequence) => Payload::Progress(pb::Progress {
                    sequence: unsigned(sequence),
                }),
            };
            let response = pb::WatchEventsResponse {
                payload: Some(payload),
            };
            Ok(Encoded(response.encode_to_vec().into()))
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn create_delegation(
        &self,
        request: Request<pb::CreateDelegationRequest>,
    ) -> Result<Response<pb::CreateDelegationResponse>, Status> {
        let caller = Caller::of(&request)?;
        let r = request.into_inner();
        let new = NewDelegation {
            request_id: limits::optional_id("request_id", &r.request_id)?
                .map(|id| caller.request_key(id)),
            id: limits::optional_id("id", &r.id)?,
            task_id: id("task_id", r.task_id)?,
            source_instance_id: id("source_instance_id", r.source_instance_id)?,
            target_instance_id: id("target_instance_id", r.target_instance_id)?,
            delegation_type: DelegationType::required("delegation_type", r.delegation_type)?,
            notes: optional_text("notes", r.notes, limits::MAX_NOTES_LEN)?,
            delegated_by: optional_text("delegated_by", r.delegated_by, limits::MAX_NAME_LEN)?,
            accept_within: deadline("accept_within", r.accept_within)?,
            complete_within: deadline("complete_within", r.complete_within)?,
            defaults: self.defaults,
        };
        telemetry::record_ids(Some(&new.task_id), None);
        let created = delegations::create(&self.db, &caller, new).await?;
        Ok(Response::new(pb::CreateDelegationResponse {
            delegation: Some(created.into()),
        }))
    }

    async fn get_delegation(
        &self,
        request: Request<pb::GetDelegationRequest>,
    ) -> Result<Response<pb::GetDelegationResponse>, Status> {
        let caller = Caller::of(&request)?;
        let delegation_id = id("id", request.into_inner().id)?;
        telemetry::record_ids(None, Some(&delegation_id));
        let delegation = delegations::get(&self.db, &caller, &delegation_id).await?;
        Ok(Response::new(pb::GetDelegationResponse {
            delegation: Some(delegation.into()),
        }))
    }

    async fn update_delegation(
        &self,
        request: Request<pb::UpdateDelegationRequest>,
    ) -> Result<Response<pb::UpdateDelegationResponse>, Status> {
        let caller = Caller::of(&request)?;
        let r = request.into_inner();
        let delegation_id = id("id", r.id)?;
        let notes = text("notes", r.notes, limits::MAX_NOTES_LEN, false)?;
        telemetry::record_ids(None, Some(&delegation_id));
        let updated = delegations::update_notes(&self.db, &caller, &delegation_id, &notes).await?;
        Ok(Response::new(pb::UpdateDelegationResponse {
            delegation: Some(updated.into()),
        }))
    }

    async fn list_task_delegations(
        &self,
        request: Request<pb::ListTaskDelegationsRequest>,
    ) -> Result<Response<pb::ListTaskDelegationsResponse>, Status> {
        let caller = Caller::of(&request)?;
        let r = request.into_inner();
        let task_id = id("task_id", r.task_id)?;
        let page = page(r.page_size, r.page_token)?;
        telemetry::record_ids(Some(&task_id), None);
        let page = delegations::list(&self.db, &caller, Listing::OfTask(&task_id), &page).await?;
        Ok(Response::new(pb::ListTaskDelegationsResponse {
            delegations: all(page.items),
            next_page_token: page.next_page_token,
        }))
    }

    async fn get_delegation_chain(
        &self,
        request: Request<pb::GetDelegationChainRequest>,
    ) -> Result<Response<pb::GetDelegationChainResponse>, Status> {
        let caller = Caller::of(&request)?;
        let task_id = id("task_id", request.into_inner().task_id)?;
        telemetry::record_ids(Some(&task_id), None);
        let chain = delegations::chain(&self.db, &caller, &task_id).await?;
        Ok(Response::new(pb::GetDelegationChainResponse {
            task_id,
            delegations: all(chain.delegations),
            origin_instance_id: chain.origin_instance_id,
            current_instance_id: chain.current_instance_id,
        }))
    }

    async fn get_delegation_tree(
        &self,
        request: Request<pb::GetDelegationTreeRequest>,
    ) -> Result<Response<pb::GetDelegationTreeResponse>, Status> {
        let caller = Caller::of(&request)?;
        let task_id = id("task_id", request.into_inner().task_id)?;
        telemetry::record_ids(Some(&task_id), None);
        let tree = tasks::tree(&self.db, &caller, &task_id).await?;
        let mut tasks = tree.tasks.into_iter().map(pb::Task::from);
        Ok(Response::new(pb::GetDelegationTreeResponse {
            task: tasks.next(),
            subtasks: tasks.collect(),
            delegations: all(tree.delegations),
        }))
    }

    async fn list_pending_delegations(
        &self,
        request: Request<pb::ListPendingDelegationsRequest>,
    ) -> Result<Response<pb::ListPendingDelegationsResponse>, Status> {
        let caller = Caller::of(&request)?;
        let r = request.into_inner();
        let instance_id = id("instance_id", r.instance_id)?;
        let page = page(r.page_size, r.page_token)?;
        let page =
            delegations::list(&self.db, &caller, Listing::PendingFor(&instance_id), &page).await?;
        Ok(Response::new(pb::ListPendingDelegationsResponse {
            delegations: all(page.items),
            next_page_token: page.next_page_token,
        }))
    }

    async fn list_instance_delegations(
        &self,
        request: Request<pb::ListInstanceDelegationsRequest>,
    ) -> Result<Response<pb::ListInstanceDelegationsResponse>, Status> {
        let caller = Caller::of(&request)?;
        let r = request.into_inner();
        let instance_id = id("instance_id", r.instance_id)?;
        let direction = DelegationDirection::from_proto("direction", r.direction)?;
        let statuses = r
            .statuses
            .into_iter()
            .map(|status| DelegationStatus::required("statuses", status))
            .collect::<Result<Vec<_>, _>>()?;
        let page = page(r.page_size, r.page_token)?;
        let listing = Listing::OfInstance {
            instance_id: &instance_id,
            direction,
            statuses: &statuses,
        };
        let page = delegations::list(&self.db, &caller, listing, &page).await?;
        Ok(Response::new(pb::ListInstanceDelegationsResponse {
            delegations: all(page.items),
            next_page_token: page.next_page_token,
        }))
    }

    async fn count_delegations(
        &self,
        request: Request<pb::CountDelegationsRequest>,
    ) -> Result<Response<pb::CountDelegationsResponse>, Status> {
        let caller = Caller::of(&request)?;
        let r = request.into_inner();
        let instance_id = id("instance_id", r.instance_id)?;
        let direction = DelegationDirection::from_proto("direction", r.direction)?;
        let counts =
            delegations::count_by_status(&self.db, &caller, &instance_id, direction).await?;
        Ok(Response::new(pb::CountDelegationsResponse {
            counts: counts
                .into_iter()
                .map(|(status, count)| pb::DelegationStatusCount {
                    status: pb::DelegationStatus::from(status).into(),
                    count,
                })
                .collect(),
        }))
    }

    async fn accept_delegation(
        &self,
        request: Request<pb::AcceptDelegationRequest>,
    ) -> Result<Response<pb::AcceptDelegationResponse>, Status> {
        let caller = Caller::of(&request)?;
        let delegation_id = id("id", request.into_inner().id)?;
        telemetry::record_ids(None, Some(&delegation_id));
        let accepted = delegations::accept(&self.db, &caller, &delegation_id).await?;
        Ok(Response::new(pb::AcceptDelegationResponse {
            delegation: Some(accepted.into()),
        }))
    }

    async fn reject_delegation(
        &self,
        request: Request<pb::RejectDelegationRequest>,
    ) -> Result<Response<pb::RejectDelegationResponse>, Status> {
        let caller = Caller::of(&request)?;
        let r = request.into_inner();
        let delegation_id = id("id", r.id)?;
        let reason = text("reason", r.reason, limits::MAX_REASON_LEN, true)?;
        telemetry::record_ids(None, Some(&delegation_id));
        let rejected = delegations::reject(&self.db, &caller, &delegation_id, &reason).await?;
        Ok(Response::new(pb::RejectDelegationResponse {
            delegation: Some(rejected.into()),
        }))
    }

    async fn complete_delegation(
        &self,
        request: Request<pb::CompleteDelegationRequest>,
    ) -> Result<Response<pb::CompleteDelegationResponse>, Status> {
        let caller = Caller::of(&request)?;
        let r = request.into_inner();
        let delegation_id = id("id", r.id)?;
        let result = parse_result(r.result)?;
        let notes = r
            .notes
            .map(|n| text("notes", n, limits::MAX_NOTES_LEN, false))
            .transpose()?;
        telemetry::record_ids(None, Some(&delegation_id));
        let done = delegations::complete(
            &self.db,
            &caller,
            &delegation_id,
            result.as_ref(),
            notes.as_deref(),
        )
        .await?;
        telemetry::metrics().bubbled(done.completed_ancestors.len());
        Ok(Response::new(pb::CompleteDelegationResponse {
            delegation: Some(done.delegation.into()),
            completed_ancestors: all(done.completed_ancestors),
            task: Some(done.task.into()),
        }))
    }

    async fn cancel_delegation(
        &self,
        request: Request<pb::CancelDelegationRequest>,
    ) -> Result<Response<pb::CancelDelegationResponse>, Status> {
        let caller = Caller::of(&request)?;
        let delegation_id = id("id", request.into_inner().id)?;
        telemetry::record_ids(None, Some(&delegation_id));
        let cancelled = delegations::cancel(&self.db, &caller, &delegation_id).await?;
        Ok(Response::new(pb::CancelDelegationResponse {
            delegation: Some(cancelled.delegation.into()),
            cancelled_descendants: all(cancelled.cancelled_descendants),
            task: Some(cancelled.task.into()),
            cancelled_subtasks: all(cancelled.cancelled_subtasks),
        }))
    }
}

/// Sequences are positive in the log; the proto carries them unsigned.
fn unsigned(sequence: i64) -> u64 {
    u64::try_from(sequence).unwrap_or_default()
}

/// The WatchEventsResponse carrying `event`, encoded.
fn encode_event(event: &Event) -> Result<bytes::Bytes, Error> {
    let delegation = event
        .delegation()
        .map_err(|e| Error::Internal(format!("event {}: {e}", event.sequence)))?;
    let event = pb::DelegationEvent {
        sequence: unsigned(event.sequence),
        kind: pb::EventKind::from(event.kind).into(),
        occurred_at: Some(timestamp(event.occurred_at)),
        delegation: delegation.map(Into::into),
        task_id: event.task_id.clone(),
        caused_by_delegation_id: event.caused_by_delegation_id.clone().unwrap_or_default(),
    };
    let response = pb::WatchEventsResponse {
        payload: Some(Payload::Event(event)),
    };
    Ok(response.encode_to_vec().into())
}
