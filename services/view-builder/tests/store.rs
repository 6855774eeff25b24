//! The views' Lua scripts against a real Redis (`REDIS_URL`, database 13 of it). Skipped with a
//! note when `REDIS_URL` is not set.

use thermo_domain::Delta;
use view_builder::store::{Applied, At, Keys, Store, Target};
use view_builder::view::{SensorMeta, fold_batch};

/// `REDIS_URL` with database `db` (one per test: they run in parallel and flush it).
fn test_db_url(db: u8) -> Option<String> {
    let Ok(url) = std::env::var("REDIS_URL") else {
        eprintln!("note: REDIS_URL not set; skipping the Redis store test");
        return None;
    };
    let base = url.trim_end_matches('/');
    let host_part = base.split("://").nth(1).unwrap_or(base);
    let base = match host_part.rfind('/') {
        Some(i) => &base[..base.len() - (host_part.len() - i)],
        None => base,
    };
    Some(format!("{base}/{db}"))
}

fn delta(id: &str, site: &str, d: f64, source_seq: u64, version: u64) -> Delta {
    let t = time::OffsetDateTime::UNIX_EPOCH + time::Duration::seconds(source_seq as i64);
    Delta {
        sensor_id: id.into(),
        site: site.into(),
        delta_celsius: d,
        oldest_celsius: 20.0,
        latest_celsius: 20.0 + d,
        min_celsius: 20.0_f64.min(20.0 + d),
        max_celsius: 20.0_f64.max(20.0 + d),
        samples: 3,
        window_secs: 600,
        measured_at: t,
        window_end: t,
        reading_celsius: 20.0 + d,
        calibration_offset: 0.0,
        sensor_version: version,
        source_seq,
    }
}

/// The deltas stream identity the batches of these tests come from.
const SOURCE: u64 = 7;

async fn apply(
    store: &Store,
    target: &Target,
    p: u32,
    epoch: u64,
    items: Vec<(u64, Delta)>,
) -> Applied {
    let last = items.last().map(|i| i.0).unwrap_or(0);
    let ups = fold_batch(items, 3);
    let metas = vec![None; ups.len()];
    store
        .apply(
            target,
            p,
            epoch,
            At {
                previous: 0,
                last,
                source: SOURCE,
            },
            3,
            &ups,
            &metas,
        )
        .await
        .expect("apply")
}

#[tokio::test]
async fn batches_are_atomic_idempotent_fenced_and_rebuildable() {
    let Some(url) = test_db_url(13) else { return };
    let conn = kappa_runtime::working::remote::connect(&url, "REDIS_URL")
        .await
        .expect("redis");
    let mut c = conn.clone();
    let _: () = redis::cmd("FLUSHDB")
        .query_async(&mut c)
        .await
        .expect("flush");
    let store = Store::new(conn);
    let active = Target::Active;

    assert_eq!(
        store.open(&active, 0, 10).await.expect("open"),
        Some((0, 0))
    );
    let r = apply(
        &store,
        &active,
        0,
        10,
        vec![
            (1, delta("a", "lab", 1.0, 101, 1)),
            (2, delta("b", "lab", -3.0, 102, 1)),
            (3, delta("a", "lab", 2.0, 103, 1)),
            (4, delta("c", "roof", 2.0, 104, 1)),
        ],
    )
    .await;
    let Applied::Changed(views) = r else {
        panic!("not applied: {r:?}")
    };
    assert_eq!(views.len(), 3);

    let a = store.sensor("a").await.expect("read").expect("a");
    assert_eq!((a.view_seq, a.source_seq, a.delta_celsius), (3, 103, 2.0));
    let lab = store.site("lab").await.expect("site");
    let ids: Vec<&str> = lab.views.iter().map(|v| v.sensor_id.as_str()).collect();
    assert_eq!(ids, vec!["b", "a"]);
    // The read states the partition's position and the stream it refers to.
    let p = lab.positions.values().next().expect("a position");
    assert_eq!((lab.positions.len(), p.position), (1, 4));
    assert!(p.source > 0, "{p:?}");
    // The first two of the ranking; ties by id ascending.
    let top = store.top(2).await.expect("top");
    let ids: Vec<&str> = top.views.iter().map(|v| v.sensor_id.as_str()).collect();
    assert_eq!(ids, vec!["b", "a"]);
    assert_eq!(store.top(10).await.expect("top").views.len(), 3);
    let all = store.sensors().await.expect("all");
    assert_eq!(all.views.len(), 3);
    assert_eq!(all.views[0].sensor_id, "a");

    // A replayed batch changes nothing.
    let r = apply(
        &store,
        &active,
        0,
        10,
        vec![(3, delta("a", "lab", 9.0, 103, 1))],
    )
    .await;
    assert_eq!(r, Applied::Skipped);
    let h = store.history("a").await.expect("history").expect("a");
    assert_eq!(h.points.len(), 2);

    // History is capped at 3 points.
    for s in 5..9 {
        apply(
            &store,
            &active,
            0,
            10,
            vec![(s, delta("a", "lab", s as f64, 100 + s, 1))],
        )
        .await;
    }
    let h = store.history("a").await.expect("history").expect("a");
    let seqs: Vec<u64> = h.points.iter().map(|p| p.view_seq).collect();
    assert_eq!(seqs, vec![6, 7, 8]);
    assert!(store.history("zz").await.expect("history").is_none());

    // A stale writer is fenced; a newer one takes over.
    assert_eq!(
        store.open(&active, 0, 20).await.expect("open"),
        Some((8, SOURCE))
    );
    let r = apply(
        &store,
        &active,
        0,
        10,
        vec![(9, delta("a", "lab", 1.0, 109, 1))],
    )
    .await;
    assert_eq!(r, Applied::Fenced);
    assert_eq!(store.open(&active, 0, 5).await.expect("open"), None);

    // A registry change moves a sensor to another site; an older version does not.
    let meta = SensorMeta {
        site: "roof".into(),
        calibration_offset: 0.5,
        window_secs: 300,
        version: 2,
    };
    let v = store
        .apply_meta("b", &meta)
        .await
        .expect("meta")
        .expect("changed");
    assert_eq!((v.site.as_str(), v.sensor.version), ("roof", 2));
    let old = SensorMeta {
        site: "lab".into(),
        version: 1,
        ..meta.clone()
    };
    assert!(store.apply_meta("b", &old).await.expect("meta").is_none());
    let roof = store.site("roof").await.expect("site");
    let ids: Vec<&str> = roof.views.iter().map(|v| v.sensor_id.as_str()).collect();
    assert_eq!(ids, vec!["b", "c"]);
    // A later delta computed with the old version keeps the newer site.
    apply(
        &store,
        &active,
        0,
        20,
        vec![(10, delta("b", "lab", -4.0, 110, 1))],
    )
    .await;
    let b = store.sensor("b").await.expect("read").expect("b");
    assert_eq!((b.site.as_str(), b.view_seq), ("roof", 10));
    assert_eq!(store.site("lab").await.expect("site").views.len(), 1);

    // A rebuilt generation swaps in only once it has caught up.
    let g = Target::Generation("7".into());
    apply(&store, &g, 0, 0, vec![(1, delta("a", "lab", 1.0, 101, 1))]).await;
    let (swapped, prev) = store.swap("7", SOURCE).await.expect("swap");
    assert!(!swapped);
    assert_eq!(prev, "0");
    assert_eq!(store.sensors().await.expect("all").views.len(), 3);
    store.apply_meta_to("7", "b", &meta).await.expect("meta");
    apply(
        &store,
        &g,
        0,
        0,
        vec![
            (2, delta("b", "lab", -3.0, 102, 1)),
            (10, delta("b", "lab", -4.0, 110, 1)),
        ],
    )
    .await;
    assert!(store.swap("7", SOURCE).await.expect("swap").0);
    assert_eq!(store.active_generation().await.expect("gen"), "7");
    let b2 = store.sensor("b").await.expect("read").expect("b");
    assert_eq!(b2, b);
    assert!(store.drop_generation("0").await.expect("drop") > 0);
    let mut c = store.conn();
    let left: Vec<String> = redis::cmd("KEYS")
        .arg(Keys::new("0").pattern())
        .query_async(&mut c)
        .await
        .expect("keys");
    assert!(left.is_empty());

    // A store that lost what a writer stored (wiped, rolled back) says so and writes nothing.
    let ups = fold_batch(vec![(11, delta("b", "lab", 1.0, 111, 1))], 3);
    let _: () = redis::cmd("FLUSHDB")
        .query_async(&mut c)
        .await
        .expect("flush");
    let r = store
        .apply(
            &active,
            0,
            20,
            At {
                previous: 10,
                last: 11,
                source: SOURCE,
            },
            3,
            &ups,
            &[None],
        )
        .await
        .expect("apply");
    assert_eq!(r, Applied::Lost { stored: 0 });
    assert!(store.sensors().await.expect("all").views.is_empty());
}

#[tokio::test]
async fn a_replaced_deltas_stream_is_followed_from_its_start_and_keeps_the_views() {
    let Some(url) = test_db_url(12) else { return };
    let conn = kappa_runtime::working::remote::connect(&url, "REDIS_URL")
        .await
        .expect("redis");
    let mut c = conn.clone();
    let _: () = redis::cmd("FLUSHDB")
        .query_async(&mut c)
        .await
        .expect("flush");
    let store = Store::new(conn);
    let active = Target::Active;
    let old = vec![
        (41, delta("a", "lab", 1.0, 101, 1)),
        (42, delta("b", "lab", 2.0, 102, 1)),
    ];
    assert!(matches!(
        apply(&store, &active, 0, 1, old).await,
        Applied::Changed(_)
    ));
    assert_eq!(
        store.open(&active, 0, 1).await.expect("open"),
        Some((42, SOURCE))
    );

    // The new stream starts again at 1: below the stored position and each sensor's sequence.
    let replaced = 99;
    let ups = fold_batch(vec![(1, delta("a", "lab", 5.0, 1, 1))], 3);
    let r = store
        .apply(
            &active,
            0,
            1,
            At {
                previous: 0,
                last: 1,
                source: replaced,
            },
            3,
            &ups,
            &[None],
        )
        .await
        .expect("apply");
    assert!(
        matches!(r, Applied::Changed(ref v) if v.len() == 1),
        "{r:?}"
    );
    let a = store.sensor("a").await.expect("a").expect("a exists");
    assert_eq!((a.view_seq, a.delta_celsius), (1, 5.0));
    let b = store.sensor("b").await.expect("b").expect("b kept");
    assert_eq!((b.view_seq, b.delta_celsius), (42, 2.0));
    let h = store.history("a").await.expect("history").expect("a");
    let seqs: Vec<u64> = h.points.iter().map(|p| p.view_seq).collect();
    assert_eq!(
        seqs,
        vec![41, 1],
        "the new stream's point follows the old ones"
    );
    assert_eq!(
        store.open(&active, 0, 1).await.expect("open"),
        Some((1, replaced))
    );
    // Now the new stream's sequences count: a replay of its batch changes nothing.
    let r = store
        .apply(
            &active,
            0,
            1,
            At {
                previous: 1,
                last: 1,
                source: replaced,
            },
            3,
            &ups,
            &[None],
        )
        .await
        .expect("apply");
    assert_eq!(r, Applied::Skipped);

    // A rebuild from the new stream swaps in although its positions are below the active
    // generation's in a partition whose position still refers to the old stream.
    assert!(matches!(
        apply(
            &store,
            &active,
            1,
            1,
            vec![(77, delta("c", "roof", 1.0, 177, 1))]
        )
        .await,
        Applied::Changed(_)
    ));
    let g = Target::Generation("5".into());
    let ups = fold_batch(vec![(2, delta("a", "lab", 6.0, 2, 1))], 3);
    let r = store
        .apply(
            &g,
            1,
            0,
            At {
                previous: 0,
                last: 2,
                source: replaced,
            },
            3,
            &ups,
            &[None],
        )
        .await
        .expect("apply to the new generation");
    assert!(matches!(r, Applied::Changed(_)), "{r:?}");
    let (swapped, _) = store.swap("5", replaced).await.expect("swap");
    assert!(!swapped, "partition 0 of the new stream is not rebuilt yet");
    let ups = fold_batch(vec![(1, delta("a", "lab", 5.0, 1, 1))], 3);
    let r = store
        .apply(
            &g,
            0,
            0,
            At {
                previous: 0,
                last: 1,
                source: replaced,
            },
            3,
            &ups,
            &[None],
        )
        .await
        .expect("apply to the new generation");
    assert!(matches!(r, Applied::Changed(_)), "{r:?}");
    let (swapped, _) = store.swap("5", replaced).await.expect("swap");
    assert!(
        swapped,
        "the old stream's position in partition 1 held the swap back"
    );
}
