//! A benchmark of the group-commit writer (not a timed test): durable records
//! per second with many requests per transaction, against one transaction per
//! record, on the same store, in one run. `karibche audit bench` prints it.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{AuditConfig, AuditError, AuditLog, Entry};
use crate::store::Store;

/// Throughput of one writer configuration.
#[derive(Debug, Clone)]
pub struct Run {
    /// Most records per transaction.
    pub max_batch: usize,
    /// Records committed.
    pub records: u64,
    /// Transactions committed.
    pub batches: u64,
    /// Wall time.
    pub elapsed: Duration,
}

impl Run {
    /// Durable records per second.
    pub fn per_second(&self) -> f64 {
        self.records as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Group commit against one transaction per record.
#[derive(Debug, Clone)]
pub struct BenchReport {
    /// Concurrent callers.
    pub concurrency: usize,
    /// The group-commit writer.
    pub group: Run,
    /// One transaction per record.
    pub single: Run,
}

impl fmt::Display for BenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (name, r) in [
            ("group commit", &self.group),
            ("one tx/record", &self.single),
        ] {
            writeln!(
                f,
                "{name:>14}: {:>7} records in {:>6.2} s = {:>9.0} records/s ({} transactions, {:.1} records each)",
                r.records,
                r.elapsed.as_secs_f64(),
                r.per_second(),
                r.batches,
                r.records as f64 / r.batches.max(1) as f64
            )?;
        }
        writeln!(
            f,
            "ratio: group commit is {:.1}x one transaction per record ({} concurrent callers)",
            self.group.per_second() / self.single.per_second().max(1e-9),
            self.concurrency
        )
    }
}

/// Appends `records` entries from `concurrency` callers through a writer with `max_batch`.
async fn run(
    store: &Store,
    node: &str,
    max_batch: usize,
    records: usize,
    concurrency: usize,
) -> Result<Run, AuditError> {
    let mut config = AuditConfig::new(node);
    config.max_batch = max_batch;
    let (log, writer) = AuditLog::start(store.clone(), config).await?;
    let per_task = records.div_ceil(concurrency.max(1));
    let node = Arc::new(node.to_owned());
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(concurrency);
    for t in 0..concurrency {
        let log = log.clone();
        let node = node.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..per_task {
                log.append(sample(&node, t, i)).await?;
            }
            Ok::<_, AuditError>(())
        }));
    }
    for t in tasks {
        t.await.map_err(|_| AuditError::Closed)??;
    }
    let elapsed = started.elapsed();
    let stats = log.stats();
    log.close();
    drop(log);
    writer.finish().await;
    Ok(Run {
        max_batch,
        records: stats.committed,
        batches: stats.batches,
        elapsed,
    })
}

/// A plausible record of a register read.
fn sample(node: &str, task: usize, i: usize) -> Entry {
    Entry {
        id: format!("{node}-{task}-{i}"),
        ts: super::now_ts(),
        agency: Some("mia-border".into()),
        certificate: Some("ab".repeat(32)),
        officer: Some(format!("officer-{task}")),
        purpose: Some("border-control".into()),
        legal_basis: Some("Law of Georgia on the State Border".into()),
        token_id: Some(uuid::Uuid::now_v7().to_string()),
        provider: Some("registry".into()),
        service: Some("persons".into()),
        operation: Some("read".into()),
        method: "GET".into(),
        path: format!("/v1/registry/persons/RF-{:07}", i % 10_000),
        subjects: vec![format!("RF-{:07}", i % 10_000)],
        fields: vec![
            "id".into(),
            "names".into(),
            "documents".into(),
            "visas".into(),
        ],
        decision: "allow".into(),
        status: 200,
        policy_version: "bench".into(),
        ..Entry::default()
    }
}

/// Runs both configurations on `store` (use a scratch database: it writes bench-* nodes).
pub async fn bench(
    store: &Store,
    records: usize,
    concurrency: usize,
) -> Result<BenchReport, AuditError> {
    let tag = uuid::Uuid::now_v7().simple().to_string();
    let group = run(
        store,
        &format!("bench-group-{tag}"),
        512,
        records,
        concurrency,
    )
    .await?;
    let single = run(
        store,
        &format!("bench-single-{tag}"),
        1,
        records,
        concurrency,
    )
    .await?;
    Ok(BenchReport {
        concurrency,
        group,
        single,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A smoke run so the benchmark never rots; it checks counts, not speed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bench_smoke() {
        let (store, _dir) = crate::testing::sqlite_store().await;
        let report = bench(&store, 200, 20).await.unwrap();
        assert_eq!(report.group.records, 200);
        assert_eq!(report.single.records, 200);
        assert_eq!(report.single.batches, 200, "one transaction per record");
        assert!(report.group.batches < 200, "group commit batches records");
        assert!(crate::audit::verify(&store, None).await.unwrap().intact());
        assert!(report.to_string().contains("ratio"));
    }
}
