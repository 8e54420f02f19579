//! The command line as scripts use it, through the real binary: a reader
//! that stops early (`| head`) is a normal end for every command that writes
//! to standard output, and `token issue` refuses at once a token the gateway
//! would refuse.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use karibche::audit::{AuditConfig, AuditLog, Entry};
use karibche::store::Store;

/// Records written for the pipe tests: their export, table and report are over twice a pipe's 64 KiB buffer.
const RECORDS: usize = 1200;
const SUBJECT: &str = "RF-0000001";

fn policies() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("policies")
}

fn karibche(data: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_karibche"));
    c.args(["--data-dir", data.to_str().unwrap()])
        .args(["--policies", policies().to_str().unwrap()])
        .args(args)
        .env("RUST_LOG", "warn");
    c
}

/// A data directory with an audit log of [`RECORDS`] reads of [`SUBJECT`] and the agencies' token keys.
async fn data_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("var");
    let store = Store::connect(&format!("sqlite://{}", data.join("karibche.db").display()))
        .await
        .unwrap();
    let (log, writer) = AuditLog::start(store.clone(), AuditConfig::new("node-1"))
        .await
        .unwrap();
    for i in 0..RECORDS {
        log.append(Entry {
            id: uuid::Uuid::now_v7().to_string(),
            ts: karibche::audit::now_ts(),
            agency: Some("mia-border".into()),
            officer: Some(format!("officer-{i}")),
            purpose: Some("border-control".into()),
            provider: Some("registry".into()),
            service: Some("persons".into()),
            operation: Some("read".into()),
            method: "GET".into(),
            path: format!("/v1/registry/persons/{SUBJECT}"),
            subjects: vec![SUBJECT.into()],
            fields: vec!["names.surname".into(), "documents.number".into()],
            decision: "allow".into(),
            status: 200,
            policy_version: "v1".into(),
            ..Entry::default()
        })
        .await
        .unwrap();
    }
    drop(log);
    writer.finish().await;
    store.close().await;
    karibche::devpki::ensure_signing_keys(&data.join("keys"), &["mia-border"]).unwrap();
    dir
}

/// Runs with standard output a pipe whose reader is already gone: the first write fails.
fn with_closed_stdout(mut cmd: Command) -> Output {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    cmd.stdout(Stdio::from(writer))
        .stderr(Stdio::piped())
        .output()
        .unwrap()
}

/// Runs, reads the first line of standard output and closes it, as `| head -1` does.
fn first_line_only(mut cmd: Command) -> (String, Output) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    (first, child.wait_with_output().unwrap())
}

fn assert_quiet_success(what: &str, out: &Output) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "{what}: exit {:?}, standard error: {stderr}",
        out.status.code()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_stops_early_is_a_normal_end_for_every_command() {
    let dir = data_dir().await;
    let data = dir.path().join("var");
    let explain = [
        "policy",
        "explain",
        "--agency",
        "mia-border",
        "--purpose",
        "border-control",
        "--path",
        "/v1/registry/persons/RF-0000001",
    ];
    let token = [
        "token",
        "issue",
        "--agency",
        "mia-border",
        "--officer",
        "o-1",
        "--purpose",
        "border-control",
    ];
    let commands: Vec<Vec<&str>> = vec![
        vec!["audit", "report", "--subject", SUBJECT],
        vec!["audit", "report", "--subject", SUBJECT, "--format", "json"],
        vec!["audit", "export"],
        vec!["audit", "query"],
        vec!["audit", "query", "--format", "jsonl"],
        vec!["audit", "verify"],
        vec!["policy", "check"],
        vec!["policy", "test"],
        vec!["policy", "schema"],
        explain.to_vec(),
        token.to_vec(),
        vec!["consent", "list"],
        vec!["certs", "status"],
    ];
    for args in &commands {
        let out = with_closed_stdout(karibche(&data, args));
        assert_quiet_success(&args.join(" "), &out);
    }
    // The reader takes one line, then goes: the writer is mid-way through far more than a pipe holds.
    for args in [
        vec!["audit", "report", "--subject", SUBJECT],
        vec!["audit", "export"],
        vec!["audit", "query"],
    ] {
        let whole = karibche(&data, &args).output().unwrap();
        assert!(whole.status.success());
        assert!(
            whole.stdout.len() > 128 * 1024,
            "{} writes only {} bytes",
            args.join(" "),
            whole.stdout.len()
        );
    }
    for args in [
        vec!["audit", "report", "--subject", SUBJECT],
        vec!["audit", "export"],
        vec!["audit", "query"],
    ] {
        let (first, out) = first_line_only(karibche(&data, &args));
        assert!(!first.is_empty(), "{}: no first line", args.join(" "));
        assert_quiet_success(&args.join(" "), &out);
    }
    // Read to the end, the same commands still write everything.
    let out = karibche(&data, &["audit", "export"]).output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).lines().count(),
        RECORDS
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_issue_refuses_what_the_gateway_would_refuse_with_every_reason() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("var");
    karibche::devpki::ensure_signing_keys(&data.join("keys"), &["mia-border"]).unwrap();
    let issue = |extra: &[&str]| {
        let mut args = vec![
            "token",
            "issue",
            "--agency",
            "mia-border",
            "--officer",
            "o-1",
        ];
        args.extend_from_slice(extra);
        karibche(&data, &args).output().unwrap()
    };

    let out = issue(&["--purpose", "curiosity", "--ttl", "99h"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(out.stdout.is_empty(), "no token is printed");
    assert!(
        stderr.contains("the gateway would refuse this token")
            && stderr.contains("purpose \"curiosity\" is not in the purpose vocabulary")
            && stderr.contains("border-control")
            && stderr.contains("lifetime 4days 3h is longer than the gateway accepts")
            && stderr.contains("tokens.max_lifetime = 15m"),
        "both problems, at once: {stderr}"
    );

    // The maximum comes from the configuration.
    std::fs::write(
        dir.path().join("k.toml"),
        "[tokens]\nmax_lifetime = \"2h\"\n",
    )
    .unwrap();
    let cfg = dir.path().join("k.toml");
    let mut args = vec!["--config", cfg.to_str().unwrap()];
    args.extend([
        "token",
        "issue",
        "--agency",
        "mia-border",
        "--officer",
        "o-1",
        "--purpose",
        "border-control",
        "--ttl",
        "90m",
    ]);
    let out = karibche(&data, &args).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = issue(&["--purpose", "border-control", "--ttl", "16m"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("lifetime 16m"), "{stderr}");

    // A token the gateway accepts is printed: three base64url parts.
    let out = issue(&["--purpose", "border-control", "--ttl", "10m"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .split('.')
            .count(),
        3
    );
}
