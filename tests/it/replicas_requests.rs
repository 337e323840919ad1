//! Request ids across replicas and NATS failures: real nats-server,
//! the simulator, and facade processes on loopback ports.
use crate::common;

use std::time::Duration;

use ccgw_callcontrol::proto::{
    call_control_client::CallControlClient, ReleaseCallRequest, ReleaseCallResponse, ReleaseOutcome,
};
use ccgw_sim::{Fault, FaultRule};
use common::{
    error_metadata, expect_shared_state_unavailable, expect_status, health, health_becomes,
    nats::NatsLink,
    release_req, release_with_id, releases_sent,
    replicas::{Replica, ReplicaSet},
    wait_until, watch_req, CALLER, SERVING, WAIT,
};
use futures_util::StreamExt;
use tonic::{transport::Channel, Code};
use tonic_health::pb::health_check_response::ServingStatus;

/// Holds the next release of a current call at the gateway for `ms`.
fn hold_next_release(set: &ReplicaSet, ms: u64) {
    set.sim.push_fault(FaultRule {
        fault: Fault::Latency { ms },
        count: 1,
        method: Some("DELETE".to_owned()),
        path_contains: None,
    });
}

/// Two replicas with `flags`, agent 101's session handed over to both.
async fn two_replicas(set: &ReplicaSet, flags: &[&str]) -> [Replica; 2] {
    let replicas = [set.spawn(flags).await, set.spawn(flags).await];
    set.sign_in_and_hand_over("101", &[&replicas[0], &replicas[1]])
        .await;
    replicas
}

/// A call on agent 101, then the simulator's request log cleared: it holds what the test's
/// releases send.
fn call_101(set: &ReplicaSet) {
    set.sim.place_call("101", CALLER).unwrap();
    set.sim.clear_requests();
}

fn released(answer: &ReleaseCallResponse) {
    assert_eq!(answer.outcome(), ReleaseOutcome::Released, "{answer:?}");
}

/// An answer the facade does not understand (the undocumented retcode 200-099) may mean the
/// call was hung up: the shared bucket keeps it, so a repeat on another replica replays it
/// (outcome unknown, nothing to retry) and sends no second DELETE.
#[tokio::test]
async fn an_undocumented_retcode_is_kept_for_every_replica() {
    let Some(set) = ReplicaSet::builder().start().await else {
        return;
    };
    let [replica_a, replica_b] = two_replicas(&set, &[]).await;
    let mut a = replica_a.client().await;
    let mut b = replica_b.client().await;
    call_101(&set);
    set.sim.push_fault(FaultRule {
        fault: Fault::Retcode {
            retcode: "200-099".to_owned(),
            message: "undocumented".to_owned(),
        },
        count: 1,
        method: Some("DELETE".to_owned()),
        path_contains: None,
    });
    for client in [&mut a, &mut b] {
        let status = client
            .release_call(release_with_id("101", "undocumented-1"))
            .await
            .unwrap_err();
        let details = expect_status(&status, Code::Unknown, "RELEASE_OUTCOME_UNKNOWN");
        let metadata = &details.error_info().unwrap().metadata;
        assert_eq!(metadata["cause"], "GATEWAY_RETCODE_UNKNOWN", "{status:?}");
        assert_eq!(metadata["retcode"], "200-099", "{status:?}");
        assert!(details.retry_info().is_none(), "{status:?}");
        assert_eq!(releases_sent(&set.sim), 1, "the repeat released again");
    }
}

/// The same request_id sent to two replicas while the first release is still at the gateway:
/// one DELETE, one answer for both (the second replayed); a different command with that id is
/// refused on either replica.
#[tokio::test]
async fn a_request_id_is_released_once_whichever_replicas_it_reaches() {
    let Some(set) = ReplicaSet::builder().start().await else {
        return;
    };
    let [replica_a, replica_b] = two_replicas(&set, &[]).await;
    let mut a = replica_a.client().await;
    let mut b = replica_b.client().await;
    call_101(&set);

    hold_next_release(&set, 4_000);
    let first = tokio::spawn({
        let mut a = a.clone();
        async move { a.release_call(release_with_id("101", "hang-up-1")).await }
    });
    wait_until("the first release reached the gateway", || {
        releases_sent(&set.sim) == 1
    })
    .await;
    let second = b
        .release_call(release_with_id("101", "hang-up-1"))
        .await
        .expect("the duplicate gets the first answer")
        .into_inner();
    let first = first.await.unwrap().expect("released").into_inner();
    released(&first);
    released(&second);
    assert!(!first.replayed);
    assert!(second.replayed);
    assert_eq!(first.retcode, second.retcode);
    assert_eq!(releases_sent(&set.sim), 1, "the duplicate released again");

    // Later duplicates on either replica replay it too.
    for client in [&mut a, &mut b] {
        let again = client
            .release_call(release_with_id("101", "hang-up-1"))
            .await
            .unwrap()
            .into_inner();
        assert!(again.replayed);
        released(&again);
    }
    assert_eq!(releases_sent(&set.sim), 1);

    // The id names that release: another command under it is refused, nothing sent.
    for client in [&mut a, &mut b] {
        let other = ReleaseCallRequest {
            require_active_call: true,
            ..release_with_id("101", "hang-up-1")
        };
        let status = client.release_call(other).await.unwrap_err();
        expect_status(&status, Code::InvalidArgument, "REQUEST_ID_REUSED");
    }
    let status = b
        .release_call(release_with_id("102", "hang-up-1"))
        .await
        .unwrap_err();
    expect_status(&status, Code::InvalidArgument, "REQUEST_ID_REUSED");
    assert_eq!(releases_sent(&set.sim), 1);
}

/// NATS stopped: readiness NOT_SERVING (liveness stays SERVING), ReleaseCall and new streams
/// answer UNAVAILABLE / SHARED_STATE_UNAVAILABLE with nothing sent. NATS back: ready, and
/// releases work again.
#[tokio::test]
async fn without_nats_a_replica_is_not_ready_and_sends_nothing() {
    let Some(mut set) = ReplicaSet::builder().start().await else {
        return;
    };
    let replica_a = set.spawn(&[]).await;
    let mut a = replica_a.client().await;
    set.sign_in_and_hand_over("101", &[&replica_a]).await;
    health_becomes(replica_a.addr(), "", ServingStatus::Serving, WAIT).await;
    call_101(&set);

    set.nats[0].kill().await;
    health_becomes(replica_a.addr(), "", ServingStatus::NotServing, WAIT).await;
    assert_eq!(
        health(replica_a.addr(), "liveness").await,
        Some(ServingStatus::Serving)
    );
    for request in [release_req("101"), release_with_id("101", "during-outage")] {
        let status = a.release_call(request).await.unwrap_err();
        expect_shared_state_unavailable(&status);
    }
    let status = a
        .watch_release_events(watch_req(&["101"]))
        .await
        .unwrap_err();
    expect_shared_state_unavailable(&status);
    assert!(set.sim.requests().is_empty(), "sent during the outage");

    set.nats[0].restart().await;
    health_becomes(replica_a.addr(), "", ServingStatus::Serving, WAIT).await;
    let answer = a
        .release_call(release_with_id("101", "during-outage"))
        .await
        .expect("released once NATS is back")
        .into_inner();
    released(&answer);
    assert_eq!(releases_sent(&set.sim), 1);
}

/// With --release-without-nats, a release without request_id goes through during the outage
/// with the session handed over before it; one with a request_id is still refused (its id
/// cannot be claimed where the other replicas would see it).
#[tokio::test]
async fn release_without_nats_uses_the_last_known_session() {
    let Some(mut set) = ReplicaSet::builder().start().await else {
        return;
    };
    let replica_a = set.spawn(&["--release-without-nats"]).await;
    let mut a = replica_a.client().await;
    set.sign_in_and_hand_over("101", &[&replica_a]).await;
    call_101(&set);

    set.nats[0].kill().await;
    health_becomes(replica_a.addr(), "", ServingStatus::NotServing, WAIT).await;
    let status = a
        .release_call(release_with_id("101", "with-an-id"))
        .await
        .unwrap_err();
    expect_shared_state_unavailable(&status);
    assert_eq!(releases_sent(&set.sim), 0);
    let answer = a
        .release_call(release_req("101"))
        .await
        .expect("released with the last known session")
        .into_inner();
    released(&answer);
    assert_eq!(releases_sent(&set.sim), 1);
}

/// A replica killed (-9) while its release is at the gateway leaves its claim unanswered: a
/// duplicate on another replica waits for the claim's deadline, then gets
/// RELEASE_OUTCOME_UNKNOWN (cause EARLIER_ATTEMPT_LOST), and nothing is sent again, then or
/// later.
#[tokio::test]
async fn a_claim_whose_replica_died_is_an_attempt_lost_never_repeated() {
    let Some(set) = ReplicaSet::builder().start().await else {
        return;
    };
    let [mut replica_a, replica_b] = two_replicas(&set, &[]).await;
    let mut a = replica_a.client().await;
    let mut b = replica_b.client().await;
    call_101(&set);

    hold_next_release(&set, 120_000);
    let mut request = tonic::Request::new(release_with_id("101", "doomed"));
    request.set_timeout(Duration::from_secs(2));
    let first = tokio::spawn(async move { a.release_call(request).await });
    wait_until("the first release reached the gateway", || {
        releases_sent(&set.sim) == 1
    })
    .await;
    replica_a.kill().await;
    let _ = first.await;

    for _ in 0..2 {
        let mut duplicate = tonic::Request::new(release_with_id("101", "doomed"));
        duplicate.set_timeout(WAIT);
        expect_earlier_attempt_lost(&b.release_call(duplicate).await.unwrap_err());
    }
    assert_eq!(releases_sent(&set.sim), 1, "a lost release was repeated");
}

/// The bucket holds --idempotency-capacity ids: an answer that changed nothing leaves at once;
/// beyond that, answers that must be kept are not dropped, and a new id is refused with nothing
/// sent.
#[tokio::test]
async fn a_full_request_id_bucket_refuses_new_ids() {
    let Some(set) = ReplicaSet::builder().start().await else {
        return;
    };
    // The one caller's share is more than the bucket: the bucket's limit is what this is about.
    let replica_a = set
        .spawn(&[
            "--idempotency-capacity",
            "1",
            "--max-request-ids-per-caller",
            "2",
        ])
        .await;
    let mut a = replica_a.client().await;
    set.sign_in_and_hand_over("101", &[&replica_a]).await;
    set.sim.clear_requests();
    // An answer that provably changed nothing is forgotten at once, freeing its slot.
    let status = a
        .release_call(release_with_id("102", "no-session"))
        .await
        .unwrap_err();
    expect_status(&status, Code::FailedPrecondition, "NO_SESSION");
    let kept = a
        .release_call(release_with_id("101", "kept"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(kept.outcome(), ReleaseOutcome::NoActiveCall);
    set.sim.place_call("101", CALLER).unwrap();
    let status = a
        .release_call(release_with_id("101", "one-too-many"))
        .await
        .unwrap_err();
    expect_status(
        &status,
        Code::ResourceExhausted,
        "TOO_MANY_PENDING_RELEASES",
    );
    assert_eq!(releases_sent(&set.sim), 1, "only the kept id's release");
    let replay = a
        .release_call(release_with_id("101", "kept"))
        .await
        .unwrap()
        .into_inner();
    assert!(replay.replayed);
}

/// With the bucket on three JetStream nodes (--nats-replicas 3), one node killed: ids are still
/// claimed and replayed on the two left.
#[tokio::test]
async fn request_ids_outlive_one_nats_node_of_three() {
    let Some(mut set) = ReplicaSet::builder().cluster().start().await else {
        return;
    };
    let [replica_a, replica_b] = two_replicas(&set, &["--nats-replicas", "3"]).await;
    let mut a = replica_a.client().await;
    let b = replica_b.client().await;
    let before = a
        .release_call(release_with_id("101", "before"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(before.outcome(), ReleaseOutcome::NoActiveCall);
    // Its record is written after the caller has its answer: replayed once on the other replica
    // first, so that it is stored before the node goes. (A repeat while a record is held up by
    // a failover waits for it, at most its own deadline, and then answers the outcome unknown.)
    let replayed = b
        .clone()
        .release_call(release_with_id("101", "before"))
        .await
        .unwrap()
        .into_inner();
    assert!(replayed.replayed, "before, on the other replica");

    set.nats[0].kill().await;
    // The client moves to a node left, and the bucket may elect a new leader: until then a
    // claim is refused with nothing sent, so each try takes a fresh id.
    health_becomes(replica_a.addr(), "", ServingStatus::Serving, WAIT).await;
    let mut attempt = 0;
    let answered = tokio::time::timeout(WAIT, async {
        loop {
            attempt += 1;
            let id = format!("after-{attempt}");
            match a.release_call(release_with_id("101", &id)).await {
                Ok(answer) => return (id, answer.into_inner()),
                Err(status) => expect_shared_state_unavailable(&status),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    let (id, after) = answered.expect("a release with an id goes through on two nodes of three");
    assert_eq!(after.outcome(), ReleaseOutcome::NoActiveCall);
    for (mut client, request_id) in [(a, "before"), (b.clone(), "before"), (b, id.as_str())] {
        let replayed = client
            .release_call(release_with_id("101", request_id))
            .await
            .unwrap()
            .into_inner();
        assert!(replayed.replayed, "{request_id}");
    }
}

/// A caller's share of the request_ids applies with a shared bucket too, counted by each
/// replica for the requests it serves; an id answered anywhere is still replayed to a caller
/// at its share.
#[tokio::test]
async fn each_replica_holds_a_caller_to_its_share_of_the_request_ids() {
    let Some(set) = ReplicaSet::builder().start().await else {
        return;
    };
    let flags = ["--max-request-ids-per-caller", "2"];
    let [replica_a, replica_b] = two_replicas(&set, &flags).await;
    let mut a = replica_a.client().await;
    let mut b = replica_b.client().await;
    let sent = releases_sent(&set.sim);
    for id in ["a-1", "a-2"] {
        let answer = a
            .release_call(release_with_id("101", id))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(answer.outcome(), ReleaseOutcome::NoActiveCall);
    }
    let refused = a
        .release_call(release_with_id("101", "a-3"))
        .await
        .unwrap_err();
    expect_status(&refused, Code::ResourceExhausted, "CALLER_LIMIT_REACHED");
    assert_eq!(
        error_metadata(&refused)["caller_limit"],
        "--max-request-ids-per-caller"
    );
    assert_eq!(
        releases_sent(&set.sim),
        sent + 2,
        "the refused id's release was sent"
    );

    // The other replica counts its own.
    let answer = b
        .release_call(release_with_id("101", "b-1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.outcome(), ReleaseOutcome::NoActiveCall);
    // Ids answered here or there are replayed by the replica at the caller's share.
    for id in ["a-1", "b-1"] {
        let replay = a
            .release_call(release_with_id("101", id))
            .await
            .unwrap()
            .into_inner();
        assert!(replay.replayed, "{id}: {replay:?}");
    }
    assert_eq!(releases_sent(&set.sim), sent + 3);
}

/// Replica A reaching NATS through a link the test can cut, replica B directly; agent 101's
/// session handed over to both, a call placed, and the next release held at the gateway for
/// `hold_ms`.
async fn one_replica_behind_a_link(set: &ReplicaSet, hold_ms: u64) -> (NatsLink, [Replica; 2]) {
    let link = NatsLink::start(set.nats[0].port).await;
    let replicas = [
        set.spawn_on(&set.gateway_url(), &link.url(), &[], SERVING)
            .await,
        set.spawn(&[]).await,
    ];
    set.sign_in_and_hand_over("101", &[&replicas[0], &replicas[1]])
        .await;
    call_101(set);
    hold_next_release(set, hold_ms);
    (link, replicas)
}

/// How long a caller may wait for its answer once the gateway gave it: well under the NATS
/// request timeout (5 s) a held record write would take to fail.
const ANSWERED_WITHIN: Duration = Duration::from_secs(3);

/// Sends `request` through `client` (replica A), cuts A's link to NATS once the release reached
/// the gateway (its claim acknowledged), and expects "released" while the answer's record is
/// held.
async fn released_with_the_record_held(
    set: &ReplicaSet,
    link: &NatsLink,
    mut client: CallControlClient<Channel>,
    request: impl tonic::IntoRequest<ReleaseCallRequest> + Send + 'static,
) -> ReleaseCallResponse {
    let first = tokio::spawn(async move { client.release_call(request).await });
    wait_until("the first release reached the gateway", || {
        releases_sent(&set.sim) == 1
    })
    .await;
    link.cut();
    let first = tokio::time::timeout(ANSWERED_WITHIN + Duration::from_secs(1), first)
        .await
        .expect("the caller hears the answer before its record is written")
        .unwrap()
        .expect("released")
        .into_inner();
    released(&first);
    first
}

/// RELEASE_OUTCOME_UNKNOWN with cause EARLIER_ATTEMPT_LOST: nothing to retry.
fn expect_earlier_attempt_lost(status: &tonic::Status) {
    let details = expect_status(status, Code::Unknown, "RELEASE_OUTCOME_UNKNOWN");
    assert!(details.retry_info().is_none(), "{status:?}");
    let metadata = error_metadata(status);
    assert_eq!(metadata["cause"], "EARLIER_ATTEMPT_LOST", "{status:?}");
    assert_eq!(metadata["may_have_released"], "true");
}

/// A kept answer reaches its caller before its record is written: replica A's link to NATS is
/// cut after its claim, and the caller hears "released" all the same. A repeat on replica B
/// meanwhile finds the claim pending and waits; once the record lands it gets the answer,
/// replayed, and nothing is sent again.
#[tokio::test]
async fn a_repeat_while_the_answer_is_being_recorded_waits_for_it() {
    let Some(set) = ReplicaSet::builder().start().await else {
        return;
    };
    let (link, [replica_a, replica_b]) = one_replica_behind_a_link(&set, 1_000).await;
    let a = replica_a.client().await;
    let mut b = replica_b.client().await;
    let first = released_with_the_record_held(&set, &link, a, release_with_id("101", "held")).await;
    assert!(!first.replayed);

    let repeat = tokio::spawn(async move { b.release_call(release_with_id("101", "held")).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !repeat.is_finished(),
        "the repeat did not wait for the record"
    );
    link.restore();
    let repeat = repeat
        .await
        .unwrap()
        .expect("the repeat gets the answer once recorded")
        .into_inner();
    released(&repeat);
    assert!(repeat.replayed);
    assert_eq!(releases_sent(&set.sim), 1, "the repeat released again");
}

/// A kept answer whose record is never written (replica A cut off from NATS for good after its
/// claim): its caller still hears it, and a repeat on another replica, once the claim's
/// deadline passed unanswered, is told the earlier attempt was lost (outcome unknown, nothing
/// to retry), never given a second release.
#[tokio::test]
async fn an_answer_never_recorded_is_an_attempt_lost_never_repeated() {
    let Some(set) = ReplicaSet::builder().start().await else {
        return;
    };
    let (link, [replica_a, replica_b]) = one_replica_behind_a_link(&set, 1_000).await;
    let a = replica_a.client().await;
    let mut b = replica_b.client().await;
    let mut request = tonic::Request::new(release_with_id("101", "unrecorded"));
    request.set_timeout(Duration::from_secs(3));
    released_with_the_record_held(&set, &link, a, request).await;

    for _ in 0..2 {
        let mut repeat = tonic::Request::new(release_with_id("101", "unrecorded"));
        repeat.set_timeout(WAIT);
        expect_earlier_attempt_lost(&b.release_call(repeat).await.unwrap_err());
    }
    assert_eq!(
        releases_sent(&set.sim),
        1,
        "an unrecorded release was repeated"
    );
}

/// An answer that provably changed nothing (the gateway refused the connection, so nothing was
/// sent) is forgotten before its caller hears it: while replica A's link to NATS holds the
/// forgetting, its caller waits; once it is through, a repeat on another replica acts.
#[tokio::test]
async fn a_refusal_that_changed_nothing_is_forgotten_before_its_caller_hears_it() {
    let Some(set) = ReplicaSet::builder().start().await else {
        return;
    };
    let replica_b = set.spawn(&[]).await;
    set.sign_in_and_hand_over("101", &[&replica_b]).await;
    call_101(&set);
    // Replica A reads the session from the shared bucket; its gateway refuses connections, so
    // its release fails after its connect retries, having sent nothing.
    let link = NatsLink::start(set.nats[0].port).await;
    let refusing = format!("http://127.0.0.1:{}", common::nats::free_port());
    let replica_a = set.spawn_on(&refusing, &link.url(), &[], SERVING).await;
    let client = async_nats::connect(set.nats_url()).await.unwrap();
    let requests = async_nats::jetstream::new(client)
        .get_key_value("ccgw-requests")
        .await
        .expect("the replicas made the requests bucket");
    let mut claims = requests.watch_all().await.unwrap();

    let mut a = replica_a.client().await;
    let first =
        tokio::spawn(async move { a.release_call(release_with_id("101", "refused")).await });
    tokio::time::timeout(WAIT, claims.next())
        .await
        .expect("replica A claims the id")
        .unwrap()
        .unwrap();
    link.cut();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !first.is_finished(),
        "the caller heard a refusal before it was forgotten"
    );
    link.restore();
    first
        .await
        .unwrap()
        .expect_err("the gateway refused the connection");

    let mut b = replica_b.client().await;
    let repeat = b
        .release_call(release_with_id("101", "refused"))
        .await
        .expect("the repeat acts")
        .into_inner();
    released(&repeat);
    assert!(!repeat.replayed);
    assert_eq!(releases_sent(&set.sim), 1);
}
