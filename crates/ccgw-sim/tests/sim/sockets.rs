//! The CC-Gateway simulator over real sockets, checked against the wire behaviour its crate
//! documentation describes.

use std::time::Duration;

use ccgw_sim::{AgentView, AuthMode, Fault, FaultRule, SimConfig, SimError, Simulator};
use reqwest::{Method, Response};
use serde_json::{json, Value};
use tokio::time::{timeout, Instant};

use crate::BOUND;

const GW: &str = "/agentgateway/resource";
/// A long-poll wait no test waits out: a poll that answers within [`BOUND`] was woken.
const LONG_POLL_WAIT: Duration = Duration::from_secs(60);

struct Harness {
    base: String,
    sim: Simulator,
    client: reqwest::Client,
    _stop: tokio::sync::oneshot::Sender<()>,
}

/// A session as a client holds it.
#[derive(Clone)]
struct Session {
    guid: String,
    cookie: String,
}

fn quick() -> SimConfig {
    SimConfig {
        poll_wait: Duration::from_millis(200),
        ..SimConfig::default()
    }
}

async fn start(config: SimConfig) -> Harness {
    // The workspace builds reqwest without a crypto provider of its own (the facade installs
    // ring for its whole process); a reqwest client cannot be built without one, even for
    // plain HTTP.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let sim = Simulator::new(config);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(sim.clone().serve(listener, async move {
        let _ = stopped.await;
    }));
    let client = reqwest::Client::builder().timeout(BOUND).build().unwrap();
    Harness {
        base,
        sim,
        client,
        _stop: stop,
    }
}

impl Harness {
    async fn send(&self, method: Method, path: &str, s: Option<&Session>) -> Response {
        let mut req = self
            .client
            .request(method, format!("{}{GW}{path}", self.base))
            .header("Content-Type", "application/json; charset=UTF-8");
        if let Some(s) = s {
            req = req.header("guid", &s.guid).header("Cookie", &s.cookie);
        }
        timeout(BOUND, req.send()).await.unwrap().unwrap()
    }

    async fn call(&self, method: Method, path: &str, s: Option<&Session>) -> Value {
        json_of(self.send(method, path, s).await).await
    }

    async fn sign_in_raw(&self, agent: &str, path_suffix: &str, body: Value) -> Response {
        let req = self
            .client
            .put(format!(
                "{}{GW}/onlineagent/{agent}{path_suffix}",
                self.base
            ))
            .json(&body);
        timeout(BOUND, req.send()).await.unwrap().unwrap()
    }

    async fn sign_in(&self, agent: &str) -> Session {
        let resp = self
            .sign_in_raw(agent, "", json!({"password": "pw", "phonenum": "88001"}))
            .await;
        session_of(resp).await
    }

    /// One poll: (new Guid from Set-GUID, body).
    async fn poll(&self, agent: &str, s: &Session) -> (Option<String>, Value) {
        let resp = self
            .send(Method::GET, &format!("/agentevent/{agent}"), Some(s))
            .await;
        let set_guid = set_guid(&resp);
        (set_guid, json_of(resp).await)
    }

    async fn poll_event(&self, agent: &str, s: &Session) -> Value {
        let (_, body) = self.poll(agent, s).await;
        assert_eq!(body["retcode"], "0", "{body}");
        body["event"].clone()
    }

    async fn control(&self, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut req = self
            .client
            .request(method, format!("{}/sim{path}", self.base));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = timeout(BOUND, req.send()).await.unwrap().unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap())
    }
}

async fn json_of(resp: Response) -> Value {
    assert_eq!(resp.status(), 200);
    timeout(BOUND, resp.json()).await.unwrap().unwrap()
}

fn set_guid(resp: &Response) -> Option<String> {
    let v = resp.headers().get("Set-GUID")?.to_str().unwrap();
    Some(
        v.strip_prefix("JSESSIONID=")
            .expect("JSESSIONID= prefix")
            .to_owned(),
    )
}

async fn session_of(resp: Response) -> Session {
    let guid = set_guid(&resp).expect("Set-GUID on sign-in");
    let cookie = resp
        .headers()
        .get("set-cookie")
        .expect("sticky cookie")
        .to_str()
        .unwrap()
        .to_owned();
    assert!(cookie.contains("Path=/"), "{cookie}");
    let body = json_of(resp).await;
    assert_eq!(body["retcode"], "0", "{body}");
    Session {
        guid,
        cookie: cookie.split(';').next().unwrap().to_owned(),
    }
}

fn retcode(v: &Value) -> &str {
    v["retcode"].as_str().unwrap()
}

#[tokio::test]
async fn sign_in_answers_guid_and_sticky_cookie() {
    let h = start(quick()).await;
    let s = h.sign_in("101").await;
    assert!(s.guid.ends_with(".AgentGateway0"), "{}", s.guid);
    assert_eq!(s.guid.len(), 36 + ".AgentGateway0".len());

    let bad = json!({"password": "pw"});
    for agent in ["100", "abc", "0101", "1000000"] {
        let body = json_of(h.sign_in_raw(agent, "", bad.clone()).await).await;
        assert_eq!(retcode(&body), "000-002", "{agent}");
    }
    let body = json_of(h.sign_in_raw("102", "", json!({"phonenum": "1"})).await).await;
    assert_eq!(retcode(&body), "100-001");
    let body = json_of(h.sign_in_raw("102", "", json!({"password": ""})).await).await;
    assert_eq!(retcode(&body), "100-001");
}

#[tokio::test]
async fn configured_password_is_checked() {
    let h = start(SimConfig {
        password: Some("secret".into()),
        ..quick()
    })
    .await;
    let body = json_of(h.sign_in_raw("101", "", json!({"password": "nope"})).await).await;
    assert_eq!(retcode(&body), "100-004");
    let ok = h
        .sign_in_raw("101", "", json!({"password": "secret"}))
        .await;
    session_of(ok).await;
}

#[tokio::test]
async fn already_signed_in_then_forcelogin_replaces_the_session() {
    let h = start(quick()).await;
    let old = h.sign_in("101").await;
    let again = json_of(h.sign_in_raw("101", "", json!({"password": "pw"})).await).await;
    assert_eq!(retcode(&again), "100-002");

    let resp = h
        .sign_in_raw("101", "/forcelogin", json!({"password": "pw"}))
        .await;
    let new = session_of(resp).await;
    assert_ne!(new.guid, old.guid);
    assert_eq!(retcode(&h.poll("101", &old).await.1), "000-003");
    assert_eq!(retcode(&h.poll("101", &new).await.1), "0");
}

#[tokio::test]
async fn empty_poll_waits_then_answers_the_exact_empty_body() {
    let h = start(quick()).await;
    let s = h.sign_in("101").await;
    let started = Instant::now();
    let resp = h
        .send(Method::GET, "/agentevent/101?calldata=x", Some(&s))
        .await;
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    assert_eq!(text, r#"{"message":"","retcode":"0"}"#);
    assert!(started.elapsed() >= Duration::from_millis(200));
}

#[tokio::test]
async fn call_events_then_release_events() {
    let h = start(quick()).await;
    let s = h.sign_in("101").await;
    let callid = h.sim.place_call("101", "70093").unwrap();
    assert!(h.sim.place_call("101", "70094").is_err(), "busy agent");

    let ringing = h.poll_event("101", &s).await;
    assert_eq!(ringing["eventType"], "AgentEvent_Ringing");
    assert_eq!(ringing["workNo"], "101");
    assert_eq!(ringing["content"]["callid"], callid.as_str());
    assert_eq!(ringing["content"]["caller"], "70093");
    assert_eq!(ringing["content"]["called"], "88001");
    assert!(ringing["eventGenTime"].as_u64().unwrap() > 1_600_000_000_000);
    let talking = h.poll_event("101", &s).await;
    assert_eq!(talking["eventType"], "AgentEvent_Talking");
    assert_eq!(talking["content"]["mediaAbility"], "1");

    let ok = h
        .call(Method::DELETE, "/voicecall/101/release", Some(&s))
        .await;
    assert_eq!(
        ok,
        json!({"message": "success", "retcode": "0", "result": {}})
    );
    let mut types = Vec::new();
    for _ in 0..4 {
        let ev = h.poll_event("101", &s).await;
        match ev["eventType"].as_str().unwrap() {
            "AgentEvent_Call_Release" => assert_eq!(ev["content"], callid.as_str()),
            "AgentEvent_Customer_Release" => {
                assert_eq!(ev["content"], json!({"callid": callid, "number": "70093"}))
            }
            "AgentOther_PhoneRelease" => assert_eq!(ev["content"], json!({"phoneState": 2})),
            _ => {}
        }
        types.push(ev["eventType"].as_str().unwrap().to_owned());
    }
    assert_eq!(
        types,
        [
            "AgentEvent_Call_Release",
            "AgentEvent_Customer_Release",
            "AgentOther_PhoneRelease",
            "AgentState_Ready"
        ]
    );
    let again = h
        .call(Method::DELETE, "/voicecall/101/release", Some(&s))
        .await;
    assert_eq!(retcode(&again), "200-017");

    // The legacy path releases too.
    h.sim.place_call("101", "70093").unwrap();
    let ok = h.call(Method::DELETE, "/voicecall/101", Some(&s)).await;
    assert_eq!(retcode(&ok), "0");
}

#[tokio::test]
async fn dropcall_needs_the_current_call_id_and_customer_hangup_releases() {
    let h = start(quick()).await;
    let s = h.sign_in("101").await;
    let callid = h.sim.place_call("101", "70093").unwrap();
    let wrong = h
        .call(Method::POST, "/voicecall/101/dropcall/1-1", Some(&s))
        .await;
    assert_eq!(retcode(&wrong), "200-025");
    let path = format!("/voicecall/101/dropcall/{callid}");
    assert_eq!(retcode(&h.call(Method::POST, &path, Some(&s)).await), "0");
    assert_eq!(
        retcode(&h.call(Method::POST, &path, Some(&s)).await),
        "200-025"
    );

    let second = h.sim.place_call("101", "555").unwrap();
    assert_eq!(h.sim.customer_hangup("101").unwrap(), second);
    assert!(h.sim.customer_hangup("101").is_err());
    let mut seen = Vec::new();
    loop {
        let ev = h.poll_event("101", &s).await;
        if ev.is_null() {
            break;
        }
        if ev["content"]["phoneState"] == 3 {
            seen.push("platform-hangup");
        }
        if ev["eventType"] == "AgentEvent_Customer_Release" && ev["content"]["callid"] == second {
            seen.push("customer-release");
        }
    }
    assert_eq!(seen, ["customer-release", "platform-hangup"]);
}

#[tokio::test]
async fn guid_rules() {
    let h = start(quick()).await;
    let s = h.sign_in("101").await;
    let wrong = Session {
        guid: "00000000-0000-0000-0000-000000000000.AgentGateway0".into(),
        ..s.clone()
    };
    assert_eq!(retcode(&h.poll("101", &wrong).await.1), "000-003");
    let prefixed = Session {
        guid: format!("JSESSIONID={}", s.guid),
        ..s.clone()
    };
    assert_eq!(retcode(&h.poll("101", &prefixed).await.1), "000-003");
    let none = h.call(Method::DELETE, "/voicecall/101/release", None).await;
    assert_eq!(retcode(&none), "000-003");
    // Header names are case-insensitive.
    let resp = h
        .client
        .delete(format!("{}{GW}/voicecall/101/release", h.base))
        .header("GUID", &s.guid)
        .send()
        .await
        .unwrap();
    assert_eq!(retcode(&json_of(resp).await), "200-017");
    // Another agent's call with this Guid: that agent is not signed in.
    assert_eq!(retcode(&h.poll("102", &s).await.1), "100-006");

    h.sim.force_signout("101").unwrap();
    assert_eq!(retcode(&h.poll("101", &s).await.1), "100-006");
    assert!(h.sim.force_signout("101").is_err());
}

#[tokio::test]
async fn rotation_announces_the_new_guid_and_keeps_the_old_one_for_the_timeout() {
    let h = start(quick()).await;
    let s = h.sign_in("101").await;
    h.sim.rotate_guid("101").unwrap();
    let (new, body) = h.poll("101", &s).await;
    assert_eq!(body, json!({"message": "", "retcode": "0"}));
    let new = Session {
        guid: new.expect("Set-GUID after rotate_guid"),
        ..s.clone()
    };
    assert_ne!(new.guid, s.guid);
    // Old Guid still accepted (and reminded of the new one); new Guid accepted, no rotation.
    let (reminder, body) = h.poll("101", &s).await;
    assert_eq!(retcode(&body), "0");
    assert_eq!(reminder.as_deref(), Some(new.guid.as_str()));
    let (none, body) = h.poll("101", &new).await;
    assert_eq!(retcode(&body), "0");
    assert_eq!(none, None);

    let h = start(SimConfig {
        guid_timeout: Duration::ZERO,
        ..quick()
    })
    .await;
    let s = h.sign_in("101").await;
    h.sim.rotate_guid("101").unwrap();
    let (new, _) = h.poll("101", &s).await;
    let new = Session {
        guid: new.unwrap(),
        ..s.clone()
    };
    assert_eq!(retcode(&h.poll("101", &s).await.1), "000-003");
    assert_eq!(retcode(&h.poll("101", &new).await.1), "0");
}

#[tokio::test]
async fn guid_rotates_by_age_in_dynamic_mode_only() {
    let h = start(SimConfig {
        guid_interval: Duration::ZERO,
        ..quick()
    })
    .await;
    let s = h.sign_in("101").await;
    assert!(h.poll("101", &s).await.0.is_some());

    let h = start(SimConfig {
        auth_mode: AuthMode::Static,
        guid_interval: Duration::ZERO,
        ..quick()
    })
    .await;
    let s = h.sign_in("101").await;
    assert!(h.poll("101", &s).await.0.is_none());
    assert!(h.sim.rotate_guid("101").is_err());
}

#[tokio::test]
async fn sticky_cookie_required_mode() {
    let h = start(SimConfig {
        require_sticky_cookie: true,
        ..quick()
    })
    .await;
    let s = h.sign_in("101").await;
    let resp = h
        .client
        .get(format!("{}{GW}/agentevent/101", h.base))
        .header("guid", &s.guid)
        .send()
        .await
        .unwrap();
    assert_eq!(retcode(&json_of(resp).await), "100-006");
    let stale = Session {
        cookie: "ccgw_route=node0".into(),
        ..s.clone()
    };
    assert_eq!(retcode(&h.poll("101", &stale).await.1), "100-006");
    assert_eq!(retcode(&h.poll("101", &s).await.1), "0");
}

/// Every route but sign-in checks, in this order: the agent id (000-002), that the agent is
/// signed in (100-006), the Guid (000-003). All-agent polling is another event mode: 000-001.
#[tokio::test]
async fn agent_routes_check_the_agent_id_then_the_session() {
    let h = start(quick()).await;
    let s = h.sign_in("101").await;
    let no_guid = Session {
        guid: String::new(),
        ..s.clone()
    };
    let routes = [
        (Method::DELETE, "/onlineagent/{agent}/logout"),
        (Method::DELETE, "/onlineagent/{agent}/forcelogout"),
        (Method::GET, "/agentevent/{agent}"),
        (Method::DELETE, "/voicecall/{agent}/release"),
        (Method::DELETE, "/voicecall/{agent}"),
        (Method::POST, "/voicecall/{agent}/dropcall/1-1"),
        (Method::POST, "/voicecall/{agent}/disconnect/70093"),
    ];
    for (method, route) in routes {
        for (agent, session, expected) in [
            ("abc", Some(&s), "000-002"),
            ("100", None, "000-002"),
            ("102", Some(&s), "100-006"),
            ("101", None, "000-003"),
            ("101", Some(&no_guid), "000-003"),
        ] {
            let path = route.replace("{agent}", agent);
            let answer = h.call(method.clone(), &path, session).await;
            assert_eq!(retcode(&answer), expected, "{method} {path}");
        }
    }
    for session in [None, Some(&s)] {
        let answer = h
            .call(Method::GET, "/agentevent/allagentevent", session)
            .await;
        assert_eq!(retcode(&answer), "000-001");
    }
}

#[tokio::test]
async fn logout_refuses_during_a_call_and_forcelogout_releases() {
    let h = start(quick()).await;
    let s = h.sign_in("101").await;
    h.sim.place_call("101", "70093").unwrap();
    let busy = h
        .call(Method::DELETE, "/onlineagent/101/logout", Some(&s))
        .await;
    assert_eq!(retcode(&busy), "100-010");
    let out = h
        .call(Method::DELETE, "/onlineagent/101/forcelogout", Some(&s))
        .await;
    assert_eq!(retcode(&out), "0");
    assert_eq!(retcode(&h.poll("101", &s).await.1), "100-006");

    let s = h.sign_in("101").await;
    let out = h
        .call(Method::DELETE, "/onlineagent/101/logout", Some(&s))
        .await;
    assert_eq!(retcode(&out), "0");
    let (_, view) = h.control(Method::GET, "/agents/101", None).await;
    assert_eq!(view["signed_in"], false);
}

#[tokio::test]
async fn a_waiting_poll_answers_as_soon_as_an_event_arrives() {
    let h = start(SimConfig {
        poll_wait: LONG_POLL_WAIT,
        ..SimConfig::default()
    })
    .await;
    let s = h.sign_in("101").await;
    let sim = h.sim.clone();
    // The call is placed once the poll waits, so what answers it is the wake-up.
    tokio::spawn(async move {
        while sim.agent("101").unwrap().polls_in_flight == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        sim.place_call("101", "70093").unwrap();
    });
    let ev = timeout(BOUND, h.poll_event("101", &s))
        .await
        .expect("the event woke the waiting poll");
    assert_eq!(ev["eventType"], "AgentEvent_Ringing");
}

#[tokio::test]
async fn missed_polls_sign_the_agent_out() {
    let h = start(SimConfig {
        // Far above the gaps between polls, even on a loaded machine.
        signout_after: Some(Duration::from_secs(2)),
        poll_wait: Duration::from_millis(100),
        ..SimConfig::default()
    })
    .await;
    // Polling keeps the session alive well past signout_after.
    let s = h.sign_in("101").await;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(3) {
        assert_eq!(retcode(&h.poll("101", &s).await.1), "0");
    }
    // Silence signs it out; the reaper shows it without further gateway requests.
    timeout(BOUND, async {
        loop {
            let (_, view) = h.control(Method::GET, "/agents/101", None).await;
            if view["signed_in"] == false {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("signed out after missed polls");
    assert_eq!(retcode(&h.poll("101", &s).await.1), "100-006");
}

#[tokio::test]
async fn faults_retcode_status_malformed_latency() {
    let h = start(quick()).await;
    let s = h.sign_in("101").await;
    h.sim.place_call("101", "70093").unwrap();

    // Retcode: the envelope says so and the call is untouched.
    h.sim.push_fault(FaultRule {
        fault: Fault::Retcode {
            retcode: "100-007".into(),
            message: "backend down".into(),
        },
        count: 1,
        method: Some("delete".into()),
        path_contains: Some("/voicecall/".into()),
    });
    let poll = h.poll("101", &s).await.1; // GET does not match the rule
    assert_eq!(poll["event"]["eventType"], "AgentEvent_Ringing");
    let failed = h
        .call(Method::DELETE, "/voicecall/101/release", Some(&s))
        .await;
    assert_eq!(failed["retcode"], "100-007");
    assert_eq!(failed["message"], "backend down");
    let (_, view) = h.control(Method::GET, "/agents/101", None).await;
    assert!(view["call_id"].is_string());

    // HTTP status with an HTML body, twice, then normal again.
    h.sim.push_fault(FaultRule {
        fault: Fault::HttpStatus { status: 502 },
        count: 2,
        method: None,
        path_contains: None,
    });
    for _ in 0..2 {
        let resp = h
            .send(Method::DELETE, "/voicecall/101/release", Some(&s))
            .await;
        assert_eq!(resp.status(), 502);
        assert_eq!(resp.headers()["content-type"], "text/html");
        assert!(resp.text().await.unwrap().contains("502 Bad Gateway"));
    }
    let ok = h
        .call(Method::DELETE, "/voicecall/101/release", Some(&s))
        .await;
    assert_eq!(retcode(&ok), "0");

    h.sim.push_fault(FaultRule::once(Fault::Malformed));
    let resp = h.send(Method::GET, "/agentevent/101", Some(&s)).await;
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    assert!(serde_json::from_str::<Value>(&text).is_err(), "{text}");

    h.sim
        .push_fault(FaultRule::once(Fault::Latency { ms: 300 }));
    let started = Instant::now();
    let ev = h.poll_event("101", &s).await;
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(ev["eventType"], "AgentEvent_Talking");

    h.sim
        .push_fault(FaultRule::once(Fault::Latency { ms: 60_000 }));
    h.sim.clear_faults();
    assert_eq!(
        h.poll_event("101", &s).await["eventType"],
        "AgentEvent_Call_Release"
    );
}

#[tokio::test]
async fn fault_drop_gives_no_complete_answer() {
    let h = start(quick()).await;
    let s = h.sign_in("101").await;
    h.sim.place_call("101", "70093").unwrap();
    h.sim.push_fault(FaultRule::once(Fault::Drop));
    let req = h
        .client
        .get(format!("{}{GW}/agentevent/101", h.base))
        .header("guid", &s.guid)
        .send();
    let outcome = match timeout(BOUND, req).await.unwrap() {
        Err(e) => format!("send: {e:?}"),
        Ok(resp) => match timeout(BOUND, resp.bytes()).await.unwrap() {
            Err(e) => format!("body: {e:?}"),
            Ok(b) => panic!("complete answer despite drop: {b:?}"),
        },
    };
    eprintln!("drop fault as seen by reqwest: {outcome}");
    // The request never reached the gateway logic: the event is still there.
    assert_eq!(
        h.poll_event("101", &s).await["eventType"],
        "AgentEvent_Ringing"
    );
}

#[tokio::test]
async fn fault_lose_answer_executes_the_release_but_the_client_gets_no_answer() {
    let h = start(quick()).await;
    let s = h.sign_in("101").await;
    let callid = h.sim.place_call("101", "70093").unwrap();
    assert_eq!(
        h.poll_event("101", &s).await["eventType"],
        "AgentEvent_Ringing"
    );
    assert_eq!(
        h.poll_event("101", &s).await["eventType"],
        "AgentEvent_Talking"
    );
    let (status, _) = h
        .control(
            Method::POST,
            "/faults",
            Some(json!({"fault": {"kind": "lose_answer"}, "method": "DELETE", "path_contains": "/release"})),
        )
        .await;
    assert_eq!(status, 200);

    let req = h
        .client
        .delete(format!("{}{GW}/voicecall/101/release", h.base))
        .header("guid", &s.guid)
        .header("Cookie", &s.cookie)
        .send();
    let err = timeout(BOUND, req)
        .await
        .unwrap()
        .expect_err("no answer under lose_answer");
    assert!(err.is_request(), "{err:?}");

    // ...but the release was executed: the call is gone and its events are queued.
    let (status, view) = h.control(Method::GET, "/agents/101", None).await;
    assert_eq!(status, 200);
    assert!(view["call_id"].is_null(), "{view}");
    let released = h.poll_event("101", &s).await;
    assert_eq!(released["eventType"], "AgentEvent_Call_Release");
    assert_eq!(released["content"], callid.as_str());
    // A blind retry finds no call (with a new call placed meanwhile it would hang that one up).
    let again = h
        .call(Method::DELETE, "/voicecall/101/release", Some(&s))
        .await;
    assert_eq!(retcode(&again), "200-017");
}

#[tokio::test]
async fn fault_oversized_counts_only_what_the_client_pulls() {
    let h = start(quick()).await;
    let s = h.sign_in("101").await;

    // Fully read: exactly the requested size, counted in full.
    h.sim
        .push_fault(FaultRule::once(Fault::Oversized { bytes: 100_000 }));
    let resp = h.send(Method::GET, "/agentevent/101", Some(&s)).await;
    let body = resp.bytes().await.unwrap();
    assert_eq!(body.len(), 100_000);
    assert!(serde_json::from_slice::<Value>(&body).is_ok());
    assert_eq!(h.sim.oversized_bytes_sent(), 100_000);

    // Abandoned after the first 64 KiB: the server stops producing far short of the total.
    const TOTAL: u64 = 1 << 30;
    h.sim
        .push_fault(FaultRule::once(Fault::Oversized { bytes: TOTAL }));
    let mut resp = h.send(Method::GET, "/agentevent/101", Some(&s)).await;
    let mut read = 0;
    while read < 64 * 1024 {
        read += timeout(BOUND, resp.chunk())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
            .len();
    }
    drop(resp);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let sent = h.sim.oversized_bytes_sent() - 100_000;
    assert!(sent < TOTAL / 16, "produced {sent} bytes");
}

#[tokio::test]
async fn requests_are_recorded_and_control_api_works_over_http() {
    let h = start(quick()).await;
    let s = h.sign_in("101").await;
    let (status, call) = h
        .control(
            Method::POST,
            "/agents/101/calls",
            Some(json!({"caller": "70093"})),
        )
        .await;
    assert_eq!(status, 200);
    let callid = call["callid"].as_str().unwrap().to_owned();
    let (status, _) = h.control(Method::POST, "/agents/101/calls", None).await;
    assert_eq!(status, 409);
    let (status, view) = h.control(Method::GET, "/agents/101", None).await;
    assert_eq!(status, 200);
    assert_eq!(
        view,
        json!({
            "agent_id": "101", "signed_in": true, "call_id": callid, "queued_events": 2,
            "polls_in_flight": 0, "max_polls_in_flight": 0, "polls_abandoned": 0,
            "longest_unpolled_ms": 0,
        })
    );
    let (status, _) = h.control(Method::GET, "/agents/abc", None).await;
    assert_eq!(status, 400);

    let (status, _) = h
        .control(
            Method::POST,
            "/faults",
            Some(json!({"fault": {"kind": "retcode", "retcode": "100-007"}, "path_contains": "/dropcall/"})),
        )
        .await;
    assert_eq!(status, 200);
    let dropped = h
        .call(
            Method::POST,
            &format!("/voicecall/101/dropcall/{callid}"),
            Some(&s),
        )
        .await;
    assert_eq!(retcode(&dropped), "100-007");
    assert_eq!(h.control(Method::DELETE, "/faults", None).await.0, 200);

    let (status, hung) = h
        .control(Method::POST, "/agents/101/customer-hangup", None)
        .await;
    assert_eq!(
        (status, hung["callid"].as_str()),
        (200, Some(callid.as_str()))
    );
    let (status, _) = h
        .control(Method::POST, "/agents/101/customer-hangup", None)
        .await;
    assert_eq!(status, 409);
    assert_eq!(
        h.control(Method::POST, "/agents/101/rotate-guid", None)
            .await
            .0,
        200
    );

    let resp = h.send(Method::GET, "/no/such/path", Some(&s)).await;
    assert_eq!(resp.status(), 404);

    let (_, list) = h.control(Method::GET, "/requests", None).await;
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 3, "{list:?}");
    assert_eq!(list[0]["method"], "PUT");
    assert_eq!(list[0]["path"], format!("{GW}/onlineagent/101"));
    assert!(list[0]["guid"].is_null());
    assert_eq!(list[1]["guid"], s.guid.as_str());
    assert_eq!(list[1]["cookie"], s.cookie.as_str());
    assert_eq!(list[2]["path"], format!("{GW}/no/such/path"));
    for request in list.iter() {
        let peer = request["peer"].as_str().expect("the connection's peer");
        assert!(peer.starts_with("127.0.0.1:"), "{request}");
    }
    let seqs: Vec<u64> = list.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, [1, 2, 3]);
    assert_eq!(h.sim.requests().len(), 3);

    let (_, stats) = h.control(Method::GET, "/stats", None).await;
    assert_eq!(
        stats,
        json!({"agents_polled_twice": 0, "longest_unpolled_ms": 0, "oversized_bytes_sent": 0, "polls_abandoned": 0, "polls_in_flight": 0, "requests": 3})
    );
    assert_eq!(h.control(Method::DELETE, "/requests", None).await.0, 200);
    assert!(h.sim.requests().is_empty());

    assert_eq!(
        h.control(Method::POST, "/agents/101/force-signout", None)
            .await
            .0,
        200
    );
    assert_eq!(
        h.control(Method::POST, "/agents/101/force-signout", None)
            .await
            .0,
        409
    );
}

#[tokio::test]
async fn queued_raw_events_come_back_verbatim_after_the_simulators_own() {
    let h = start(quick()).await;
    let s = h.sign_in("101").await;
    h.sim.place_call("101", "70093").unwrap();
    let no_work_no = json!({"eventType": "AgentState_Work", "content": {"reason": 7}});
    h.sim.queue_event("101", no_work_no.clone()).unwrap();
    let malformed = [
        json!({"workNo": "101", "content": "no eventType"}),
        json!({"eventType": "AgentEvent_Customer_Release", "workNo": "101", "content": 5}),
        json!([{"eventType": "AgentEvent_Call_Release", "content": "1-1"}]),
        json!(42),
    ];
    for event in &malformed {
        let (status, body) = h
            .control(Method::POST, "/agents/101/events", Some(event.clone()))
            .await;
        assert_eq!((status, body), (200, json!({})));
    }
    assert_eq!(
        h.sim.agent("101").unwrap().queued_events,
        2 + 1 + malformed.len()
    );

    assert_eq!(
        h.poll_event("101", &s).await["eventType"],
        "AgentEvent_Ringing"
    );
    assert_eq!(
        h.poll_event("101", &s).await["eventType"],
        "AgentEvent_Talking"
    );
    // Nothing added: no workNo, no eventGenTime.
    assert_eq!(h.poll_event("101", &s).await, no_work_no);
    for event in &malformed[..3] {
        assert_eq!(&h.poll_event("101", &s).await, event);
    }
    let resp = h.send(Method::GET, "/agentevent/101", Some(&s)).await;
    assert_eq!(
        resp.text().await.unwrap(),
        r#"{"message":"","retcode":"0","event":42}"#
    );
    assert_eq!(h.sim.agent("101").unwrap().queued_events, 0);
}

#[tokio::test]
async fn queue_event_needs_a_signed_in_agent() {
    let h = start(quick()).await;
    let event = json!({"eventType": "AgentState_Ready", "workNo": "101", "content": null});
    assert_eq!(
        h.sim.queue_event("101", event.clone()),
        Err(SimError::NotSignedIn("101".into()))
    );
    assert_eq!(
        h.sim.queue_event("abc", event.clone()),
        Err(SimError::BadAgentId("abc".into()))
    );
    let (status, body) = h
        .control(Method::POST, "/agents/101/events", Some(event.clone()))
        .await;
    assert_eq!(status, 409);
    assert!(body["error"].is_string(), "{body}");
    let (status, _) = h
        .control(Method::POST, "/agents/abc/events", Some(event.clone()))
        .await;
    assert_eq!(status, 400);

    h.sign_in("101").await;
    let resp = h
        .client
        .post(format!("{}/sim/agents/101/events", h.base))
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    h.sim.force_signout("101").unwrap();
    assert_eq!(
        h.sim.queue_event("101", event),
        Err(SimError::NotSignedIn("101".into()))
    );
    assert_eq!(
        h.sim.agent("101").unwrap(),
        AgentView {
            agent_id: "101".into(),
            signed_in: false,
            call_id: None,
            queued_events: 0,
            polls_in_flight: 0,
            max_polls_in_flight: 0,
            polls_abandoned: 0,
            longest_unpolled_ms: 0,
        }
    );
}

#[tokio::test]
async fn the_longest_wait_from_a_poll_answer_to_the_next_poll_shows_in_longest_unpolled() {
    const AWAY: Duration = Duration::from_millis(300);
    let away_ms = AWAY.as_millis() as u64;
    let h = start(quick()).await;
    let s = h.sign_in("101").await;
    tokio::time::sleep(AWAY).await;
    // Before the first poll there is no poller to have been away.
    assert_eq!(h.sim.agent("101").unwrap().longest_unpolled_ms, 0);
    h.sim.queue_event("101", json!({"n": 0})).unwrap();
    h.poll_event("101", &s).await;
    tokio::time::sleep(AWAY).await;
    // The wait going on counts before the next poll ends it.
    assert!(h.sim.agent("101").unwrap().longest_unpolled_ms >= away_ms);
    h.sim.queue_event("101", json!({"n": 1})).unwrap();
    h.poll_event("101", &s).await;
    let (status, view) = h.control(Method::GET, "/agents/101", None).await;
    assert_eq!(status, 200);
    assert!(
        view["longest_unpolled_ms"].as_u64().unwrap() >= away_ms,
        "{view}"
    );
    // The stats give the longest over every agent.
    let (_, stats) = h.control(Method::GET, "/stats", None).await;
    assert!(
        stats["longest_unpolled_ms"].as_u64().unwrap() >= away_ms,
        "{stats}"
    );

    // It is per session.
    let resp = h
        .sign_in_raw("101", "/forcelogin", json!({"password": "pw"}))
        .await;
    session_of(resp).await;
    assert_eq!(h.sim.agent("101").unwrap().longest_unpolled_ms, 0);
}

/// A poll whose client goes away while it waits is counted as abandoned; an answered one is
/// not.
#[tokio::test]
async fn a_poll_its_client_gave_up_on_counts_as_abandoned() {
    let h = start(SimConfig {
        poll_wait: LONG_POLL_WAIT,
        ..SimConfig::default()
    })
    .await;
    let s = h.sign_in("101").await;
    h.sim.queue_event("101", json!({"n": 1})).unwrap();
    h.poll_event("101", &s).await;
    assert_eq!(h.sim.agent("101").unwrap().polls_abandoned, 0);

    let waiting = h.poll("101", &s);
    let gave_up = timeout(Duration::from_millis(300), waiting).await;
    assert!(gave_up.is_err(), "the poll waits for an event");
    timeout(BOUND, async {
        while h.sim.agent("101").unwrap().polls_abandoned == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the abandoned poll is counted once its connection closed");
    let view = h.sim.agent("101").unwrap();
    assert_eq!((view.polls_abandoned, view.polls_in_flight), (1, 0));
    let (_, stats) = h.control(Method::GET, "/stats", None).await;
    assert_eq!(stats["polls_abandoned"], 1, "{stats}");
}

#[tokio::test]
async fn concurrent_polls_of_one_agent_show_in_max_polls_in_flight() {
    let h = start(SimConfig {
        poll_wait: LONG_POLL_WAIT,
        ..SimConfig::default()
    })
    .await;
    let s = h.sign_in("101").await;
    // Polls one after the other never overlap.
    for n in 0..2 {
        h.sim.queue_event("101", json!({"n": n})).unwrap();
        h.poll_event("101", &s).await;
    }
    let view = h.sim.agent("101").unwrap();
    assert_eq!((view.polls_in_flight, view.max_polls_in_flight), (0, 1));
    let (_, stats) = h.control(Method::GET, "/stats", None).await;
    assert_eq!(stats["agents_polled_twice"], 0, "{stats}");

    let both_waiting = async {
        timeout(BOUND, async {
            while h.sim.agent("101").unwrap().polls_in_flight < 2 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("both polls in flight");
        let (_, stats) = h.control(Method::GET, "/stats", None).await;
        assert_eq!(stats["polls_in_flight"], 2, "{stats}");
        assert_eq!(stats["agents_polled_twice"], 1, "{stats}");
        // Wakes the long polls; each answers one of them.
        h.sim.queue_event("101", json!({"n": "a"})).unwrap();
        h.sim.queue_event("101", json!({"n": "b"})).unwrap();
    };
    let (a, b, ()) = timeout(BOUND, async {
        tokio::join!(
            h.poll_event("101", &s),
            h.poll_event("101", &s),
            both_waiting
        )
    })
    .await
    .expect("the events woke both waiting polls");
    let mut got = [a["n"].as_str().unwrap(), b["n"].as_str().unwrap()];
    got.sort();
    assert_eq!(got, ["a", "b"]);

    let (status, view) = h.control(Method::GET, "/agents/101", None).await;
    assert_eq!(status, 200);
    assert_eq!(view["polls_in_flight"], 0, "{view}");
    assert_eq!(view["max_polls_in_flight"], 2, "{view}");

    // The high-water mark is per session.
    let resp = h
        .sign_in_raw("101", "/forcelogin", json!({"password": "pw"}))
        .await;
    session_of(resp).await;
    assert_eq!(h.sim.agent("101").unwrap().max_polls_in_flight, 0);
}
