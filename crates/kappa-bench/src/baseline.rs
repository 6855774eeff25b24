//! In-process baselines with the raw clients (async-nats, redis): what the hardware and the
//! servers allow before any service logic, measured in the same run as the services.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use async_nats::jetstream::{self, consumer, context::PublishAckFuture, message::PublishMessage};
use bytes::Bytes;
use futures::StreamExt;
use hdrhistogram::Histogram;
use kappa_runtime::partition::PartitionedStream;

/// Partitions of every partitioned stream here (same as the services' `KAPPA_PARTITIONS`).
pub const PARTITIONS: u32 = 8;
/// Batch of the relays (the services' default `KAPPA_BATCH`).
pub const BATCH: usize = 256;
/// Publishes in flight (the thermometer's window).
pub const WINDOW: usize = 1024;

pub fn bench_readings() -> PartitionedStream {
    PartitionedStream {
        stream: "BENCH_READINGS".into(),
        prefix: "bench.readings".into(),
        partitions: PARTITIONS,
    }
}

pub fn bench_deltas() -> PartitionedStream {
    PartitionedStream {
        stream: "BENCH_DELTAS".into(),
        prefix: "bench.deltas".into(),
        partitions: PARTITIONS,
    }
}

/// A reading like the thermometer's (same JSON shape and size).
pub fn reading_json(sensor: &str, i: u64) -> Bytes {
    let celsius = 15.0 + (i % 1000) as f64 / 100.0;
    Bytes::from(format!(
        r#"{{"sensor_id":"{sensor}","celsius":{celsius:.3},"measured_at":"2026-11-24T17:00:00.123Z"}}"#
    ))
}

/// A delta-sized JSON body (the fields temperature-delta publishes).
pub fn delta_json(sensor: &str, seq: u64) -> Bytes {
    Bytes::from(format!(
        r#"{{"sensor_id":"{sensor}","site":"site-1","delta_celsius":0.125,"oldest_celsius":21.375,"latest_celsius":21.5,"min_celsius":21.25,"max_celsius":21.625,"samples":42,"window_secs":600,"measured_at":"2026-11-24T17:00:00.123Z","window_end":"2026-11-24T17:00:00.123Z","reading_celsius":21.5,"calibration_offset":0.0,"sensor_version":1,"source_seq":{seq}}}"#
    ))
}

pub fn sensor_id(i: u64, sensors: u64) -> String {
    format!("s-{:04}", i % sensors + 1)
}

/// Baseline 1: pipelined JetStream publish (window of in-flight acks) into a stream configured
/// like READINGS. Returns messages/s.
pub async fn raw_publish(js: &jetstream::Context, n: u64, sensors: u64) -> anyhow::Result<f64> {
    let mut ps = bench_readings();
    ps.declare(js).await?;
    let t0 = Instant::now();
    let mut acks = kappa_runtime::nats::AckWindow::new(WINDOW);
    for i in 0..n {
        let id = sensor_id(i, sensors);
        let msg = PublishMessage::build()
            .payload(reading_json(&id, i))
            .message_id(format!("bench:{i}"));
        if let Some(((), a)) = acks.make_room() {
            a.await.context("ack")?;
        }
        acks.push(
            (),
            js.send_publish(format!("{}.{id}", ps.prefix), msg)
                .await
                .context("publish")?,
        );
    }
    for ((), a) in acks.rest() {
        a.await.context("ack")?;
    }
    Ok(n as f64 / t0.elapsed().as_secs_f64())
}

/// Where a relay writes each batch.
#[derive(Clone)]
pub enum Sink {
    /// Publish every message to this partitioned stream, await all acks of the batch.
    Stream(PartitionedStream),
    /// As `Stream`, but each message published as temperature-delta publishes a change: its
    /// headers (`Kappa-Source-Seq`, `Kappa-Source-Stream`, `Kappa-Service`, `Kappa-Schema`),
    /// `Nats-Msg-Id` from the input, and `Nats-Expected-Last-Subject-Sequence` from the
    /// previous ack of the same sensor, so a batch's messages of one sensor go out in waves
    /// (each after the previous one's ack), as the engine's do. What the broker charges for
    /// fenced, deduplicated appends, without any of the runtime.
    Fenced(PartitionedStream),
    /// One Redis pipeline per batch: HSET per message plus the partition position.
    Redis(redis::aio::MultiplexedConnection),
}

async fn relay_partition(
    js: jetstream::Context,
    input: PartitionedStream,
    p: u32,
    sink: Sink,
    done: Arc<AtomicU64>,
) -> anyhow::Result<()> {
    let stream = js.get_stream_no_info(&input.stream).await?;
    let name = format!("bench-relay-p{p}");
    let _ = stream.delete_consumer(&name).await;
    let c = stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some(name),
            filter_subject: input.filter(p),
            deliver_policy: consumer::DeliverPolicy::All,
            // As the runtime driver: no acks (its cursor is the position committed with state).
            ack_policy: consumer::AckPolicy::None,
            ..Default::default()
        })
        .await?;
    let msgs = c
        .stream()
        .max_messages_per_batch(BATCH)
        .heartbeat(Duration::from_secs(5))
        .expires(Duration::from_secs(30))
        .messages()
        .await?;
    let mut chunks = msgs.ready_chunks(BATCH);
    // `Fenced`: the stream sequence of each sensor's last message in the output.
    let mut last_of: std::collections::HashMap<String, u64> = std::collections::HashMap::new();
    while let Some(chunk) = chunks.next().await {
        let msgs: Vec<_> = chunk.into_iter().filter_map(Result::ok).collect();
        if msgs.is_empty() {
            continue;
        }
        match &sink {
            Sink::Stream(out) => {
                let mut acks = Vec::with_capacity(msgs.len());
                for m in &msgs {
                    let seq = m.info().map(|i| i.stream_sequence).unwrap_or(0);
                    let id = kappa_runtime::partition::entity_of(m.subject.as_str());
                    let msg = PublishMessage::build()
                        .payload(delta_json(id, seq))
                        .message_id(format!("relay:{seq}"));
                    acks.push(js.send_publish(format!("{}.{id}", out.prefix), msg).await?);
                }
                for a in acks {
                    a.await?;
                }
            }
            Sink::Fenced(out) => {
                // Waves: the k-th message of a sensor in this batch goes in wave k.
                let mut waves: Vec<Vec<&async_nats::jetstream::Message>> = Vec::new();
                let mut depth: std::collections::HashMap<&str, usize> =
                    std::collections::HashMap::new();
                for m in &msgs {
                    let d = depth
                        .entry(kappa_runtime::partition::entity_of(m.subject.as_str()))
                        .or_insert(0);
                    if waves.len() <= *d {
                        waves.resize_with(*d + 1, Vec::new);
                    }
                    waves[*d].push(m);
                    *d += 1;
                }
                for wave in waves {
                    let mut acks = Vec::with_capacity(wave.len());
                    for m in wave {
                        let seq = m.info().map(|i| i.stream_sequence).unwrap_or(0);
                        let id = kappa_runtime::partition::entity_of(m.subject.as_str());
                        let mut headers = async_nats::HeaderMap::new();
                        headers.insert("Kappa-Schema", "thermo.delta.v1");
                        headers.insert("Kappa-Source-Seq", seq.to_string().as_str());
                        headers.insert("Kappa-Source-Stream", "1764633600000000000");
                        headers.insert("Kappa-Service", "bench-relay");
                        let msg = PublishMessage::build()
                            .payload(delta_json(id, seq))
                            .headers(headers)
                            .message_id(format!("bench-relay:1764633600000000000:{seq}"))
                            .expected_last_subject_sequence(last_of.get(id).copied().unwrap_or(0));
                        acks.push((
                            id,
                            js.send_publish(format!("{}.{id}", out.prefix), msg).await?,
                        ));
                    }
                    for (id, a) in acks {
                        let ack = a.await?;
                        last_of.insert(id.to_string(), ack.sequence);
                    }
                }
            }
            Sink::Redis(conn) => {
                let mut conn = conn.clone();
                let mut pipe = redis::pipe();
                let mut last_seq = 0;
                for m in &msgs {
                    let seq = m.info().map(|i| i.stream_sequence).unwrap_or(0);
                    last_seq = seq;
                    let id = kappa_runtime::partition::entity_of(m.subject.as_str());
                    pipe.cmd("HSET")
                        .arg(format!("bench:view:{id}"))
                        .arg("delta")
                        .arg(m.payload.as_ref())
                        .arg("seq")
                        .arg(seq)
                        .ignore();
                }
                pipe.cmd("HSET")
                    .arg("bench:positions")
                    .arg(p)
                    .arg(last_seq)
                    .ignore();
                let _: () = pipe.query_async(&mut conn).await?;
            }
        }
        done.fetch_add(msgs.len() as u64, Ordering::Relaxed);
    }
    Ok(())
}

/// Baselines 2 and 3: one pull consumer per partition of `input` (batch 256, ack policy none, as the runtime driver),
/// each batch written to `sink`. Returns messages/s over `n` messages.
pub async fn relay(
    js: &jetstream::Context,
    input: &PartitionedStream,
    sink: Sink,
    n: u64,
) -> anyhow::Result<f64> {
    if let Sink::Stream(out) | Sink::Fenced(out) = &sink {
        out.clone().declare(js).await?;
    }
    let done = Arc::new(AtomicU64::new(0));
    let t0 = Instant::now();
    let tasks: Vec<_> = (0..input.partitions)
        .map(|p| {
            tokio::spawn(relay_partition(
                js.clone(),
                input.clone(),
                p,
                sink.clone(),
                done.clone(),
            ))
        })
        .collect();
    let deadline = t0 + Duration::from_secs(600);
    let result = loop {
        if done.load(Ordering::Relaxed) >= n {
            break Ok(n as f64 / t0.elapsed().as_secs_f64());
        }
        if Instant::now() > deadline {
            break Err(anyhow::anyhow!(
                "relay did only {} of {n}",
                done.load(Ordering::Relaxed)
            ));
        }
        if let Some(t) = tasks.iter().find(|t| t.is_finished()) {
            let _ = t;
            break Err(anyhow::anyhow!("a relay partition stopped early"));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    for t in &tasks {
        t.abort();
    }
    result
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Lat {
    pub count: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

/// A histogram in microseconds, 1 µs .. 10 min, 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

pub fn lat(h: &Histogram<u64>) -> Lat {
    let ms = |v: u64| v as f64 / 1000.0;
    Lat {
        count: h.len(),
        p50_ms: ms(h.value_at_quantile(0.5)),
        p99_ms: ms(h.value_at_quantile(0.99)),
        p999_ms: ms(h.value_at_quantile(0.999)),
        max_ms: ms(h.max()),
    }
}

/// Baseline 4: one hop, JetStream publish -> pull consumer, at `rate` messages/s for `secs`
/// (open loop). Latency is measured from each message's *intended* send time, so a stalled
/// publisher cannot hide delay (no coordinated omission).
pub async fn one_hop(js: &jetstream::Context, rate: f64, secs: f64) -> anyhow::Result<Lat> {
    one_hop_replicated(js, rate, secs, 1).await
}

/// [`one_hop`] through a stream of `replicas` replicas.
pub async fn one_hop_replicated(
    js: &jetstream::Context,
    rate: f64,
    secs: f64,
    replicas: usize,
) -> anyhow::Result<Lat> {
    let _ = js.delete_stream("BENCH_HOP").await;
    let stream = js
        .create_stream(jetstream::stream::Config {
            name: "BENCH_HOP".into(),
            subjects: vec!["bench.hop.>".into()],
            num_replicas: replicas,
            ..Default::default()
        })
        .await?;
    let c = stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some("bench-hop".into()),
            ack_policy: consumer::AckPolicy::None,
            ..Default::default()
        })
        .await?;
    let total = (rate * secs).max(1.0) as u64;
    let interval = Duration::from_secs_f64(1.0 / rate);
    let base = Instant::now() + Duration::from_millis(50);
    let mut msgs = c.stream().max_messages_per_batch(BATCH).messages().await?;
    let receiver = tokio::spawn(async move {
        let mut h = histogram();
        let mut got = 0u64;
        while got < total {
            let next = tokio::time::timeout(Duration::from_secs(10), msgs.next()).await;
            let Ok(Some(Ok(m))) = next else { break };
            let now = base.elapsed().as_micros() as u64;
            let intended: u64 = std::str::from_utf8(&m.payload)
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(now);
            let _ = h.record(now.saturating_sub(intended).max(1));
            got += 1;
        }
        h
    });
    let (tx, mut rx) = tokio::sync::mpsc::channel::<PublishAckFuture>(65_536);
    let acker = tokio::spawn(async move {
        while let Some(a) = rx.recv().await {
            let _ = a.await;
        }
    });
    for i in 0..total {
        let due = base + interval * u32::try_from(i).unwrap_or(u32::MAX);
        tokio::time::sleep_until(due.into()).await;
        let intended = (due - base).as_micros() as u64;
        let a = js
            .publish(
                format!("bench.hop.{}", i % 1000),
                Bytes::from(intended.to_string()),
            )
            .await?;
        let _ = tx.send(a).await;
    }
    drop(tx);
    let h = receiver.await?;
    let _ = acker.await;
    if h.len() < total {
        bail!("one-hop received {} of {total}", h.len());
    }
    Ok(lat(&h))
}

/// Baseline 5: sequential Redis PING round trips.
pub async fn redis_ping(
    conn: &mut redis::aio::MultiplexedConnection,
    n: u64,
) -> anyhow::Result<Lat> {
    let mut h = histogram();
    for _ in 0..n {
        let t = Instant::now();
        let _: String = redis::cmd("PING").query_async(conn).await?;
        let _ = h.record((t.elapsed().as_nanos() as u64 / 1000).max(1));
    }
    Ok(lat(&h))
}
