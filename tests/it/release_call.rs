//! ReleaseCall end to end: simulator and facade on loopback, a generated tonic client.
use crate::common;

use std::time::Duration;

use ccgw_callcontrol::proto::{ReleaseCallRequest, ReleaseOutcome};
use ccgw_sim::{Fault, FaultRule, SimConfig};
use common::{expect_status, release_req, sim_config, spawn_app, spawn_app_with};
use tonic::Code;

fn fault(fault: Fault) -> FaultRule {
    FaultRule {
        fault,
        count: 1,
        method: None,
        path_contains: Some("/voicecall/".into()),
    }
}

#[tokio::test]
async fn release_hangs_up_the_talking_call_once_with_the_sessions_guid() {
    let app = spawn_app().await;
    let guid = app.sign_in("101").await;
    app.sim.place_call("101", "70093").unwrap();

    let answer = app.release(release_req("101")).await.unwrap();
    assert_eq!(answer.outcome(), ReleaseOutcome::Released);
    assert_eq!(answer.retcode, "0");
    assert_eq!(answer.message, "success");
    assert!(!answer.request_id.is_empty());

    let deletes: Vec<_> = app.deletes();
    assert_eq!(deletes.len(), 1, "{deletes:?}");
    assert_eq!(
        deletes[0].path,
        "/agentgateway/resource/voicecall/101/release"
    );
    assert_eq!(deletes[0].guid.as_deref(), Some(guid.as_str()));

    let again = app.release(release_req("101")).await.unwrap();
    assert_eq!(again.outcome(), ReleaseOutcome::NoActiveCall);
    assert_eq!(again.retcode, "200-017");

    let strict = ReleaseCallRequest {
        require_active_call: true,
        ..release_req("101")
    };
    let status = app.release(strict).await.unwrap_err();
    let details = expect_status(&status, Code::FailedPrecondition, "NO_ACTIVE_CALL");
    assert_eq!(details.error_info().unwrap().metadata["retcode"], "200-017");
    assert!(status.message().contains("200-017"), "{}", status.message());
}

#[tokio::test]
async fn dropcall_names_the_call() {
    let app = spawn_app().await;
    app.sign_in("102").await;
    let call_id = app.sim.place_call("102", "70093").unwrap();

    let wrong = ReleaseCallRequest {
        call_id: "1-1".into(),
        ..release_req("102")
    };
    let answer = app.release(wrong).await.unwrap();
    assert_eq!(answer.outcome(), ReleaseOutcome::NoActiveCall);
    assert_eq!(answer.retcode, "200-025");

    let right = ReleaseCallRequest {
        call_id: call_id.clone(),
        ..release_req("102")
    };
    assert_eq!(
        app.release(right).await.unwrap().outcome(),
        ReleaseOutcome::Released
    );
    let posts: Vec<_> = app
        .upstream()
        .into_iter()
        .map(|r| (r.method, r.path))
        .collect();
    assert_eq!(
        posts,
        [
            (
                "POST".to_owned(),
                "/agentgateway/resource/voicecall/102/dropcall/1-1".to_owned()
            ),
            (
                "POST".to_owned(),
                format!("/agentgateway/resource/voicecall/102/dropcall/{call_id}")
            ),
        ]
    );
}

#[tokio::test]
async fn legacy_release_path_is_a_switch() {
    let app = spawn_app_with(sim_config(), &["--legacy-release-path"]).await;
    app.sign_in("101").await;
    app.sim.place_call("101", "70093").unwrap();
    assert_eq!(
        app.release(release_req("101")).await.unwrap().outcome(),
        ReleaseOutcome::Released
    );
    let paths: Vec<_> = app
        .upstream()
        .into_iter()
        .map(|r| (r.method, r.path))
        .collect();
    assert_eq!(
        paths,
        [(
            "DELETE".to_owned(),
            "/agentgateway/resource/voicecall/101".to_owned()
        )]
    );
}

/// The documented table, written out independently of the code's: (retcode, code, reason,
/// RetryInfo). A release of the current call answered anything but a refusal that changed
/// nothing may have happened (or be happening), so it gets RELEASE_OUTCOME_UNKNOWN instead.
#[rustfmt::skip]
const RETCODE_EXPECTATIONS: &[(&str, Code, &str, bool)] = &[
    ("000-001", Code::FailedPrecondition, "WRONG_EVENT_METHOD", false),
    ("000-002", Code::InvalidArgument, "GATEWAY_INVALID_PARAMETER", false),
    ("000-003", Code::Unauthenticated, "GATEWAY_NO_RIGHT", false),
    ("000-004", Code::Unavailable, "AGENT_SWITCHING_OVER", true),
    ("000-005", Code::FailedPrecondition, "INSPECTOR_IS_AGENT", false),
    ("000-006", Code::InvalidArgument, "GATEWAY_MESSAGE_PARAMETER_ERROR", false),
    ("000-007", Code::Aborted, "DUPLICATE_REQUEST_IN_PROGRESS", false),
    ("100-001", Code::InvalidArgument, "SIGN_IN_PARAMETER_INVALID", false),
    ("100-002", Code::AlreadyExists, "AGENT_ALREADY_SIGNED_IN", false),
    ("100-003", Code::Unavailable, "SIGN_IN_RESOURCE_UNAVAILABLE", true),
    ("100-004", Code::Unauthenticated, "WRONG_CREDENTIALS", false),
    ("100-005", Code::InvalidArgument, "SIGN_OUT_PARAMETER_INVALID", false),
    ("100-006", Code::FailedPrecondition, "AGENT_NOT_SIGNED_IN", false),
    ("100-007", Code::Unavailable, "AGENT_OPERATION_FAILED", true),
    ("100-008", Code::FailedPrecondition, "AGENT_ALREADY_SIGNED_OUT", false),
    ("100-009", Code::FailedPrecondition, "AGENT_STATE_CHANGE_FAILED", false),
    ("100-010", Code::FailedPrecondition, "AGENT_STATE_ERROR", false),
    ("100-011", Code::InvalidArgument, "SIGN_IN_PARAMETER_INVALID", false),
    ("100-012", Code::FailedPrecondition, "WRONG_AGENT_TYPE", false),
    ("200-023", Code::FailedPrecondition, "NUMBER_CANNOT_BE_RELEASED", false),
    ("200-024", Code::FailedPrecondition, "NUMBER_CANNOT_BE_RELEASED", false),
    ("200-204", Code::FailedPrecondition, "NUMBER_NOT_IN_CALL", false),
    ("321-999", Code::Unknown, "GATEWAY_RETCODE_UNKNOWN", false),
];

/// The only retcodes after which a release of the current call provably changed nothing: the
/// answer is forgotten, so a repeat is sent. After any other, the call may have been hung up.
const FORGOTTEN_RETCODES: [&str; 3] = ["100-006", "000-003", "000-002"];

#[tokio::test]
async fn every_failure_retcode_maps_to_its_documented_status() {
    let app = spawn_app().await;
    for (n, &(retcode, code, reason, retry)) in RETCODE_EXPECTATIONS.iter().enumerate() {
        for dropcall in [false, true] {
            // A fresh session each round: 100-006 / 000-003 make the facade forget it.
            app.sim.clear_faults();
            force_sign_in(&app, "101").await;
            let message = format!("simulated {retcode}");
            app.sim.push_fault(fault(Fault::Retcode {
                retcode: retcode.into(),
                message: message.clone(),
            }));
            let request_id = format!("table-{n}-{dropcall}");
            let request = ReleaseCallRequest {
                call_id: if dropcall {
                    "1700000000-1".into()
                } else {
                    String::new()
                },
                request_id: request_id.clone(),
                ..release_req("101")
            };
            let status = app.release(request.clone()).await.unwrap_err();
            let outcome_unknown = !dropcall && !FORGOTTEN_RETCODES.contains(&retcode);
            let details = if outcome_unknown {
                expect_outcome_unknown(&status, reason)
            } else {
                expect_status(&status, code, reason)
            };
            let metadata = &details.error_info().unwrap().metadata;
            assert_eq!(metadata["retcode"], retcode);
            assert_eq!(metadata["agent_id"], "101");
            assert_eq!(metadata["message"], message);
            assert_eq!(details.request_info().unwrap().request_id, request_id);
            assert!(
                status.message().contains(retcode) && status.message().contains(&message),
                "{}",
                status.message()
            );
            assert_eq!(
                details.retry_info().is_some(),
                retry && !outcome_unknown,
                "{retcode} dropcall={dropcall}: {status:?}"
            );
            assert_eq!(
                metadata.get("may_have_released").map(String::as_str),
                outcome_unknown.then_some("true"),
                "{retcode} dropcall={dropcall}"
            );
            let sent = app.upstream().len();
            if outcome_unknown {
                // Its request_id replays that answer; nothing is sent again.
                let replayed = app.release(request).await.unwrap_err();
                expect_outcome_unknown(&replayed, reason);
                assert_eq!(app.upstream().len(), sent, "{retcode}: the retry was sent");
            } else if !dropcall {
                // Forgotten: the repeat (with a fresh session) reaches the gateway.
                force_sign_in(&app, "101").await;
                let repeated = app.release(request).await.unwrap();
                assert_eq!(repeated.outcome(), ReleaseOutcome::NoActiveCall);
                assert!(!repeated.replayed);
                assert_eq!(app.upstream().len(), sent + 1, "{retcode}: not forgotten");
            }
        }
    }
}

/// Signs the agent in again (forcelogin): the facade holds a session, whatever the last answer
/// made it drop.
async fn force_sign_in(app: &common::TestApp, agent: &str) {
    let answer = app
        .api
        .sessions()
        .sign_in(common::agent_id(agent), "s", "1", true, common::deadline())
        .await
        .unwrap();
    assert!(answer.is_ok(), "{answer:?}");
}

/// Asserts the one answer to a release of the current call that may have happened: UNKNOWN /
/// RELEASE_OUTCOME_UNKNOWN, `may_have_released`, the failure as `cause`, and no RetryInfo.
fn expect_outcome_unknown(status: &tonic::Status, cause: &str) -> tonic_types::ErrorDetails {
    let details = expect_status(status, Code::Unknown, "RELEASE_OUTCOME_UNKNOWN");
    let metadata = &details.error_info().unwrap().metadata;
    assert_eq!(metadata["may_have_released"], "true", "{status:?}");
    assert_eq!(metadata["cause"], cause, "{status:?}");
    assert!(details.retry_info().is_none(), "{status:?}");
    assert!(
        status.message().contains("do not repeat"),
        "{}",
        status.message()
    );
    details
}

/// A retcode the reference does not document may mean the call was hung up: a release of the
/// current call answered 200-099 or 900-001 is outcome unknown, and a repeat with its
/// request_id replays that answer: one DELETE each, and the call stays up. (Before: UNKNOWN
/// GATEWAY_RETCODE_UNKNOWN, forgotten, and the repeat sent a second DELETE.)
#[tokio::test]
async fn an_undocumented_retcode_binds_the_request_id_so_a_repeat_sends_no_second_delete() {
    let app = spawn_app().await;
    app.sign_in("101").await;
    let call = app.sim.place_call("101", "70093").unwrap();
    for (n, retcode) in ["200-099", "900-001"].into_iter().enumerate() {
        app.sim.push_fault(fault(Fault::Retcode {
            retcode: retcode.into(),
            message: "something the reference does not document".into(),
        }));
        let request = ReleaseCallRequest {
            request_id: format!("undocumented-{retcode}"),
            ..release_req("101")
        };
        for attempt in ["first", "repeat"] {
            let status = app.release(request.clone()).await.unwrap_err();
            let details = expect_outcome_unknown(&status, "GATEWAY_RETCODE_UNKNOWN");
            assert_eq!(details.error_info().unwrap().metadata["retcode"], retcode);
            assert_eq!(app.deletes().len(), n + 1, "{retcode}, {attempt}");
        }
    }
    assert_eq!(app.sim.agent("101").unwrap().call_id, Some(call));
}

/// Any retcode string at all (documented, shaped like one, empty, huge, not ASCII), answered to
/// a release of the current call through the real facade: unless it is one of the refusals
/// that changed nothing, the answer offers no retry and a repeat of its request_id sends
/// nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whatever_the_retcode_a_repeat_sends_nothing_unless_it_provably_changed_nothing() {
    use proptest::{prelude::*, test_runner::TestRunner};
    let app = std::sync::Arc::new(spawn_app().await);
    let documented = [
        "0", "000-001", "000-002", "000-003", "000-004", "000-005", "000-006", "000-007",
        "100-001", "100-002", "100-003", "100-004", "100-005", "100-006", "100-007", "100-008",
        "100-009", "100-010", "100-011", "100-012", "200-017", "200-023", "200-024", "200-025",
        "200-204",
    ]
    .map(str::to_owned)
    .to_vec();
    let retcodes = prop_oneof![
        any::<String>(),
        "[0-9]{3}-[0-9]{3}",
        "[ ]{0,2}[0-9]{0,4}-?[0-9]{0,4}[ ]{0,2}",
        proptest::sample::select(documented),
    ];
    let runtime = tokio::runtime::Handle::current();
    let checked = app.clone();
    tokio::task::spawn_blocking(move || {
        let app = checked;
        let cases = std::sync::atomic::AtomicUsize::new(0);
        let mut runner = TestRunner::new(ProptestConfig {
            failure_persistence: None,
            ..ProptestConfig::with_cases(48)
        });
        runner.run(&retcodes, |retcode| {
            let n = cases.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            runtime.block_on(async {
                if app.guid_of("101").is_none() {
                    force_sign_in(&app, "101").await;
                }
                app.sim.clear_faults();
                app.sim.push_fault(fault(Fault::Retcode {
                    retcode: retcode.clone(),
                    message: "simulated".into(),
                }));
                let request = ReleaseCallRequest {
                    request_id: format!("any-retcode-{n}"),
                    ..release_req("101")
                };
                let first = app.release(request.clone()).await;
                let sent = app.deletes().len();
                if FORGOTTEN_RETCODES.contains(&retcode.trim()) {
                    if app.guid_of("101").is_none() {
                        force_sign_in(&app, "101").await;
                    }
                    let _ = app.release(request).await;
                    prop_assert_eq!(app.deletes().len(), sent + 1, "forgotten: {:?}", retcode);
                    return Ok(());
                }
                let repeat = app.release(request).await;
                prop_assert_eq!(app.deletes().len(), sent, "repeat sent for {:?}", retcode);
                for answer in [first, repeat] {
                    if let Err(status) = answer {
                        prop_assert_eq!(
                            status.code(),
                            Code::Unknown,
                            "{:?}: {:?}",
                            retcode,
                            status
                        );
                        expect_outcome_unknown(
                            &status,
                            common::error_metadata(&status)["cause"].as_str(),
                        );
                    }
                }
                Ok(())
            })
        })
    })
    .await
    .unwrap()
    .unwrap_or_else(|failure| panic!("{failure}"));
}

#[tokio::test]
async fn a_lost_answer_binds_the_request_id_so_a_retry_cannot_hang_up_the_next_call() {
    let app = spawn_app().await;
    app.sign_in("101").await;
    app.sim.place_call("101", "70093").unwrap();
    app.sim.push_fault(fault(Fault::LoseAnswer));
    let request = ReleaseCallRequest {
        request_id: "lost-answer-1".into(),
        ..release_req("101")
    };
    let status = app.release(request.clone()).await.unwrap_err();
    expect_outcome_unknown(&status, "GATEWAY_CONNECTION_LOST");

    // The gateway did release; the customer calls back; the client retries with the same id.
    let next_call = app.sim.place_call("101", "70094").unwrap();
    let status = app.release(request).await.unwrap_err();
    expect_outcome_unknown(&status, "GATEWAY_CONNECTION_LOST");
    let deletes = app.deletes().len();
    assert_eq!(deletes, 1, "the retry reached the gateway");
    let view = sim_agent_view(&app, "101").await;
    assert_eq!(
        view["call_id"],
        next_call.as_str(),
        "the next call was hung up"
    );
}

/// A client that lost its answer repeats its request_id. However many
/// other ids came since, the answer to a release of the current call is kept for the whole
/// window (new ids are refused instead, with nothing sent), while a dropcall's settled answer
/// makes room.
#[tokio::test]
async fn answers_to_current_call_releases_outlive_cache_pressure() {
    // The one caller's share is more than the cache: the cache's pressure is what this is about.
    let app = spawn_app_with(
        sim_config(),
        &[
            "--idempotency-capacity",
            "2",
            "--max-request-ids-per-caller",
            "3",
        ],
    )
    .await;
    app.sign_in("101").await;
    app.sim.place_call("101", "70093").unwrap();
    let with_id = |id: &str, call_id: &str| ReleaseCallRequest {
        request_id: id.into(),
        call_id: call_id.into(),
        ..release_req("101")
    };
    let first = app.release(with_id("first", "")).await.unwrap();
    assert_eq!(first.outcome(), ReleaseOutcome::Released);
    let dropped = app.release(with_id("drop", "1700000000-1")).await.unwrap();
    assert_eq!(dropped.outcome(), ReleaseOutcome::NoActiveCall);
    // Room for "second" is made by forgetting the dropcall's answer.
    let second = app.release(with_id("second", "")).await.unwrap();
    assert_eq!(second.outcome(), ReleaseOutcome::NoActiveCall);
    let sent = app.upstream().len();
    let status = app.release(with_id("third", "")).await.unwrap_err();
    expect_status(
        &status,
        Code::ResourceExhausted,
        "TOO_MANY_PENDING_RELEASES",
    );
    assert_eq!(
        app.upstream().len(),
        sent,
        "a refused id reached the gateway"
    );

    // The customer calls back; the first client repeats its request: the same answer, and the
    // next call stays up.
    let next_call = app.sim.place_call("101", "70094").unwrap();
    let repeated = app.release(with_id("first", "")).await.unwrap();
    assert!(repeated.replayed);
    assert_eq!(repeated.outcome(), ReleaseOutcome::Released);
    assert_eq!(app.upstream().len(), sent);
    assert_eq!(
        app.sim.agent("101").unwrap().call_id.as_deref(),
        Some(next_call.as_str())
    );
}

#[tokio::test]
async fn failures_that_changed_nothing_free_the_request_id() {
    let app = spawn_app().await;
    let request = ReleaseCallRequest {
        request_id: "no-session-yet".into(),
        ..release_req("102")
    };
    let status = app.release(request.clone()).await.unwrap_err();
    expect_status(&status, Code::FailedPrecondition, "NO_SESSION");

    app.sign_in("102").await;
    app.sim.place_call("102", "70093").unwrap();
    let answer = app.release(request).await.unwrap();
    assert_eq!(answer.outcome(), ReleaseOutcome::Released);
    assert!(!answer.replayed);
}

#[tokio::test]
async fn dropcall_is_retried_after_a_lost_connection() {
    let app = spawn_app().await;
    app.sign_in("101").await;
    let call_id = app.sim.place_call("101", "70093").unwrap();
    app.sim.push_fault(fault(Fault::Drop));
    let request = ReleaseCallRequest {
        call_id,
        ..release_req("101")
    };
    assert_eq!(
        app.release(request).await.unwrap().outcome(),
        ReleaseOutcome::Released
    );
    assert_eq!(app.upstream().len(), 2);
}

#[tokio::test]
async fn bad_input_is_rejected_before_the_gateway() {
    let app = spawn_app().await;
    app.sign_in("101").await;
    app.sim.clear_requests();
    let cases: &[(ReleaseCallRequest, &str)] = &[
        (release_req(""), "agent_id"),
        (release_req("abc"), "agent_id"),
        (release_req("100"), "agent_id"),
        (release_req("60000"), "agent_id"),
        (release_req("0101"), "agent_id"),
        (release_req("101/../102"), "agent_id"),
        (
            ReleaseCallRequest {
                call_id: "../../onlineagent/101/logout".into(),
                ..release_req("101")
            },
            "call_id",
        ),
        (
            ReleaseCallRequest {
                call_id: "1%2F2".into(),
                ..release_req("101")
            },
            "call_id",
        ),
        (
            ReleaseCallRequest {
                request_id: "x".repeat(129),
                ..release_req("101")
            },
            "request_id",
        ),
        (
            ReleaseCallRequest {
                request_id: "with space".into(),
                ..release_req("101")
            },
            "request_id",
        ),
    ];
    for (request, field) in cases {
        let status = app.release(request.clone()).await.unwrap_err();
        let details = expect_status(&status, Code::InvalidArgument, "INVALID_ARGUMENT");
        let violations = &details.bad_request().expect("BadRequest").field_violations;
        assert_eq!(violations.len(), 1, "{request:?}: {violations:?}");
        assert_eq!(violations[0].field, *field);
        assert!(status.message().contains(field), "{}", status.message());
    }

    let mut bad_guid = tonic::Request::new(release_req("101"));
    bad_guid
        .metadata_mut()
        .insert("x-ccgw-guid", "has;semicolon".parse().unwrap());
    let status = app.release_with(bad_guid).await.unwrap_err();
    let details = expect_status(&status, Code::InvalidArgument, "INVALID_ARGUMENT");
    assert_eq!(
        details.bad_request().unwrap().field_violations[0].field,
        "x-ccgw-guid"
    );
    assert!(
        !status.message().contains("has;semicolon"),
        "echoed a credential: {}",
        status.message()
    );

    let status = app.release(release_req("555")).await.unwrap_err();
    expect_status(&status, Code::FailedPrecondition, "NO_SESSION");
    assert!(
        status.message().contains("x-ccgw-guid"),
        "{}",
        status.message()
    );

    let reached = app.sim.requests();
    assert!(
        reached.is_empty(),
        "bad input reached the gateway: {reached:?}"
    );
}

#[tokio::test]
async fn a_session_handed_over_in_metadata_is_used_and_kept() {
    let app = spawn_app_with(
        SimConfig {
            require_sticky_cookie: true,
            ..sim_config()
        },
        &[],
    )
    .await;
    // An agent desktop signs in by itself; the facade only learns the session from the caller.
    let desktop = reqwest_client();
    let signin = desktop
        .put(format!(
            "http://{}/agentgateway/resource/onlineagent/103",
            app.sim_addr
        ))
        .json(&serde_json::json!({"password": "pw", "phonenum": "88003"}))
        .send()
        .await
        .unwrap();
    let set_guid = signin.headers()["set-guid"].to_str().unwrap().to_owned();
    let cookie = signin.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    let guid = set_guid.trim_start_matches("JSESSIONID=").to_owned();
    app.sim.place_call("103", "70093").unwrap();

    // Without the load balancer's cookie the sticky gateway does not know the session.
    let mut request = tonic::Request::new(release_req("103"));
    request
        .metadata_mut()
        .insert("x-ccgw-guid", set_guid.parse().unwrap());
    let status = app.release_with(request).await.unwrap_err();
    expect_status(&status, Code::FailedPrecondition, "AGENT_NOT_SIGNED_IN");

    let mut request = tonic::Request::new(release_req("103"));
    request
        .metadata_mut()
        .insert("x-ccgw-guid", guid.parse().unwrap());
    request
        .metadata_mut()
        .insert("x-ccgw-cookie", cookie.parse().unwrap());
    let answer = app.release_with(request).await.unwrap();
    assert_eq!(answer.outcome(), ReleaseOutcome::Released);
    let last = app.upstream().pop().unwrap();
    assert_eq!(last.guid.as_deref(), Some(guid.as_str()));
    assert_eq!(last.cookie.as_deref(), Some(cookie.as_str()));

    // The registry kept it: no metadata needed next time.
    assert_eq!(
        app.release(release_req("103")).await.unwrap().outcome(),
        ReleaseOutcome::NoActiveCall
    );
}

#[tokio::test]
async fn a_rotated_guid_is_picked_up_from_the_gateways_answer() {
    let app = spawn_app_with(common::sim_refusing_rotated_guids(), &[]).await;
    let first = app.sign_in("101").await;
    app.sim.place_call("101", "70093").unwrap();
    app.sim.rotate_guid("101").unwrap();
    // Dynamic authentication hands the new Guid out on an event-poll answer.
    let poll = app
        .api
        .sessions()
        .send(
            common::agent_id("101"),
            &ccgw_callcontrol::gateway::SessionOperation::PollEvents {
                retire_connection: false,
            },
            common::deadline(),
            None,
            None,
        )
        .await
        .unwrap();
    assert!(poll.0.is_ok(), "{:?}", poll.0);
    let second = app.guid_of("101").unwrap();
    assert_ne!(first, second, "Set-GUID was not absorbed");

    assert_eq!(
        app.release(release_req("101")).await.unwrap().outcome(),
        ReleaseOutcome::Released
    );
    let delete = app.deletes().into_iter().next().unwrap();
    assert_eq!(delete.guid.as_deref(), Some(second.as_str()));
}

#[tokio::test]
async fn a_repeated_request_id_does_not_release_twice() {
    let app = spawn_app().await;
    app.sign_in("101").await;
    app.sim.place_call("101", "70093").unwrap();
    let request = ReleaseCallRequest {
        request_id: "8f14e45f-ceea-467f-a0e6-1a2b3c4d5e6f".into(),
        ..release_req("101")
    };

    // Concurrent duplicates wait for the first.
    let answers =
        futures_util::future::join_all((0..5).map(|_| app.release(request.clone()))).await;
    let answers: Vec<_> = answers.into_iter().map(Result::unwrap).collect();
    assert!(
        answers
            .iter()
            .all(|a| a.outcome() == ReleaseOutcome::Released),
        "{answers:?}"
    );
    assert_eq!(answers.iter().filter(|a| !a.replayed).count(), 1);

    // A later duplicate, with a new call up, still does not touch it.
    let second_call = app.sim.place_call("101", "70094").unwrap();
    let replay = app.release(request.clone()).await.unwrap();
    assert!(replay.replayed);
    assert_eq!(replay.outcome(), ReleaseOutcome::Released);
    let deletes = app.deletes().len();
    assert_eq!(deletes, 1);
    let view = sim_agent_view(&app, "101").await;
    assert_eq!(view["call_id"], second_call.as_str());

    let reused = ReleaseCallRequest {
        agent_id: "102".into(),
        ..request
    };
    let status = app.release(reused).await.unwrap_err();
    expect_status(&status, Code::InvalidArgument, "REQUEST_ID_REUSED");
}

/// The deadline that ends the RPC is the facade's own (--request-timeout-ms), far inside the
/// client's grpc-timeout (which tonic enforces with CANCELLED), so the two never race: the
/// assertion is about what the facade answers, not about how fast.
#[tokio::test]
async fn a_hanging_gateway_ends_the_rpc_at_its_deadline() {
    let app = spawn_app_with(sim_config(), &["--request-timeout-ms", "500"]).await;
    app.sign_in("101").await;
    app.sim.push_fault(fault(Fault::Latency { ms: 60_000 }));
    let mut request = tonic::Request::new(release_req("101"));
    request.set_timeout(Duration::from_secs(20));
    let status = app.release_with(request).await.unwrap_err();
    expect_outcome_unknown(&status, "GATEWAY_TIMEOUT");
    assert_eq!(
        app.upstream().len(),
        1,
        "a release of the current call was retried"
    );

    // A dropcall names its call: the same timeout keeps its own code.
    app.sim.push_fault(fault(Fault::Latency { ms: 60_000 }));
    let request = ReleaseCallRequest {
        call_id: "1700000000-1".into(),
        ..release_req("101")
    };
    let status = app.release(request).await.unwrap_err();
    expect_status(&status, Code::DeadlineExceeded, "GATEWAY_TIMEOUT");
}

#[tokio::test]
async fn a_deadline_too_short_to_reach_the_gateway_sends_nothing() {
    // The too-short budget is the facade's own cap, while the client's grpc-timeout (which
    // tonic enforces with CANCELLED) is seconds away: no race between the two (a client budget
    // of 5 ms would lose that race on a loaded machine).
    let app = spawn_app_with(sim_config(), &["--request-timeout-ms", "10"]).await;
    app.sign_in("101").await;
    app.sim.place_call("101", "70093").unwrap();
    let status = app.release(release_req("101")).await.unwrap_err();
    let details = expect_status(&status, Code::DeadlineExceeded, "DEADLINE_TOO_SHORT");
    assert!(!details
        .error_info()
        .unwrap()
        .metadata
        .contains_key("may_have_released"));
    assert!(app.upstream().is_empty(), "a doomed release was sent");
}

#[tokio::test]
async fn garbage_and_huge_answers_are_internal_errors_read_within_bounds() {
    let app = spawn_app().await;
    app.sign_in("101").await;
    app.sim.push_fault(fault(Fault::Malformed));
    let status = app.release(release_req("101")).await.unwrap_err();
    expect_outcome_unknown(&status, "GATEWAY_MALFORMED_ANSWER");

    const HUGE: u64 = 512 * 1024 * 1024;
    for _ in 0..3 {
        app.sim.push_fault(fault(Fault::Oversized { bytes: HUGE }));
        let dropcall = ReleaseCallRequest {
            call_id: "1700000000-1".into(),
            ..release_req("101")
        };
        let status = app.release(dropcall).await.unwrap_err();
        expect_status(&status, Code::Internal, "GATEWAY_ANSWER_TOO_LARGE");
    }
    // The facade stops reading at its limit (64 KiB): the simulator could push little more
    // than socket buffers hold before the connection was dropped.
    let pulled = app.sim.oversized_bytes_sent();
    assert!(
        pulled < 3 * 32 * 1024 * 1024,
        "facade read {pulled} bytes of {} offered",
        3 * HUGE
    );
}

#[tokio::test]
async fn http_errors_are_unavailable_and_only_dropcall_retries_them() {
    let app = spawn_app().await;
    app.sign_in("101").await;
    app.sim.push_fault(fault(Fault::HttpStatus { status: 503 }));
    let status = app.release(release_req("101")).await.unwrap_err();
    let details = expect_outcome_unknown(&status, "GATEWAY_HTTP_ERROR");
    assert_eq!(details.error_info().unwrap().metadata["http_status"], "503");
    assert_eq!(app.upstream().len(), 1);

    // 429 is a refusal: nothing happened, and the client may retry.
    app.sim.push_fault(fault(Fault::HttpStatus { status: 429 }));
    let status = app.release(release_req("101")).await.unwrap_err();
    let details = expect_status(&status, Code::Unavailable, "GATEWAY_HTTP_ERROR");
    assert!(details.retry_info().is_some());

    let call_id = app.sim.place_call("101", "70093").unwrap();
    app.sim.clear_requests();
    app.sim.push_fault(fault(Fault::HttpStatus { status: 502 }));
    let request = ReleaseCallRequest {
        call_id,
        ..release_req("101")
    };
    assert_eq!(
        app.release(request).await.unwrap().outcome(),
        ReleaseOutcome::Released
    );
    assert_eq!(app.upstream().len(), 2, "dropcall should be retried once");

    app.sim.push_fault(fault(Fault::HttpStatus { status: 404 }));
    let status = app.release(release_req("101")).await.unwrap_err();
    expect_status(&status, Code::Unimplemented, "GATEWAY_PATH_NOT_FOUND");
}

#[tokio::test]
async fn a_dropped_connection_is_unavailable_and_never_retried_for_the_current_call() {
    let app = spawn_app().await;
    app.sign_in("101").await;
    app.sim.place_call("101", "70093").unwrap();
    app.sim.push_fault(fault(Fault::Drop));
    let status = app.release(release_req("101")).await.unwrap_err();
    expect_outcome_unknown(&status, "GATEWAY_CONNECTION_LOST");
    assert_eq!(app.upstream().len(), 1);
}

/// A second facade on `gateway_url`, with a session for agent 101.
async fn facade_with_session(app: &common::TestApp, gateway_url: &str) -> common::TestApp {
    let facade = common::spawn_facade(app.sim.clone(), app.sim_addr, gateway_url, &[], None).await;
    let session = ccgw_callcontrol::gateway::Session {
        guid: ccgw_callcontrol::gateway::Guid::parse("g", "abc").unwrap(),
        cookies: Default::default(),
    };
    facade
        .api
        .sessions()
        .registry()
        .offer(common::agent_id("101"), session)
        .unwrap();
    facade
}

#[tokio::test]
async fn unreachable_gateways_are_unavailable_with_retry_info() {
    // A port nobody listens on: connect refused, so nothing was sent.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_addr = closed.local_addr().unwrap();
    drop(closed);
    let app = spawn_app().await;
    let refused = facade_with_session(&app, &format!("http://{closed_addr}")).await;
    let status = refused.release(release_req("101")).await.unwrap_err();
    let details = expect_status(&status, Code::Unavailable, "GATEWAY_UNREACHABLE");
    assert!(details.retry_info().is_some());
    assert!(
        !status.message().contains(&closed_addr.to_string()),
        "gateway address leaked: {}",
        status.message()
    );

    // TLS towards a plain-HTTP server fails in the handshake: also nothing sent.
    let tls = facade_with_session(&app, &format!("https://{}", app.sim_addr)).await;
    let status = tls.release(release_req("101")).await.unwrap_err();
    expect_status(&status, Code::Unavailable, "GATEWAY_UNREACHABLE");
}

#[tokio::test]
async fn a_signed_out_agent_loses_its_session() {
    let app = spawn_app().await;
    app.sign_in("101").await;
    app.sim.force_signout("101").unwrap();
    let status = app.release(release_req("101")).await.unwrap_err();
    expect_status(&status, Code::FailedPrecondition, "AGENT_NOT_SIGNED_IN");
    assert!(app.guid_of("101").is_none(), "a dead session was kept");
    let status = app.release(release_req("101")).await.unwrap_err();
    expect_status(&status, Code::FailedPrecondition, "NO_SESSION");
}

/// The simulator's control-API view of an agent.
async fn sim_agent_view(app: &common::TestApp, agent: &str) -> serde_json::Value {
    reqwest_client()
        .get(format!("http://{}/sim/agents/{agent}", app.sim_addr))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

fn reqwest_client() -> reqwest::Client {
    ccgw_callcontrol::install_crypto_provider();
    reqwest::Client::new()
}
