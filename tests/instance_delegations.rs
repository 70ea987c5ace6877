//! What a client embedding the service needs beyond the task's own view: delegations made with
//! an id of the caller's choosing, an instance's delegations by direction and status, a page at
//! a time, and their counts by status; on both backends, over gRPC.

mod common;

use common::{Backend, TestServer, rpc, snapshot};
use hopper_delegation::proto::{self as pb, DelegationDirection, DelegationStatus};
use tonic::Code;

/// `t1` routed global -> project and accepted, `t2` routed global -> project and rejected,
/// `t3` routed global -> project2 (pending), `t1` then routed project -> orch (pending).
async fn traffic(server: &mut TestServer) -> Vec<pb::Delegation> {
    server.hierarchy().await;
    for task in ["t1", "t2", "t3"] {
        server.new_task(task, "global").await;
    }
    let d1 = server.delegate(rpc::route("t1", "global", "project")).await;
    server.accept(&d1.id).await;
    let d2 = server.delegate(rpc::route("t2", "global", "project")).await;
    let reject = pb::RejectDelegationRequest {
        id: d2.id.clone(),
        reason: "busy".into(),
    };
    let d2 = server.delegations.reject_delegation(reject).await.unwrap();
    let d2 = d2.into_inner().delegation.unwrap();
    let d3 = server
        .delegate(rpc::route("t3", "global", "project2"))
        .await;
    let d4 = server.delegate(rpc::route("t1", "project", "orch")).await;
    vec![d1, d2, d3, d4]
}

fn listing(
    instance: &str,
    direction: DelegationDirection,
    statuses: &[DelegationStatus],
) -> pb::ListInstanceDelegationsRequest {
    pb::ListInstanceDelegationsRequest {
        instance_id: instance.into(),
        direction: direction.into(),
        statuses: statuses.iter().map(|s| (*s).into()).collect(),
        ..Default::default()
    }
}

/// Every page of a listing, `page_size` at a time: the ids, in order.
async fn all_pages(
    server: &mut TestServer,
    mut request: pb::ListInstanceDelegationsRequest,
) -> Vec<String> {
    let mut ids = Vec::new();
    loop {
        let page = server
            .delegations
            .list_instance_delegations(request.clone())
            .await
            .expect("list")
            .into_inner();
        ids.extend(page.delegations.into_iter().map(|d| d.id));
        if page.next_page_token.is_empty() {
            return ids;
        }
        request.page_token = page.next_page_token;
    }
}

async fn counts(
    server: &mut TestServer,
    instance: &str,
    direction: DelegationDirection,
) -> Vec<(DelegationStatus, u64)> {
    let request = pb::CountDelegationsRequest {
        instance_id: instance.into(),
        direction: direction.into(),
    };
    let response = server.delegations.count_delegations(request).await;
    response
        .expect("count")
        .into_inner()
        .counts
        .into_iter()
        .map(|c| (DelegationStatus::try_from(c.status).unwrap(), c.count))
        .collect()
}

async fn an_instance_lists_its_delegations_by_direction_and_status(backend: Backend) {
    use DelegationDirection::{Incoming, Outgoing, Unspecified};
    use DelegationStatus::{Accepted, Cancelled, Completed, Expired, Pending, Rejected};
    let mut server = TestServer::start(backend).await;
    let d = traffic(&mut server).await;
    let ids =
        |picked: &[usize]| -> Vec<String> { picked.iter().map(|&i| d[i].id.clone()).collect() };

    let mut incoming = listing("project", Incoming, &[]);
    assert_eq!(all_pages(&mut server, incoming.clone()).await, ids(&[0, 1]));
    // One at a time, the pages join up to the same list.
    incoming.page_size = 1;
    assert_eq!(all_pages(&mut server, incoming).await, ids(&[0, 1]));
    let outgoing = listing("project", Outgoing, &[]);
    assert_eq!(all_pages(&mut server, outgoing).await, ids(&[3]));
    let either = listing("project", Unspecified, &[]);
    assert_eq!(all_pages(&mut server, either).await, ids(&[0, 1, 3]));
    let active = listing("project", Unspecified, &[Pending, Accepted]);
    assert_eq!(all_pages(&mut server, active).await, ids(&[0, 3]));
    let sent = listing("global", Outgoing, &[Rejected, Pending]);
    assert_eq!(all_pages(&mut server, sent).await, ids(&[1, 2]));
    let none = listing("orch", Outgoing, &[]);
    assert!(all_pages(&mut server, none).await.is_empty());

    let every = |pending, accepted, rejected| {
        [Pending, Accepted, Rejected, Completed, Cancelled, Expired]
            .iter()
            .map(|&s| {
                let n = match s {
                    Pending => pending,
                    Accepted => accepted,
                    Rejected => rejected,
                    _ => 0,
                };
                (s, n)
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(
        counts(&mut server, "project", Incoming).await,
        every(0, 1, 1)
    );
    assert_eq!(
        counts(&mut server, "project", Outgoing).await,
        every(1, 0, 0)
    );
    assert_eq!(
        counts(&mut server, "project", Unspecified).await,
        every(1, 1, 1)
    );
    assert_eq!(
        counts(&mut server, "global", Outgoing).await,
        every(1, 1, 1)
    );
    assert_eq!(counts(&mut server, "orch", Outgoing).await, every(0, 0, 0));
    server.stop().await;
}

async fn unknown_instances_and_bad_filters_are_refused(backend: Backend) {
    let mut server = TestServer::start(backend).await;
    traffic(&mut server).await;
    let before = snapshot(&server.db.pool()).await;
    let missing = listing("nowhere", DelegationDirection::Incoming, &[]);
    let status = server
        .delegations
        .list_instance_delegations(missing)
        .await
        .unwrap_err();
    assert_eq!(
        (status.code(), status.message()),
        (Code::NotFound, "instance nowhere not found")
    );
    let count = pb::CountDelegationsRequest {
        instance_id: "nowhere".into(),
        direction: 0,
    };
    let status = server
        .delegations
        .count_delegations(count)
        .await
        .unwrap_err();
    assert_eq!(
        (status.code(), status.message()),
        (Code::NotFound, "instance nowhere not found")
    );
    let mut unspecified = listing("project", DelegationDirection::Incoming, &[]);
    unspecified.statuses = vec![0];
    let status = server
        .delegations
        .list_instance_delegations(unspecified)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().starts_with("statuses: "), "{status:?}");
    let mut unknown = listing("project", DelegationDirection::Incoming, &[]);
    unknown.direction = 9;
    let status = server
        .delegations
        .list_instance_delegations(unknown)
        .await
        .unwrap_err();
    assert_eq!(
        (status.code(), status.message()),
        (Code::InvalidArgument, "direction: 9 is not a known value")
    );
    assert_eq!(snapshot(&server.db.pool()).await, before);
    server.stop().await;
}

async fn a_delegation_takes_the_id_its_creator_chose(backend: Backend) {
    let mut server = TestServer::start(backend).await;
    server.hierarchy().await;
    server.new_task("t", "global").await;
    server.new_task("u", "global").await;
    let chosen = pb::CreateDelegationRequest {
        id: "DEL-CHAIN-1".into(),
        ..rpc::route("t", "global", "project")
    };
    let created = server.delegate(chosen).await;
    assert_eq!(created.id, "DEL-CHAIN-1");
    let accepted = server.accept("DEL-CHAIN-1").await;
    assert_eq!(accepted.status, DelegationStatus::Accepted as i32);

    let before = snapshot(&server.db.pool()).await;
    let taken = pb::CreateDelegationRequest {
        id: "DEL-CHAIN-1".into(),
        ..rpc::route("u", "global", "project")
    };
    let status = server
        .delegations
        .create_delegation(taken)
        .await
        .unwrap_err();
    assert_eq!(
        (status.code(), status.message()),
        (Code::AlreadyExists, "delegation DEL-CHAIN-1 already exists")
    );
    let malformed = pb::CreateDelegationRequest {
        id: "no spaces".into(),
        ..rpc::route("u", "global", "project")
    };
    let status = server
        .delegations
        .create_delegation(malformed)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().starts_with("id: "), "{status:?}");
    // Nothing was written: not the task's move, not an event.
    assert_eq!(snapshot(&server.db.pool()).await, before);
    server.stop().await;
}

on_both_backends!(
    an_instance_lists_its_delegations_by_direction_and_status,
    unknown_instances_and_bad_filters_are_refused,
    a_delegation_takes_the_id_its_creator_chose,
);
