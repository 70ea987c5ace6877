//! 1,000 trials of two conflicting transitions on one delegation, on both backends: each trial
//! has exactly one winner, and the event log records exactly the winner's change.

mod common;

use common::{Backend, TestDb, delegate, hierarchy, race, task};
use hopper_delegation::{
    auth::Caller,
    domain::{DelegationType, EventKind},
    error::Error,
    repository::delegations,
    store::event_log,
};

const TRIALS: usize = 1000;

async fn a_thousand_conflicting_pairs_have_one_winner_each(backend: Backend) {
    let test_db = TestDb::migrated(backend).await;
    let db = test_db.pool();
    hierarchy(&db).await;
    task(&db, "t", "global").await;
    let mut winners = Vec::with_capacity(TRIALS);
    for trial in 0..TRIALS {
        let d = delegate(&db, "t", "global", "project", DelegationType::Route).await;
        let outcomes = race(2, |side| {
            let (db, id) = (db.clone(), d.id.clone());
            async move {
                if side == 0 {
                    delegations::accept(&db, &Caller::Admin, &id)
                        .await
                        .map(|_| EventKind::DelegationAccepted)
                } else {
                    delegations::reject(&db, &Caller::Admin, &id, "no")
                        .await
                        .map(|_| EventKind::DelegationRejected)
                }
            }
        })
        .await;
        let won: Vec<_> = outcomes
            .iter()
            .filter_map(|o| o.as_ref().ok().copied())
            .collect();
        assert_eq!(won.len(), 1, "trial {trial}: {outcomes:?}");
        assert!(
            outcomes
                .iter()
                .any(|o| matches!(o, Err(Error::FailedPrecondition(_)))),
            "trial {trial}"
        );
        if won[0] == EventKind::DelegationAccepted {
            // Put the task back at global for the next trial.
            delegations::cancel(&db, &Caller::Admin, &d.id)
                .await
                .unwrap();
        }
        winners.push((d.id, won[0]));
    }
    let scope = event_log::Watched {
        instance_id: "global".into(),
        include_descendants: true,
    };
    db.sequence_events().await.unwrap();
    let log = event_log::read(&mut db.conn().await.unwrap(), Some(&scope), 0, i64::MAX)
        .await
        .unwrap();
    for (id, kind) in &winners {
        let recorded: Vec<_> = log
            .iter()
            .filter(|e| e.delegation_id.as_deref() == Some(id.as_str()))
            .filter(|e| {
                matches!(
                    e.kind,
                    EventKind::DelegationAccepted | EventKind::DelegationRejected
                )
            })
            .map(|e| e.kind)
            .collect();
        assert_eq!(recorded, [*kind], "delegation {id}");
    }
    let accepted = winners
        .iter()
        .filter(|(_, k)| *k == EventKind::DelegationAccepted)
        .count();
    eprintln!(
        "{backend:?}: {TRIALS} trials, accept won {accepted}, reject won {}",
        TRIALS - accepted
    );
}

on_both_backends!(a_thousand_conflicting_pairs_have_one_winner_each);
