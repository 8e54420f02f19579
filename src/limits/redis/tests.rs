//! The GCRA script against a real Redis: the shared one on 127.0.0.1:6379
//! (every test under a prefix of its own), or a private `redis-server` the
//! test can stop ([`RedisServer`]).

use std::time::{Duration, Instant};

use super::*;
use crate::limits::quota::tests::set;
use crate::limits::{Limits, Scope};
use crate::testing::RedisServer;

const SHARED_REDIS: &str = "redis://127.0.0.1:6379";

fn prefix() -> String {
    format!("karibche-test:{}:", uuid::Uuid::now_v7())
}

async fn shared_redis(prefix: &str) -> RedisQuotas {
    let q = RedisQuotas::open(SHARED_REDIS, prefix, Duration::from_millis(500))
        .await
        .unwrap();
    assert!(
        q.is_up(),
        "the shared Redis on 127.0.0.1:6379 must be running"
    );
    q
}

fn cell(key: &str, per_sec: u64, burst: u32) -> Cell {
    Cell {
        key: key.to_owned(),
        interval_us: 1_000_000 / per_sec,
        burst,
    }
}

#[tokio::test]
async fn a_cell_admits_its_burst_then_refuses_until_it_refills() {
    let q = shared_redis(&prefix()).await;
    let c = [cell("a", 10, 3)];
    for _ in 0..3 {
        assert_eq!(q.take(&c).await, Ok(None));
    }
    let Ok(Some((0, wait))) = q.take(&c).await else {
        panic!("the fourth request must be refused")
    };
    assert!(
        wait > Duration::ZERO && wait <= Duration::from_millis(100),
        "{wait:?}"
    );
    // Another key is another quota.
    assert_eq!(q.take(&[cell("b", 10, 3)]).await, Ok(None));
    tokio::time::sleep(wait + Duration::from_millis(5)).await;
    assert_eq!(q.take(&c).await, Ok(None), "one more after one interval");
}

#[tokio::test]
async fn cells_are_taken_in_order_and_a_refusal_spends_nothing_after_it() {
    let q = shared_redis(&prefix()).await;
    let officer = cell("officer", 1, 1);
    let agency = cell("agency", 1, 2);
    assert_eq!(q.take(&[officer.clone(), agency.clone()]).await, Ok(None));
    // The officer is over their quota: the agency's is untouched.
    assert!(matches!(
        q.take(&[officer.clone(), agency.clone()]).await,
        Ok(Some((0, _)))
    ));
    let other = cell("officer-2", 1, 1);
    assert_eq!(q.take(&[other.clone(), agency.clone()]).await, Ok(None));
    // The agency's quota is used up now: refused at index 1, after the officer's took one.
    let third = cell("officer-3", 1, 1);
    assert!(matches!(
        q.take(&[third.clone(), agency]).await,
        Ok(Some((1, _)))
    ));
    assert!(matches!(q.take(&[third]).await, Ok(Some((0, _)))));
}

#[tokio::test]
async fn idle_keys_expire_once_their_bucket_is_full_again() {
    let p = prefix();
    let q = shared_redis(&p).await;
    q.take(&[cell("k", 100, 5)]).await.unwrap();
    let client = redis::Client::open(SHARED_REDIS).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let ttl: i64 = redis::cmd("PTTL")
        .arg(format!("{p}k"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        (1..=10).contains(&ttl),
        "one interval (10 ms) at most: {ttl}"
    );
}

#[tokio::test]
async fn replicas_sharing_redis_admit_the_whole_quota_once() {
    let p = prefix();
    let quotas = set("[defaults]\nofficer = { rate = \"1/h\", burst = 6 }\n");
    // Three replicas, each with a local share of ceil(6/3) = 2.
    let mut replicas = Vec::new();
    for _ in 0..3 {
        replicas.push(Limits::new(&quotas, 3).with_shared(shared_redis(&p).await));
    }
    let mut admitted = 0;
    for i in 0..30 {
        let l = &replicas[i % 3];
        if l.check("ssg", "o1", "registry", "persons").await.is_ok() {
            admitted += 1;
        } else {
            let e = l
                .check("ssg", "o1", "registry", "persons")
                .await
                .unwrap_err();
            assert_eq!((e.scope, e.burst), (Scope::Officer, 6), "the whole quota");
            assert!(e.retry_after > Duration::from_secs(500), "{e:?}");
        }
    }
    assert_eq!(
        admitted, 6,
        "the policy's burst, across all replicas together"
    );
}

#[tokio::test]
async fn an_unreachable_redis_means_the_local_share_at_once() {
    // A port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("redis://127.0.0.1:{port}");
    let shared = RedisQuotas::open(&url, "x:", Duration::from_millis(25))
        .await
        .unwrap();
    assert!(!shared.is_up());
    let l = Limits::new(
        &set("[defaults]\nofficer = { rate = \"1/h\", burst = 4 }\n"),
        2,
    )
    .with_shared(shared.clone());
    let t = Instant::now();
    let got: Vec<bool> = futures_all(&l, 3).await;
    assert!(
        t.elapsed() < Duration::from_millis(100),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(got, [true, true, false], "the local share: ceil(4/2)");
    assert_eq!(shared.fallbacks()[Fallback::Down as usize].1, 3);
}

async fn futures_all(l: &Limits, n: usize) -> Vec<bool> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(l.check("ssg", "o", "registry", "persons").await.is_ok());
    }
    out
}

async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_stalled_redis_costs_at_most_the_timeout_and_is_used_again_once_back() {
    let redis = RedisServer::start()
        .await
        .expect("redis-server (package redis-server) starts");
    let timeout = Duration::from_millis(25);
    let shared = RedisQuotas::open(&redis.url, "t:", timeout).await.unwrap();
    assert!(shared.is_up());
    let l = Limits::new(
        &set("[defaults]\nofficer = { rate = \"1/h\", burst = 1000 }\n"),
        2,
    )
    .with_shared(shared.clone());
    assert!(l.check("ssg", "o", "registry", "persons").await.is_ok());

    redis.signal("-STOP");
    let t = Instant::now();
    assert!(l.check("ssg", "o", "registry", "persons").await.is_ok());
    let took = t.elapsed();
    assert!(
        took >= timeout && took < timeout * 4,
        "bounded by the timeout: {took:?}"
    );
    assert_eq!(shared.fallbacks()[Fallback::Timeout as usize].1, 1);
    assert!(!shared.is_up());
    // Marked down: the next checks do not wait at all.
    let t = Instant::now();
    for _ in 0..10 {
        assert!(l.check("ssg", "o", "registry", "persons").await.is_ok());
    }
    assert!(t.elapsed() < timeout, "{:?}", t.elapsed());
    assert_eq!(shared.fallbacks()[Fallback::Down as usize].1, 10);

    redis.signal("-CONT");
    until("the probe to see Redis back", || shared.is_up()).await;
    assert!(l.check("ssg", "o", "registry", "persons").await.is_ok());
    assert_eq!(shared.fallbacks()[Fallback::Down as usize].1, 10);
}

/// Added latency of the shared check against the local limiter, side by side:
/// `cargo test --lib limits::redis::tests::check_latency -- --ignored --nocapture`
#[tokio::test]
#[ignore = "a measurement, not a check"]
async fn check_latency() {
    let quotas = set("[defaults]\nagency = { rate = \"1000000/s\", burst = 1000000 }\nofficer = { rate = \"100000/s\", burst = 100000 }\n");
    let local = Limits::new(&quotas, 1);
    let shared = Limits::new(&quotas, 1).with_shared(shared_redis(&prefix()).await);
    let officers: Vec<String> = (0..1000).map(|i| format!("officer-{i}")).collect();
    let n = 20_000;
    let mut lat = [Vec::with_capacity(n), Vec::with_capacity(n)];
    for i in 0..n {
        let o = &officers[i % officers.len()];
        for (which, l) in [&local, &shared].into_iter().enumerate() {
            let t = Instant::now();
            let _ = l.check("ssg", o, "registry", "persons").await;
            lat[which].push(t.elapsed());
        }
    }
    for (name, mut v) in ["local", "redis"].into_iter().zip(lat) {
        v.sort();
        let p = |q: f64| v[((v.len() as f64 * q) as usize).min(v.len() - 1)];
        println!(
            "{name}: p50 {:?} p99 {:?} max {:?} ({n} checks, officer + agency quota)",
            p(0.5),
            p(0.99),
            v[v.len() - 1]
        );
    }
    let fallbacks: u64 = shared
        .shared()
        .unwrap()
        .fallbacks()
        .iter()
        .map(|f| f.1)
        .sum();
    println!("fallbacks during the run: {fallbacks}");
}
