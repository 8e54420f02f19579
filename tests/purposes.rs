//! Restricted interest stays restricted; purposes cannot be shopped (issue
//! 14, §2), over real mutual TLS and through the `karibche` binary.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::Command;

use common::PERSON;
use common::{Db, TestGateway};
use http::StatusCode;

/// Runs the binary; returns the exit code and stdout + stderr.
fn karibche(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_karibche"))
        .args(args)
        .env("RUST_LOG", "error")
        .output()
        .unwrap();
    (
        out.status.code().unwrap(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

fn repo_policies() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("policies")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_look_up_of_the_log_is_not_a_read_and_a_restricted_interest_stays_restricted() {
    // SQLite: the command-line report below reads the data directory's database.
    let gw = TestGateway::start_with(Db::Sqlite).await.unwrap();
    let border = gw.token("mia-border", "border-control", None);
    let read = gw
        .client("mia-border")
        .get(&format!("/v1/registry/persons/{PERSON}"), Some(&border))
        .await;
    assert_eq!(read.status, StatusCode::OK);
    // The State Security Service asks the auditors' API about the person…
    let ssg = gw.token("ssg", "internal-audit", None);
    let ssg_lookup = gw
        .client("ssg")
        .get(&format!("/v1/audit/records?subject={PERSON}"), Some(&ssg))
        .await;
    assert_eq!(ssg_lookup.status, StatusCode::OK);
    // …which reveals its interest in the person as much as a read would: restricted.
    let e = gw.record_of(&ssg_lookup).await.entry;
    assert!(e.restricted, "{e:?}");
    assert_eq!(e.subjects, [PERSON]);
    // An agency without restricted grants looks the log up too: not restricted.
    let internal = gw.token("mia-border", "internal-audit", None);
    let border_lookup = gw
        .client("mia-border")
        .get(
            &format!("/v1/audit/records?subject={PERSON}"),
            Some(&internal),
        )
        .await;
    assert_eq!(border_lookup.status, StatusCode::OK);
    assert!(!gw.record_of(&border_lookup).await.entry.restricted);

    // The person's report, as the supervisory authority hands it out.
    let pdps = gw.token("pdps", "supervision", None);
    let r = gw
        .client("pdps")
        .get(&format!("/v1/audit/report?subject={PERSON}"), Some(&pdps))
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let report = r.json();
    let accesses = report["accesses"].as_array().unwrap();
    let find = |id: &str| accesses.iter().find(|a| a["record_id"] == id);
    assert_eq!(find(&read.request_id()).unwrap()["what"], "record");
    assert_eq!(
        find(&border_lookup.request_id()).unwrap()["what"],
        "access-log"
    );
    assert!(
        find(&ssg_lookup.request_id()).is_none(),
        "restricted: not yet"
    );
    assert!(!String::from_utf8_lossy(&r.body).contains("ssg"));

    let data = gw.config.data_dir.clone();
    let TestGateway { running, dir, .. } = gw;
    running.shutdown().await;
    let policies = repo_policies();
    let base = [
        "--data-dir",
        data.to_str().unwrap(),
        "--policies",
        policies.to_str().unwrap(),
    ];
    let (code, text) = karibche(&[&base[..], &["audit", "report", "--subject", PERSON]].concat());
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("(mia-border) read your record for: Border checks"),
        "{text}"
    );
    assert!(
        text.contains("(mia-border) looked up the access log about your record"),
        "{text}"
    );
    assert!(!text.contains("State Security"), "{text}");
    let (code, json) = karibche(
        &[
            &base[..],
            &["audit", "report", "--subject", PERSON, "--format", "json"],
        ]
        .concat(),
    );
    assert_eq!(code, 0, "{json}");
    assert!(json.contains("\"what\": \"access-log\""), "{json}");

    // Once the restricted delay has passed, the Service's look-up appears, as a look-up.
    let config = dir.path().join("no-delay.toml");
    std::fs::write(&config, "[audit]\nrestricted_report_delay = \"0s\"\n").unwrap();
    let (code, text) = karibche(
        &[
            &["--config", config.to_str().unwrap()][..],
            &base[..],
            &["audit", "report", "--subject", PERSON],
        ]
        .concat(),
    );
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains(
            "State Security Service of Georgia (ssg) looked up the access log about your record"
        ),
        "{text}"
    );
    assert!(
        !text.contains("(ssg) read your record"),
        "a read of the log is not a read of the record: {text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_labour_ministry_cannot_shop_for_a_purpose_without_consent() {
    let gw = TestGateway::start().await;
    let client = gw.client("molhsa");
    let path = format!("/v1/registry/persons/{PERSON}");
    // The purpose that needs consent: refused without it.
    let assistance = gw.token("molhsa", "social-assistance", None);
    let r = client.get(&path, Some(&assistance)).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(r.json()["type"], "urn:karibche:problem:consent-required");
    // The purpose that needs none no longer reaches the residence data the consent protects.
    let review = gw.token("molhsa", "work-permit-review", None);
    let r = client.get(&path, Some(&review)).await;
    assert_eq!(r.status, StatusCode::OK);
    let paths = common::leaf_paths(&r.json());
    assert!(
        !paths.iter().any(|p| p.starts_with("residence_permits")),
        "{paths:?}"
    );
    assert!(paths.iter().any(|p| p.starts_with("names.")));
    let data = gw.config.data_dir.clone();
    let TestGateway {
        running,
        dir: _keep,
        ..
    } = gw;
    running.shutdown().await;
    // Against this system's data directory, so its token keys are there to check too.
    let check = |policies: &Path| {
        karibche(&[
            "--data-dir",
            data.to_str().unwrap(),
            "policy",
            "check",
            policies.to_str().unwrap(),
        ])
    };

    // The shipped policies check clean: every overlap is explained.
    let (code, text) = check(&repo_policies());
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("0 warning(s)"), "{text}");
    assert!(!text.contains("warning:"), "{text}");

    // The old grant is named, with file:line and the fields.
    let dir = tempfile::tempdir().unwrap();
    let policies = common::copy_policies(dir.path());
    let file = policies.join("agencies/molhsa.toml");
    let text = std::fs::read_to_string(&file).unwrap();
    let old = text.replace(
        "\"names\", \"birth_date\", \"nationalities\", \"work_permits\",\n",
        "\"names\", \"birth_date\", \"nationalities\", \"work_permits\",\n    \"residence_permits.type\", \"residence_permits.valid_until\",\n",
    );
    assert_ne!(old, text);
    std::fs::write(&file, old).unwrap();
    let (code, out) = check(&policies);
    assert_eq!(code, 0, "warnings do not stop a policy: {out}");
    assert!(out.contains("agencies/molhsa.toml:"), "{out}");
    assert!(
        out.contains("grant molhsa#0 releases residence_permits.type, residence_permits.valid_until of registry/persons without consent"),
        "{out}"
    );
    assert!(out.contains("1 warning(s)"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_case_reference_must_be_a_case_number_of_the_agency() {
    let gw = TestGateway::start().await;
    let client = gw.client("ssg");
    let path = format!("/v1/registry/persons/{PERSON}");
    let purpose = "national-security-investigation";
    for placeholder in [
        "-",
        "null",
        "\u{200B}",
        "SSG-2026-17\u{200B}",
        "case 17",
        "2026-17",
    ] {
        let token = gw.token("ssg", purpose, Some(placeholder));
        let r = client.get(&path, Some(&token)).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{placeholder:?}");
        let p = r.json();
        assert_eq!(p["type"], "urn:karibche:problem:access-denied");
        assert!(
            p["detail"].as_str().unwrap().contains("SSG-"),
            "the detail names the expected form: {p}"
        );
        let e = gw.record_of(&r).await.entry;
        assert_eq!(
            e.reason.as_deref(),
            Some("case_ref_invalid"),
            "{placeholder:?}"
        );
        assert!(e.fields.is_empty() && e.response_digest.is_none());
    }
    // A control character in any claim is refused with the token (issue 13), before any grant.
    let token = gw.token("ssg", purpose, Some("\0"));
    let r = client.get(&path, Some(&token)).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        gw.record_of(&r).await.entry.reason.as_deref(),
        Some("token_claim_invalid")
    );
    let token = gw.token("ssg", purpose, Some("SSG-2026-17"));
    assert_eq!(client.get(&path, Some(&token)).await.status, StatusCode::OK);
    gw.shutdown().await;

    // A case_format that is not a regular expression is a policy error at file:line.
    let dir = tempfile::tempdir().unwrap();
    let policies = common::copy_policies(dir.path());
    let file = policies.join("agencies/ssg.toml");
    let text = std::fs::read_to_string(&file).unwrap();
    std::fs::write(
        &file,
        text.replace(
            "case_format = 'SSG-\\d{4}-\\d{1,6}'",
            "case_format = 'SSG-(\\d{4}'",
        ),
    )
    .unwrap();
    let (code, out) = karibche(&["policy", "check", policies.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("agencies/ssg.toml:8:15: case_format is not a valid regular expression"),
        "{out}"
    );
}
