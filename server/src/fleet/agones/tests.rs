//! The client against the in-memory SDK server ([`local`]): what lands on the GameServer,
//! when, and what outages, refusals and silence cost the caller.

use super::local::{GameServerRecord, LocalSdk};
use super::*;
use std::net::{Ipv4Addr, TcpListener};

/// Longest any one condition is waited for.
const WAIT: Duration = Duration::from_secs(10);
/// Health interval in tests: short, so pings pile up quickly.
const HEALTH: Duration = Duration::from_millis(50);

/// Polls `condition` until it holds, failing the test after [`WAIT`].
fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn local() -> LocalSdk {
    LocalSdk::start(GameServerRecord::tickshard()).expect("local sdk")
}

fn start(sdk: &LocalSdk, version: &str) -> Agones {
    let config = AgonesConfig {
        sdk_addr: sdk.addr(),
        health_interval: HEALTH,
    };
    Agones::start(config, version)
}

fn capacity(room_ids: &[&str], players: u64) -> Capacity {
    Capacity {
        rooms: room_ids.len() as u64,
        rooms_capacity: 8,
        players,
        players_capacity: 64,
        room_ids: room_ids.iter().map(|id| id.to_string()).collect(),
    }
}

fn list(sdk: &LocalSdk, name: &str) -> (i64, Vec<String>) {
    let (capacity, mut values) = sdk.record().lists[name].clone();
    values.sort();
    (capacity, values)
}

fn counter(sdk: &LocalSdk, name: &str) -> (i64, i64) {
    sdk.record().counters[name]
}

fn ids(ids: &[&str]) -> Vec<String> {
    ids.iter().map(|id| id.to_string()).collect()
}

/// Calls to the Beta service (capacity), counted.
fn capacity_calls(sdk: &LocalSdk) -> usize {
    let calls = sdk.calls();
    let beta = ["GetCounter", "UpdateCounter", "GetList", "UpdateList"];
    let beta = calls
        .iter()
        .filter(|c| beta.contains(&c.method) || c.method.ends_with("ListValue"));
    beta.count()
}

/// While the server says it is unhealthy, no health ping reaches the sidecar; pings resume
/// when it is healthy again.
#[test]
fn health_pings_stop_while_unhealthy() {
    let sdk = local();
    let agones = start(&sdk, "0.1.0");
    wait_until("two health pings", || sdk.count("Health") >= 2);
    agones.set_healthy(false);
    // A ping already under way may still land.
    std::thread::sleep(HEALTH * 2);
    let before = sdk.count("Health");
    std::thread::sleep(HEALTH * 6);
    assert_eq!(
        sdk.count("Health"),
        before,
        "no health ping while unhealthy"
    );
    agones.set_healthy(true);
    wait_until("pings resume", || sdk.count("Health") >= before + 2);
}

#[test]
fn ready_marks_ready_labels_the_version_and_pings_health() {
    let sdk = local();
    let agones = start(&sdk, "0.1.0+dev build");
    agones.ready();
    wait_until("the sidecar holds Ready", || sdk.record().state == "Ready");
    wait_until("the version label is set", || {
        sdk.record()
            .labels
            .get("agones.dev/sdk-tickshard-version")
            .map(String::as_str)
            == Some("0.1.0-dev-build")
    });
    wait_until("five health pings", || sdk.count("Health") >= 5);
    wait_until("the client saw Ready", || {
        agones.status().state.as_deref() == Some("Ready")
    });

    assert_eq!(sdk.count("Ready"), 1, "Ready is sent once when it lands");
    let calls = sdk.calls();
    let health: Vec<_> = calls.iter().filter(|c| c.method == "Health").collect();
    let span = health[health.len() - 1].at - health[0].at;
    let most = span.as_millis() / HEALTH.as_millis() + 2;
    assert!(
        health.len() as u128 <= most,
        "{} health pings in {span:?}: faster than the interval",
        health.len()
    );
    let status = agones.status();
    assert!(status.reachable);
    assert!(!status.allocated && !agones.is_allocated());
    assert_eq!(status.requests_failed, 0, "{:?}", status.last_error);
    assert!(status.requests_ok >= 3, "{status:?}");
    assert!(status.health_pings >= 5, "{status:?}");
}

#[test]
fn capacity_lands_as_counters_and_the_room_list_then_converges() {
    let sdk = local();
    let agones = start(&sdk, "v1");
    // The GameServer starts with capacities 1000 and 20 (fleet.yaml): lowered to 64 and 8.
    agones.set_capacity(capacity(&["r1", "r2"], 5));
    wait_until("counters and list hold the first capacity", || {
        counter(&sdk, ROOMS) == (2, 8)
            && counter(&sdk, PLAYERS) == (5, 64)
            && list(&sdk, ROOMS) == (8, ids(&["r1", "r2"]))
    });

    // A room closes, another opens, players come and go: the latest value wins.
    for players in 0..=40 {
        agones.set_capacity(capacity(&["r2", "r3"], players));
    }
    wait_until("the second capacity converges", || {
        counter(&sdk, ROOMS) == (2, 8)
            && counter(&sdk, PLAYERS) == (40, 64)
            && list(&sdk, ROOMS) == (8, ids(&["r2", "r3"]))
    });
    assert_eq!(sdk.count("RemoveListValue"), 1);
    assert_eq!(sdk.count("AddListValue"), 3);

    // Capacity raised above what the sidecar holds, with a count that only fits the new one:
    // the capacity goes first, or the count would be refused.
    agones.set_capacity(Capacity {
        players: 100,
        players_capacity: 200,
        ..capacity(&["r2", "r3"], 0)
    });
    wait_until("the raised capacity lands", || {
        counter(&sdk, PLAYERS) == (100, 200)
    });

    // Nothing changed: nothing is sent.
    std::thread::sleep(Duration::from_millis(100));
    let before = capacity_calls(&sdk);
    agones.set_capacity(Capacity {
        players: 100,
        players_capacity: 200,
        ..capacity(&["r3", "r2"], 0)
    });
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(capacity_calls(&sdk), before);
    let status = agones.status();
    assert_eq!(status.requests_failed, 0, "{:?}", status.last_error);
}

#[test]
fn watch_reports_allocation_from_the_stream() {
    let sdk = local();
    let agones = start(&sdk, "v1");
    wait_until("the watch is open and the state known", || {
        sdk.watchers() == 1 && agones.status().state.as_deref() == Some("Scheduled")
    });
    let gets = sdk.count("GetGameServer");
    sdk.set_state("Allocated");
    wait_until("the client sees the allocation", || agones.is_allocated());
    assert_eq!(sdk.count("GetGameServer"), gets, "learnt from the stream");
    let status = agones.status();
    assert_eq!(status.state.as_deref(), Some("Allocated"));
    assert!(status.allocated);
}

#[test]
fn sdk_outages_cost_callers_nothing_and_calls_land_after() {
    let mut sdk = local();
    sdk.set_down(true).expect("down");
    let agones = start(&sdk, "v1");
    let call = Instant::now();
    agones.ready();
    agones.set_capacity(capacity(&["a"], 1));
    assert!(
        call.elapsed() < Duration::from_millis(50),
        "{:?}",
        call.elapsed()
    );
    wait_until("the outage is seen", || {
        let status = agones.status();
        !status.reachable && status.requests_failed > 0 && status.last_error.is_some()
    });
    assert!(sdk.calls().is_empty());

    // The sidecar comes up late: everything asked for lands.
    sdk.set_down(false).expect("up");
    wait_until("Ready and capacity land", || {
        sdk.record().state == "Ready"
            && counter(&sdk, ROOMS) == (1, 8)
            && list(&sdk, ROOMS) == (8, ids(&["a"]))
    });
    wait_until("the client is back and watching", || {
        agones.status().reachable && sdk.watchers() == 1
    });
    wait_until("health pings arrive", || sdk.count("Health") > 0);

    // An outage mid-run cuts the watch and the Health stream; both come back by themselves.
    let failed_before = agones.status().requests_failed;
    sdk.set_down(true).expect("down");
    let call = Instant::now();
    agones.set_capacity(capacity(&["a", "b"], 2));
    assert!(
        call.elapsed() < Duration::from_millis(50),
        "{:?}",
        call.elapsed()
    );
    wait_until("the second outage is seen", || {
        agones.status().requests_failed > failed_before
    });
    let pings = sdk.count("Health");
    sdk.set_down(false).expect("up");
    wait_until("the new capacity lands", || {
        list(&sdk, ROOMS) == (8, ids(&["a", "b"])) && counter(&sdk, PLAYERS) == (2, 64)
    });
    wait_until("the watch reconnects", || sdk.watchers() == 1);
    wait_until("health pings resume", || sdk.count("Health") > pings + 2);
    sdk.set_state("Allocated");
    wait_until("the allocation is seen", || agones.is_allocated());
}

/// A sidecar that answers with errors is reachable, not in an outage: calls are retried
/// with backoff and land once it accepts them.
#[test]
fn refusals_are_retried_until_they_land() {
    let sdk = local();
    sdk.set_refusing("Ready", Some(tonic::Code::FailedPrecondition));
    let agones = start(&sdk, "v1");
    agones.ready();
    wait_until("refusals are counted", || {
        let status = agones.status();
        status.requests_failed >= 3
            && status
                .last_error
                .as_deref()
                .is_some_and(|e| e.contains("refused"))
    });
    let status = agones.status();
    assert!(status.reachable, "a refusal is an answer: {status:?}");
    let tries = sdk.count("Ready");
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        sdk.count("Ready") <= tries + 3,
        "Ready retried with backoff, not in a loop: {} then {}",
        tries,
        sdk.count("Ready")
    );
    sdk.set_refusing("Ready", None);
    wait_until("Ready lands", || sdk.record().state == "Ready");
}

#[test]
fn shutdown_asks_the_sidecar_to_shut_down() {
    let sdk = local();
    let agones = start(&sdk, "v1");
    agones.ready();
    assert!(
        agones.shutdown_and_wait(Duration::from_secs(5)),
        "delivered in time"
    );
    wait_until("the sidecar is shut down", || {
        sdk.record().state == "Shutdown"
    });
    assert_eq!(sdk.count("Shutdown"), 1);
    wait_until("the client saw Shutdown", || {
        agones.status().state.as_deref() == Some("Shutdown")
    });
}

#[test]
fn shutdown_is_given_up_after_its_attempts() {
    let sdk = local();
    sdk.set_refusing("Shutdown", Some(tonic::Code::Internal));
    let agones = start(&sdk, "v1");
    // Eight attempts with backoff from 100 ms: about 16 s, so only the count is checked here.
    assert!(!agones.shutdown_and_wait(Duration::from_millis(500)));
    assert!(!agones.status().shutdown_settled);
    assert!(
        sdk.count("Shutdown") >= 2,
        "{} attempts",
        sdk.count("Shutdown")
    );
}

#[test]
fn drop_returns_promptly_while_the_sdk_is_unreachable() {
    // A listener that never accepts: connections wait in its backlog, answers never come.
    let silent = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
    // A port nobody listens on: connections are refused.
    let refused = {
        let probe = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
        probe.local_addr().expect("addr")
    };
    // A sidecar that went down.
    let mut down = local();
    down.set_down(true).expect("down");
    // A sidecar that answers.
    let up = local();
    for sdk_addr in [
        silent.local_addr().expect("addr"),
        refused,
        down.addr(),
        up.addr(),
    ] {
        let config = AgonesConfig {
            sdk_addr,
            health_interval: HEALTH,
        };
        let agones = Agones::start(config, "v1");
        agones.ready();
        agones.set_capacity(capacity(&["a"], 1));
        std::thread::sleep(Duration::from_millis(300));
        let dropping = Instant::now();
        drop(agones);
        let took = dropping.elapsed();
        assert!(
            took < Duration::from_millis(500),
            "drop took {took:?} for {sdk_addr}"
        );
    }
}

#[test]
fn sdk_errors_sort_into_unreachable_and_refused() {
    use agones::errors::Error;
    let refused = CallError::of(Error::Rpc(tonic::Status::not_found("counter not found")));
    assert!(matches!(
        refused,
        CallError::Refused {
            code: tonic::Code::NotFound,
            ..
        }
    ));
    // The Go sidecar's plain errors arrive as Unknown, without a source: an answer.
    let plain = CallError::of(Error::Rpc(tonic::Status::unknown("could not update")));
    assert!(!plain.is_unreachable());
    for code in [
        tonic::Code::Unavailable,
        tonic::Code::DeadlineExceeded,
        tonic::Code::Cancelled,
    ] {
        let error = CallError::of(Error::Rpc(tonic::Status::new(code, "gone")));
        assert!(error.is_unreachable(), "{code:?}");
    }
    let transport = tonic::Status::from_error(Box::new(std::io::Error::other("reset")));
    assert_eq!(transport.code(), tonic::Code::Unknown);
    assert!(CallError::of(Error::Rpc(transport)).is_unreachable());
}

#[test]
fn label_values_follow_kubernetes_rules() {
    assert_eq!(label_value("0.1.0+dev build"), "0.1.0-dev-build");
    assert_eq!(label_value("-v1.2_"), "v1.2");
    assert_eq!(label_value("+++"), "");
    assert_eq!(label_value("ünï"), "n");
    let long = label_value(&"a".repeat(100));
    assert_eq!(long.len(), 63);
}

#[test]
fn backoff_doubles_to_its_cap() {
    let mut backoff = Backoff::default();
    let delays: Vec<u64> = (0..9).map(|_| backoff.next().as_millis() as u64).collect();
    assert_eq!(delays, [100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000]);
    backoff.reset();
    assert_eq!(backoff.next(), BACKOFF_MIN);
}

#[test]
fn published_capacity_fits_what_the_sidecar_accepts() {
    let over = Capacity {
        rooms: 9,
        rooms_capacity: 4,
        players: 3,
        players_capacity: 2,
        room_ids: (0..1200)
            .map(|i| format!("r{i}"))
            .chain(["r1".into()])
            .collect(),
    };
    let published = Published::of(&over);
    assert_eq!(
        published.rooms,
        CounterValue {
            count: 4,
            capacity: 4
        }
    );
    assert_eq!(
        published.players,
        CounterValue {
            count: 2,
            capacity: 2
        }
    );
    assert_eq!(published.room_list.values.len(), 1000);
    assert_eq!(published.room_list.capacity, 1000);
    let few = Published::of(&capacity(&["b", "a", "b"], 0));
    assert_eq!(few.room_list.capacity, 8);
    assert_eq!(few.room_list.values.len(), 2);
}
