//! Only the owner may write (issue "Beyond one box, and only the owner may write", item 3): the
//! DAG runs on a nats-server that enforces `docker/nats/permissions.conf`, each service with its
//! own user; a forged delta, a forged sensor change and a stream deletion by a user who does not
//! own them are refused by the server and never reach a stream; a service with wrong
//! credentials, or with a user that lacks its rights, exits non-zero with one clear line. A
//! service may create consumers only on the streams it consumes, and every option combination
//! (observed x working) runs under those rights without a refusal.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use integration_tests::procs::{self, run_expecting_failure};
use integration_tests::secured::{Secured, secured_nats};
use integration_tests::*;

/// A client of `user` that records the server's asynchronous errors (permissions violations).
async fn client_of(
    s: &Secured,
    user: &str,
) -> (
    async_nats::Client,
    async_nats::jetstream::Context,
    Arc<Mutex<Vec<String>>>,
) {
    let errors: Arc<Mutex<Vec<String>>> = Arc::default();
    let seen = errors.clone();
    let client = async_nats::ConnectOptions::new()
        .user_and_password(user.to_string(), s.passwords[user].clone())
        // Its own inboxes, as the services name them: the only ones it may subscribe to.
        .custom_inbox_prefix(format!("_INBOX_{user}"))
        .event_callback(move |e| {
            let seen = seen.clone();
            async move {
                if let async_nats::Event::ServerError(e) = e
                    && let Ok(mut v) = seen.lock()
                {
                    v.push(e.to_string());
                }
            }
        })
        .connect(s.url_of(user))
        .await
        .unwrap_or_else(|e| panic!("connect as {user}: {e}"));
    let js = async_nats::jetstream::new(client.clone());
    (client, js, errors)
}

/// Publishes to `subject` through JetStream and says whether a stream acknowledged it.
async fn stored(
    js: &async_nats::jetstream::Context,
    subject: &str,
    payload: &'static [u8],
) -> bool {
    match js.publish(subject.to_string(), payload.into()).await {
        Ok(ack) => tokio::time::timeout(Duration::from_secs(3), ack)
            .await
            .is_ok_and(|r| r.is_ok()),
        Err(_) => false,
    }
}

fn as_pairs<'a>(env: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    env.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_owner_may_write() {
    let test = "only_the_owner_may_write";
    let Some(s) = secured_nats(test).await else {
        return;
    };
    let base = service_env(&s.servers, &[]);
    let (_admin, js, _) = client_of(&s, "admin").await;
    let start = |name: &str, args: &[&str]| procs::start(test, name, &s.env_of(name, &base), args);

    let mut registry = start("sensor-registry", &[]);
    ready(&mut registry).await;
    let mut delta = start("temperature-delta", &[]);
    ready(&mut delta).await;
    let mut views = start("view-builder", &[]);
    ready(&mut views).await;
    let mut api = start("query-api", &[]);
    ready(&mut api).await;
    let mut thermo = start(
        "thermometer",
        &[
            "--sensors",
            "20",
            "--count",
            "2000",
            "--rate",
            "1000",
            "--seed",
            "11",
        ],
    );
    let status = thermo
        .wait_exit(Duration::from_secs(60))
        .await
        .expect("thermometer finished");
    assert!(status.success(), "thermometer:\n{}", thermo.log_text());
    assert!(
        wait_drained(&js, Duration::from_secs(60)).await,
        "did not drain under permissions:\n{}",
        delta.log_text()
    );
    let v = verify_exactly_once(&js).await;
    assert_eq!(v.readings, 2000);
    assert_eq!(v.deltas + v.rejected.values().sum::<usize>(), 2000);
    // The views were built and are served under their own users too.
    let http = reqwest::Client::new();
    let served = wait_until(Duration::from_secs(30), || async {
        let Some((200, body)) = kappa_testkit::http::get(&http, &api.http, "/v1/sensors").await
        else {
            return false;
        };
        serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|b| b["sensors"].as_array().map(|a| a.len() == 20))
            .unwrap_or(false)
    })
    .await;
    assert!(
        served,
        "query-api did not serve 20 sensors:\n{}",
        views.log_text()
    );

    // Read-your-writes under query-api's own user: the last reading's bound is reached.
    let last = js
        .get_stream("READINGS")
        .await
        .expect("READINGS")
        .cached_info()
        .state
        .last_sequence;
    let bounded = kappa_testkit::http::get(
        &http,
        &api.http,
        &format!("/v1/sensors?min_seq={last}&max_wait_ms=4000"),
    )
    .await;
    assert_eq!(
        bounded.as_ref().map(|b| b.0),
        Some(200),
        "min_seq={last} under permissions: {bounded:?}\n{}",
        api.log_tail(20)
    );

    // query-api gathers every service's status on kappa.status, each answering under its own
    // user (and so subscribed and replied within its permissions).
    let services = [
        "query-api",
        "sensor-registry",
        "temperature-delta",
        "view-builder",
    ];
    let answered = std::cell::RefCell::new(Vec::<String>::new());
    let gathered = wait_until(Duration::from_secs(20), || async {
        let Some((200, body)) = kappa_testkit::http::get(&http, &api.http, "/v1/pipeline").await
        else {
            return false;
        };
        let Ok(b) = serde_json::from_str::<serde_json::Value>(&body) else {
            return false;
        };
        *answered.borrow_mut() = b["services"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s["service"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        services
            .iter()
            .all(|s| answered.borrow().iter().any(|a| a == s))
            && b["dlq_messages"].is_u64()
    })
    .await;
    assert!(
        gathered,
        "/v1/pipeline did not gather {services:?} (answered: {:?}):\n{}",
        answered.borrow(),
        api.log_tail(20)
    );

    // Under its own user, no service was refused anything while the DAG ran.
    for p in [&registry, &delta, &views, &api] {
        let refused = metric(&p.http, "kappa_nats_permission_violations_total").await;
        assert_eq!(
            refused,
            0.0,
            "{} was refused {refused} times:\n{}",
            p.name,
            p.log_tail(20)
        );
    }

    // Forgeries, each by a user who does not own the subject.
    let deltas_before = count(&js, "DELTAS").await;
    let sensors_before = count(&js, "SENSORS").await;
    let forgeries = [
        ("thermometer", "thermo.deltas.s-0001"),
        ("view-builder", "thermo.deltas.s-0001"),
        ("thermometer", "registry.sensors.s-0001"),
        ("temperature-delta", "registry.sensors.s-0001"),
        ("query-api", "thermo.readings.s-0001"),
    ];
    for (user, subject) in forgeries {
        let (_c, forger, errors) = client_of(&s, user).await;
        assert!(
            !stored(&forger, subject, b"{\"forged\":true}").await,
            "{user} could store a message on {subject}"
        );
        let refused = wait_until(Duration::from_secs(5), || async {
            errors
                .lock()
                .map(|e| {
                    e.iter()
                        .any(|m| m.to_lowercase().contains("permissions violation"))
                })
                .unwrap_or(false)
        })
        .await;
        assert!(
            refused,
            "{user} on {subject}: no permissions violation reported"
        );
        eprintln!(
            "[{test}] {user} -> {subject}: refused ({:?})",
            errors.lock().map(|e| e.clone())
        );
    }
    // Deleting a stream is the admin's alone.
    let (_c, td, errors) = client_of(&s, "temperature-delta").await;
    assert!(
        td.delete_stream("DELTAS").await.is_err(),
        "temperature-delta deleted DELTAS"
    );
    assert!(
        errors
            .lock()
            .map(|e| e
                .iter()
                .any(|m| m.to_lowercase().contains("permissions violation")))
            .unwrap_or(false),
        "the deletion was not refused by permissions"
    );
    // Consumers only on the streams a service consumes: temperature-delta may not follow
    // DELTAS, view-builder neither READINGS nor temperature-delta's snapshots.
    for (user, stream) in [
        ("temperature-delta", "DELTAS"),
        ("view-builder", "READINGS"),
        ("view-builder", "KAPPA_STATE"),
    ] {
        let (client, _, errors) = client_of(&s, user).await;
        // The refusal is reported at once; the request itself only times out.
        let reader = async_nats::jetstream::ContextBuilder::new()
            .timeout(Duration::from_secs(1))
            .build(client);
        let created = reader
            .create_consumer_on_stream(
                async_nats::jetstream::consumer::pull::OrderedConfig::default(),
                stream,
            )
            .await;
        assert!(created.is_err(), "{user} created a consumer on {stream}");
        let refused = wait_until(Duration::from_secs(5), || async {
            errors
                .lock()
                .map(|e| {
                    e.iter().any(|m| {
                        m.to_lowercase().contains("permissions violation")
                            && m.contains(&format!("$JS.API.CONSUMER.CREATE.{stream}"))
                    })
                })
                .unwrap_or(false)
        })
        .await;
        assert!(
            refused,
            "{user}: a consumer on {stream} was not refused by permissions: {:?}",
            errors.lock().map(|e| e.clone())
        );
        eprintln!("[{test}] {user}: consumer on {stream} refused");
    }
    // Inboxes: each user may subscribe to its own only, so a service cannot read another's
    // replies, nor everyone's through the shared `_INBOX.>`.
    let (spy, _, spy_errors) = client_of(&s, "view-builder").await;
    let mut spied = Vec::new();
    for subject in ["_INBOX_temperature-delta.>", "_INBOX.>"] {
        spied.push(
            spy.subscribe(subject)
                .await
                .expect("subscribe (refused later)"),
        );
    }
    let (td, _, _) = client_of(&s, "temperature-delta").await;
    let reply = tokio::time::timeout(
        Duration::from_secs(5),
        td.request("registry.get.s-0001", bytes::Bytes::new()),
    )
    .await;
    assert!(
        matches!(reply, Ok(Ok(_))),
        "temperature-delta got no reply on its own inbox: {reply:?}"
    );
    for subject in ["_INBOX_temperature-delta.>", "_INBOX.>"] {
        let refused = wait_until(Duration::from_secs(5), || async {
            spy_errors
                .lock()
                .map(|e| {
                    e.iter().any(|m| {
                        m.to_lowercase().contains("permissions violation")
                            && m.contains(&format!("\"{subject}\""))
                    })
                })
                .unwrap_or(false)
        })
        .await;
        assert!(
            refused,
            "view-builder subscribing to {subject} was not refused: {:?}",
            spy_errors.lock().map(|e| e.clone())
        );
    }
    for mut sub in spied {
        let got = tokio::time::timeout(
            Duration::from_millis(500),
            futures::StreamExt::next(&mut sub),
        )
        .await;
        assert!(
            !matches!(got, Ok(Some(_))),
            "view-builder read a reply meant for temperature-delta"
        );
    }
    eprintln!(
        "[{test}] view-builder on another's inbox: refused ({:?})",
        spy_errors.lock().map(|e| e.clone())
    );
    assert_eq!(
        count(&js, "DELTAS").await,
        deltas_before,
        "a forged delta reached DELTAS"
    );
    assert_eq!(
        count(&js, "SENSORS").await,
        sensors_before,
        "a forged change reached SENSORS"
    );
    let forged = read_stream(&js, "DELTAS")
        .await
        .into_iter()
        .chain(read_stream(&js, "SENSORS").await)
        .chain(read_stream(&js, "READINGS").await)
        .filter(|m| m.payload.as_ref() == b"{\"forged\":true}")
        .count();
    assert_eq!(forged, 0, "forged messages were stored");

    // Wrong credentials, and a user without the service's rights: one clear line each.
    let mut wrong = s.env_of("temperature-delta", &base);
    wrong.retain(|(k, _)| *k != "NATS_PASSWORD");
    wrong.push(("NATS_PASSWORD", "not-the-password".into()));
    let (code, lines) = run_expecting_failure("temperature-delta", &as_pairs(&wrong));
    assert_ne!(code, 0);
    assert_eq!(lines.len(), 1, "one line, got {lines:?}");
    assert!(
        lines[0].contains("authorization violation") && lines[0].contains("temperature-delta"),
        "{}",
        lines[0]
    );
    eprintln!("[{test}] wrong password: {}", lines[0]);
    let as_api = s.env_of("query-api", &base);
    let (code, lines) = run_expecting_failure("temperature-delta", &as_pairs(&as_api));
    assert_ne!(code, 0);
    assert_eq!(lines.len(), 1, "one line, got {lines:?}");
    assert!(
        lines[0].to_lowercase().contains("permissions violation"),
        "the error should name the refusal: {}",
        lines[0]
    );
    eprintln!("[{test}] temperature-delta as query-api: {}", lines[0]);
}

/// Every observed option with every working option. Their services consume different
/// streams: `stateless` none of the registry's, `stateful` and `semi-stateless` its `SENSORS`
/// (a feed); `remote` keeps its state in Redis, `local` and `affinity` read it back from
/// `KAPPA_STATE` (snapshots). All nine take about 25 s.
fn combinations() -> Vec<(&'static str, &'static str)> {
    let mut all = Vec::new();
    for observed in ["stateful", "stateless", "semi-stateless"] {
        for working in ["local", "remote", "affinity"] {
            all.push((observed, working));
        }
    }
    all
}

/// Publishes `count` readings (`seed`) with the thermometer user and waits for its exit.
async fn readings(s: &Secured, test: &str, base: &[(&'static str, String)], count: u32, seed: u32) {
    let mut thermo = procs::start(
        test,
        "thermometer",
        &s.env_of("thermometer", base),
        &[
            "--sensors",
            "10",
            "--count",
            &count.to_string(),
            "--rate",
            "2000",
            "--seed",
            &seed.to_string(),
        ],
    );
    let status = thermo
        .wait_exit(Duration::from_secs(60))
        .await
        .expect("thermometer finished");
    assert!(status.success(), "thermometer:\n{}", thermo.log_text());
}

/// How often each service was refused, read from its metrics.
async fn refusals(procs: &[&integration_tests::Proc]) -> Vec<(String, f64)> {
    let mut out = Vec::new();
    for p in procs {
        out.push((
            p.name.clone(),
            metric(&p.http, "kappa_nats_permission_violations_total").await,
        ));
    }
    out
}

/// Each option combination under the per-service users: the DAG processes every reading, a
/// restarted temperature-delta recovers (from `KAPPA_STATE` with `local`, and with `affinity`
/// after its colocated Redis was emptied), and no service is refused anything, so the
/// consumer rights of `permissions.conf` (limited to the streams each service consumes) cover
/// every option.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_option_runs_under_its_permissions() {
    for (observed, working) in combinations() {
        let test = format!("permissions_{observed}_{working}");
        let test = test.as_str();
        let Some(s) = secured_nats(test).await else {
            return;
        };
        let started = std::time::Instant::now();
        let affinity = format!("{}/1", s.servers.redis_url);
        let base = service_env(
            &s.servers,
            &[
                ("KAPPA_OBSERVED", observed),
                ("KAPPA_WORKING", working),
                ("AFFINITY_REDIS_URL", &affinity),
                ("KAPPA_SNAPSHOT_SECS", "1"),
                ("KAPPA_LEASE_TTL_SECS", "2"),
            ],
        );
        let (_admin, js, _) = client_of(&s, "admin").await;
        let start = |name: &str| procs::start(test, name, &s.env_of(name, &base), &[]);
        let mut registry = start("sensor-registry");
        ready(&mut registry).await;
        let mut delta = start("temperature-delta");
        ready(&mut delta).await;
        let mut views = start("view-builder");
        ready(&mut views).await;

        readings(&s, test, &base, 300, 21).await;
        assert!(
            wait_drained(&js, Duration::from_secs(60)).await,
            "{observed}/{working}: did not drain under permissions:\n{}",
            delta.log_tail(30)
        );
        // A snapshot is taken (KAPPA_SNAPSHOT_SECS=1) before the restart, so that the next
        // instance reads one back.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let first = refusals(&[&registry, &delta, &views]).await;
        assert!(
            delta.terminate(Duration::from_secs(10)).is_some(),
            "{observed}/{working}: temperature-delta did not stop on SIGTERM"
        );
        if working == "affinity" {
            let mut r = kappa_testkit::clients::redis(&affinity)
                .await
                .expect("affinity redis");
            let _: () = redis::cmd("FLUSHDB")
                .query_async(&mut r)
                .await
                .expect("FLUSHDB");
        }
        let mut delta = start("temperature-delta");
        ready(&mut delta).await;
        readings(&s, test, &base, 300, 22).await;
        assert!(
            wait_drained(&js, Duration::from_secs(60)).await,
            "{observed}/{working}: did not drain after the restart:\n{}",
            delta.log_tail(30)
        );
        let v = verify_exactly_once(&js).await;
        assert_eq!(v.readings, 600, "{observed}/{working}");
        assert_eq!(
            v.deltas + v.rejected.values().sum::<usize>(),
            600,
            "{observed}/{working}"
        );
        assert!(v.deltas > 0, "{observed}/{working}: no deltas");
        let mut refused = first;
        refused.extend(refusals(&[&registry, &delta, &views]).await);
        for (name, n) in &refused {
            let log = [&registry, &delta, &views]
                .iter()
                .find(|p| &p.name == name)
                .map(|p| p.log_tail(30))
                .unwrap_or_default();
            assert_eq!(
                *n, 0.0,
                "{observed}/{working}: {name} was refused {n} times:\n{log}"
            );
        }
        let _ = writeln!(
            std::io::stderr().lock(),
            "[{test}] {observed}/{working}: 600 readings, {} deltas, {} dead letters, 0 refusals, {:.1} s",
            v.deltas,
            v.rejected.values().sum::<usize>(),
            started.elapsed().as_secs_f64()
        );
    }
}
