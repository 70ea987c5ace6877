//! The gRPC edge: one file per service. Each method parses its request into checked values
//! (INVALID_ARGUMENT names the field), calls `repository`, and converts the records back.
//! This module never touches the database; conversions between proto and domain live here.

mod delegations;
mod instances;
mod tasks;

pub use crate::repository::delegations::Deadlines;
pub use delegations::DelegationApi;
pub use instances::InstanceApi;
pub use tasks::TaskApi;

/// The servers' codec (`proto::server`): prost's, with a small initial encode buffer. Each
/// response stream holds its buffer for its whole life, and prost's default (8 KiB) would be
/// a quarter of an idle WatchEvents subscriber's memory; a message that needs more grows it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Codec<T, U>(std::marker::PhantomData<fn(T) -> U>);

impl<T, U> Default for Codec<T, U> {
    fn default() -> Self {
        Self(std::marker::PhantomData)
    }
}

impl<T, U> tonic::codec::Codec for Codec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = tonic_prost::ProstEncoder<T>;
    type Decoder = tonic_prost::ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        tonic_prost::ProstEncoder::new(tonic::codec::BufferSettings::new(512, 32 * 1024))
    }

    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstDecoder::new(tonic::codec::BufferSettings::default())
    }
}

/// A `WatchEventsResponse` already encoded, sent as is: the generated servers
/// (`proto::server`) carry this type in its place, so that an event is encoded once for all
/// its subscribers. Only ever encoded; clients decode the generated type.
#[derive(Debug, Clone, Default)]
pub struct Encoded(bytes::Bytes);

impl prost::Message for Encoded {
    fn encode_raw(&self, buf: &mut impl bytes::BufMut) {
        buf.put_slice(&self.0);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: prost::encoding::WireType,
        buf: &mut impl bytes::Buf,
        ctx: prost::encoding::DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        prost::encoding::skip_field(wire_type, tag, buf, ctx)
    }

    fn encoded_len(&self) -> usize {
        self.0.len()
    }

    fn clear(&mut self) {
        self.0.clear();
    }
}

use chrono::NaiveDateTime;
use prost_types::Timestamp;

use crate::{
    domain::{self, limits},
    error::Error,
    proto::{self as pb, json},
    repository::PageRequest,
    store::{delegations::Delegation, instances::Instance, tasks::Task},
};

/// Maps a domain enum to its proto enum (same variant names) and back.
macro_rules! enum_map {
    ($($name:ident { $($variant:ident),+ })+) => {$(
        impl From<domain::$name> for pb::$name {
            fn from(value: domain::$name) -> Self {
                match value { $(domain::$name::$variant => Self::$variant,)+ }
            }
        }

        impl FromProto for domain::$name {
            fn from_proto(field: &'static str, value: i32) -> Result<Option<Self>, Error> {
                match pb::$name::try_from(value) {
                    Ok(pb::$name::Unspecified) => Ok(None),
                    $(Ok(pb::$name::$variant) => Ok(Some(Self::$variant)),)+
                    Err(_) => Err(Error::invalid(field, format!("{value} is not a known value"))),
                }
            }
        }
    )+};
}

/// Parses a proto enum number: `None` for UNSPECIFIED, INVALID_ARGUMENT for unknown numbers.
trait FromProto: Sized {
    fn from_proto(field: &'static str, value: i32) -> Result<Option<Self>, Error>;

    /// Like `from_proto`, refusing UNSPECIFIED too.
    fn required(field: &'static str, value: i32) -> Result<Self, Error> {
        Self::from_proto(field, value)?
            .ok_or_else(|| Error::invalid(field, "is required (UNSPECIFIED is not allowed)"))
    }
}

enum_map! {
    Scope { Global, Project, Orchestration, Personal, Family, Event, Federated }
    InstanceStatus { Created, Starting, Running, Stopping, Stopped, Paused, Error, Terminated }
    TaskStatus { Pending, Claimed, InProgress, Blocked, Done, Cancelled }
    DelegationType { Route, Decompose, Escalate, Reassign }
    DelegationStatus { Pending, Accepted, Rejected, Completed, Cancelled, Expired }
    EventKind {
        DelegationCreated, DelegationAccepted, DelegationRejected, DelegationCompleted,
        DelegationCancelled, TaskCompleted, DelegationExpired
    }
    ExpiryReason { AcceptDeadline, CompleteDeadline, TargetUnresponsive }
    DelegationDirection { Incoming, Outgoing }
}

/// The longest deadline a hop may carry.
pub const MAX_DEADLINE: std::time::Duration = std::time::Duration::from_secs(366 * 24 * 3600);

/// An optional deadline: positive and at most [`MAX_DEADLINE`].
fn deadline(
    field: &'static str,
    value: Option<prost_types::Duration>,
) -> Result<Option<std::time::Duration>, Error> {
    let Some(value) = value else {
        return Ok(None);
    };
    let within = positive(field, value)?;
    if within > MAX_DEADLINE {
        return Err(Error::invalid(field, "must be at most 366 days"));
    }
    Ok(Some(within))
}

/// An optional lease period: 1 s to 1 h.
fn lease(value: Option<prost_types::Duration>) -> Result<Option<std::time::Duration>, Error> {
    let Some(value) = value else {
        return Ok(None);
    };
    let lease = positive("lease", value)?;
    if !(LEASE_MIN..=LEASE_MAX).contains(&lease) {
        return Err(Error::invalid("lease", "must be from 1s to 1h"));
    }
    Ok(Some(lease))
}

/// The shortest and longest lease an instance may hold.
const LEASE_MIN: std::time::Duration = std::time::Duration::from_secs(1);
const LEASE_MAX: std::time::Duration = std::time::Duration::from_secs(3600);

/// A wire duration that must be positive (and well-formed: nanos within a second, same sign).
fn positive(
    field: &'static str,
    value: prost_types::Duration,
) -> Result<std::time::Duration, Error> {
    u64::try_from(value.seconds)
        .ok()
        .zip(
            u32::try_from(value.nanos)
                .ok()
                .filter(|n| *n < 1_000_000_000),
        )
        .map(|(seconds, nanos)| std::time::Duration::new(seconds, nanos))
        .filter(|within| !within.is_zero())
        .ok_or_else(|| Error::invalid(field, "must be a positive duration"))
}

/// A required id field.
fn id(field: &'static str, value: String) -> Result<String, Error> {
    limits::id(field, &value)?;
    Ok(value)
}

/// A text field with a length limit; empty means absent unless `required`.
fn text(field: &'static str, value: String, max: usize, required: bool) -> Result<String, Error> {
    limits::text(field, &value, max, required)?;
    Ok(value)
}

/// An optional text field: empty means absent.
fn optional_text(field: &'static str, value: String, max: usize) -> Result<Option<String>, Error> {
    let value = text(field, value, max, false)?;
    Ok((!value.is_empty()).then_some(value))
}

/// A page request, its size checked by [`limits::page_size`].
fn page(size: i32, token: String) -> Result<PageRequest, Error> {
    Ok(PageRequest {
        size: limits::page_size(size)?,
        token,
    })
}

/// An optional result document, within the size limit.
fn parse_result(result: Option<prost_types::Struct>) -> Result<Option<serde_json::Value>, Error> {
    let result = result.map(|s| json::from_struct("result", s)).transpose()?;
    if let Some(result) = &result {
        limits::json("result", result)?;
    }
    Ok(result)
}

fn timestamp(at: NaiveDateTime) -> Timestamp {
    let at = at.and_utc();
    Timestamp {
        seconds: at.timestamp(),
        // Always below 1e9, so it fits.
        nanos: i32::try_from(at.timestamp_subsec_nanos()).unwrap_or_default(),
    }
}

impl From<Instance> for pb::Instance {
    fn from(instance: Instance) -> Self {
        Self {
            scope: pb::Scope::from(instance.scope).into(),
            status: pb::InstanceStatus::from(instance.status).into(),
            config: Some(json::to_struct(instance.config)),
            created_at: Some(timestamp(instance.created_at)),
            updated_at: Some(timestamp(instance.updated_at)),
            parent_id: instance.parent_id.unwrap_or_default(),
            lease: instance.lease_ms.map(|ms| prost_types::Duration {
                seconds: ms / 1000,
                nanos: i32::try_from(ms % 1000 * 1_000_000).unwrap_or_default(),
            }),
            lease_expires_at: instance.lease_expires_at.map(timestamp),
            id: instance.id,
            name: instance.name,
        }
    }
}

impl From<Task> for pb::Task {
    fn from(task: Task) -> Self {
        Self {
            status: pb::TaskStatus::from(task.status).into(),
            result: task.result.map(json::to_struct),
            created_at: Some(timestamp(task.created_at)),
            updated_at: Some(timestamp(task.updated_at)),
            parent_task_id: task.parent_task_id.unwrap_or_default(),
            id: task.id,
            title: task.title,
            description: task.description,
            instance_id: task.instance_id,
        }
    }
}

impl From<Delegation> for pb::Delegation {
    fn from(d: Delegation) -> Self {
        Self {
            delegation_type: pb::DelegationType::from(d.delegation_type).into(),
            status: pb::DelegationStatus::from(d.status).into(),
            delegated_at: Some(timestamp(d.delegated_at)),
            accepted_at: d.accepted_at.map(timestamp),
            completed_at: d.completed_at.map(timestamp),
            result: d.result.map(json::to_struct),
            created_at: Some(timestamp(d.created_at)),
            updated_at: Some(timestamp(d.updated_at)),
            parent_delegation_id: d.parent_delegation_id.unwrap_or_default(),
            rejection_reason: d.rejection_reason.unwrap_or_default(),
            notes: d.notes.unwrap_or_default(),
            delegated_by: d.delegated_by.unwrap_or_default(),
            accept_by: d.accept_by.map(timestamp),
            complete_by: d.complete_by.map(timestamp),
            expired_at: d.expired_at.map(timestamp),
            expiry_reason: d
                .expiry_reason
                .map_or(pb::ExpiryReason::Unspecified, pb::ExpiryReason::from)
                .into(),
            id: d.id,
            task_id: d.task_id,
            source_instance_id: d.source_instance_id,
            target_instance_id: d.target_instance_id,
        }
    }
}

/// Converts a list of records.
fn all<T, P: From<T>>(records: Vec<T>) -> Vec<P> {
    records.into_iter().map(P::from).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enums_map_both_ways_and_refuse_unknown_numbers() {
        for kind in domain::DelegationType::ALL {
            let number = pb::DelegationType::from(*kind) as i32;
            assert_eq!(
                domain::DelegationType::from_proto("t", number).unwrap(),
                Some(*kind)
            );
        }
        for status in domain::InstanceStatus::ALL {
            let number = pb::InstanceStatus::from(*status) as i32;
            assert_eq!(
                domain::InstanceStatus::required("s", number).unwrap(),
                *status
            );
        }
        assert_eq!(domain::Scope::from_proto("scope", 0).unwrap(), None);
        let err = domain::Scope::required("scope", 0).unwrap_err();
        assert_eq!(
            err.to_string(),
            "scope: is required (UNSPECIFIED is not allowed)"
        );
        let err = domain::TaskStatus::from_proto("status", 99).unwrap_err();
        assert_eq!(err.to_string(), "status: 99 is not a known value");
    }

    #[test]
    fn timestamps_keep_microseconds() {
        let at = crate::store::now();
        let ts = timestamp(at);
        let back = chrono::DateTime::from_timestamp(ts.seconds, ts.nanos as u32).unwrap();
        assert_eq!(back.naive_utc(), at);
    }
}
