//! The deploy files an operator runs as they are: the Kubernetes manifests
//! render and pass a schema validator, the compose file passes the
//! compose-spec schema, HAProxy accepts its configuration, each says what a
//! replicated deployment needs (node names, no built-in register, the
//! shared PKI, health on /readyz, a hardened pod) — and a ConfigMap's
//! `..data` symlink swap reaches the gateway's policy watcher.
//!
//! The validators run offline: kubernetes-validate and check-jsonschema
//! carry their schemas in their packages (.ci/deps/deploy.sh installs them).

#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{eventually, require_tool, Db, TestGateway};
use karibche::policy::Policy;
use serde_json::Value;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs a command; panics with its output unless it succeeds. Returns standard output.
fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The YAML documents of `file` as JSON values (PyYAML, which kubernetes-validate brings;
/// it resolves the compose file's `<<` merge keys as compose does).
fn yaml_documents(file: &Path) -> Vec<Value> {
    let python = require_tool("python3", "python3");
    let json = run(Command::new(python)
        .arg("-c")
        .arg(
            "import json, sys, yaml\n\
         print(json.dumps([d for d in yaml.safe_load_all(open(sys.argv[1])) if d is not None]))",
        )
        .arg(file));
    serde_json::from_str::<Vec<Value>>(&json).unwrap()
}

fn render_k8s(out: &Path) -> Vec<Value> {
    let kubectl = require_tool("kubectl", "kubectl");
    // The policies are the repository's own files, outside deploy/k8s.
    let yaml = run(Command::new(kubectl).args([
        "kustomize",
        "--load-restrictor",
        "LoadRestrictionsNone",
        repo().join("deploy/k8s").to_str().unwrap(),
    ]));
    std::fs::write(out, yaml).unwrap();
    yaml_documents(out)
}

fn args(container: &Value) -> Vec<&str> {
    container["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect()
}

#[test]
fn the_kubernetes_manifests_render_and_validate() {
    let dir = tempfile::tempdir().unwrap();
    let rendered = dir.path().join("k8s.yaml");
    let docs = render_k8s(&rendered);
    let validate = require_tool("kubernetes-validate", "kubernetes-validate (PyPI)");
    run(Command::new(validate)
        .args(["--strict", "--quiet"])
        .arg(&rendered));

    let find = |kind: &str, name: &str| -> &Value {
        docs.iter()
            .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no {kind} {name}"))
    };
    for (name, admin) in [("gateway", 9090), ("registry", 9091)] {
        let pod = &find("Deployment", name)["spec"]["template"]["spec"];
        let sc = &pod["securityContext"];
        assert_eq!(sc["runAsNonRoot"], true, "{name}");
        assert_eq!(sc["runAsUser"], 10001, "{name}");
        assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault", "{name}");
        let c = &pod["containers"][0];
        let csc = &c["securityContext"];
        assert_eq!(csc["readOnlyRootFilesystem"], true, "{name}");
        assert_eq!(csc["allowPrivilegeEscalation"], false, "{name}");
        assert_eq!(csc["capabilities"]["drop"], serde_json::json!(["ALL"]));
        assert!(c["resources"]["requests"]["memory"].is_string(), "{name}");
        assert!(c["resources"]["limits"]["memory"].is_string(), "{name}");
        let ports: Vec<i64> = c["ports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["containerPort"].as_i64().unwrap())
            .collect();
        assert!(ports.contains(&admin), "{name}: {ports:?}");
        assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz", "{name}");
        assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz", "{name}");
        assert_eq!(c["readinessProbe"]["httpGet"]["port"], "admin", "{name}");
        assert!(
            args(c).contains(&format!("0.0.0.0:{admin}").as_str()),
            "{name} serves its admin endpoint where the probes look: {:?}",
            args(c)
        );
    }
    let gateway = &find("Deployment", "gateway")["spec"];
    assert_eq!(gateway["replicas"], 2);
    let pod = &gateway["template"]["spec"];
    let c = &pod["containers"][0];
    assert!(args(c).contains(&"--no-registry"), "{:?}", args(c));
    let node = c["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "KARIBCHE_NODE")
        .expect("the node name comes from the pod");
    assert_eq!(node["valueFrom"]["fieldRef"]["fieldPath"], "metadata.name");
    let mounts = c["volumeMounts"].as_array().unwrap();
    let policies = mounts
        .iter()
        .find(|m| m["mountPath"] == "/etc/karibche/policies")
        .unwrap();
    assert!(
        policies.get("subPath").is_none(),
        "a subPath mount never sees the ConfigMap's updates"
    );
    // Every policy file of the repository is in the ConfigMap, providers.toml pointing at the Service.
    let cm = &find("ConfigMap", "karibche-policies")["data"];
    let policy = Policy::load(&repo().join("policies")).unwrap();
    for (file, _) in policy.files() {
        let key = file.replace('/', ".");
        assert!(cm.get(&key).is_some(), "{file} missing from the ConfigMap");
        let volume = pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == policies["name"])
            .unwrap();
        assert!(
            volume["configMap"]["items"]
                .as_array()
                .unwrap()
                .iter()
                .any(|i| i["key"] == key && i["path"] == file.as_str()),
            "{file} is not mounted at its path"
        );
    }
    assert!(cm["providers.toml"]
        .as_str()
        .unwrap()
        .contains("upstream = \"https://registry:8444\""));
    assert!(find("Service", "registry").is_object());
    assert_eq!(
        find("PodDisruptionBudget", "gateway")["spec"]["minAvailable"],
        1
    );
    let np = &find("NetworkPolicy", "registry-only-from-gateways")["spec"];
    assert_eq!(
        np["podSelector"]["matchLabels"]["app.kubernetes.io/name"],
        "karibche-registry"
    );
    let to_register = np["ingress"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["ports"][0]["port"] == 8444)
        .unwrap();
    assert_eq!(
        to_register["from"],
        serde_json::json!([{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "karibche-gateway"}}}])
    );
    assert!(
        !std::fs::read_to_string(&rendered)
            .unwrap()
            .contains("PRIVATE KEY"),
        "keys come from Secrets, never from the manifests"
    );
}

#[test]
fn the_compose_file_validates_and_runs_two_replicas_on_one_pki() {
    let compose = repo().join("deploy/compose.yaml");
    let check = require_tool("check-jsonschema", "check-jsonschema (PyPI)");
    run(Command::new(check)
        .args(["--builtin-schema", "vendor.compose-spec"])
        .arg(&compose));
    let doc = yaml_documents(&compose).remove(0);
    let services = doc["services"].as_object().unwrap();
    for s in ["postgres", "redis", "pki", "registry", "haproxy"] {
        assert!(services.contains_key(s), "service {s}");
    }
    let init = args_of(&services["pki"]["command"]).join(" ");
    for name in [
        "certs init",
        "--gateway-name gateway-1",
        "--gateway-name gateway-2",
        "--registry-name registry",
    ] {
        assert!(init.contains(name), "{name} in {init}");
    }
    let mut nodes = Vec::new();
    for g in ["gateway-1", "gateway-2"] {
        let svc = &services[g];
        let cmd = args_of(&svc["command"]);
        assert!(cmd.contains(&"--no-registry".to_owned()), "{g}: {cmd:?}");
        assert!(cmd.contains(&"/etc/karibche/config/gateway.toml".to_owned()));
        assert_eq!(
            svc["depends_on"]["pki"]["condition"], "service_completed_successfully",
            "{g} starts after the PKI exists"
        );
        let volumes: Vec<String> = svc["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_owned())
            .collect();
        assert!(
            volumes.contains(&"karibche-pki:/var/lib/karibche/pki:ro".to_owned()),
            "{g}: {volumes:?}"
        );
        nodes.push(
            svc["environment"]["KARIBCHE_NODE"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    assert_ne!(nodes[0], nodes[1], "each replica its own node name");
    let register = args_of(&services["registry"]["command"]).join(" ");
    assert!(
        register.contains("registry serve --listen 0.0.0.0:8444"),
        "{register}"
    );

    // The settings parse and validate as the gateway and the register read them.
    for file in [
        "deploy/config/gateway.toml",
        "deploy/k8s/config/gateway.toml",
    ] {
        let text = std::fs::read_to_string(repo().join(file)).unwrap();
        let config = parse_config(&text);
        assert!(!config.tls.generate_dev_pki, "{file}: no PKI of its own");
        assert!(
            !config.registry.enabled,
            "{file}: the register is its own service"
        );
        assert_eq!(config.admin.listen.port(), 9090, "{file}");
        assert!(
            config.limits.redis_url().is_some(),
            "{file}: quotas shared in Redis"
        );
    }
    for file in [
        "deploy/config/registry.toml",
        "deploy/k8s/config/registry.toml",
    ] {
        let config = parse_config(&std::fs::read_to_string(repo().join(file)).unwrap());
        assert!(!config.tls.generate_dev_pki, "{file}");
    }
}

/// A configuration file as the gateway reads it, validated.
fn parse_config(text: &str) -> karibche::config::Config {
    let config: karibche::config::Config = toml::from_str(text).unwrap();
    config.validate().unwrap();
    config
}

fn args_of(command: &Value) -> Vec<String> {
    match command {
        Value::Array(a) => a
            .iter()
            .flat_map(|x| x.as_str().unwrap().split_whitespace())
            .map(str::to_owned)
            .collect(),
        Value::String(s) => s.split_whitespace().map(str::to_owned).collect(),
        other => panic!("a command is a list or a string, not {other}"),
    }
}

#[test]
fn the_deploy_providers_file_is_the_repository_s_but_for_the_register_s_address() {
    let ours = std::fs::read_to_string(repo().join("policies/providers.toml")).unwrap();
    let deploy = std::fs::read_to_string(repo().join("deploy/config/providers.toml")).unwrap();
    let differing: Vec<(&str, &str)> = ours
        .lines()
        .zip(deploy.lines())
        .filter(|(a, b)| a != b)
        .collect();
    assert_eq!(ours.lines().count(), deploy.lines().count());
    assert_eq!(
        differing,
        [(
            "upstream = \"builtin:registry\"",
            "upstream = \"https://registry:8444\" # deploy/: the register as its own service (compose service / k8s Service \"registry\")"
        )],
        "regenerate deploy/config/providers.toml from policies/providers.toml (README: Running several replicas)"
    );
}

#[test]
fn haproxy_accepts_its_configuration() {
    let haproxy = require_tool("haproxy", "haproxy");
    let cfg = repo().join("deploy/haproxy/haproxy.cfg");
    run(Command::new(haproxy).arg("-c").arg("-f").arg(&cfg));
    let text = std::fs::read_to_string(&cfg).unwrap();
    for needle in [
        "mode tcp",
        "option httpchk",
        "uri /readyz",
        "check port 9090",
    ] {
        assert!(text.contains(needle), "{needle}");
    }
    assert!(
        !text.contains("ssl crt"),
        "TLS passes through: the gateway checks the client certificate"
    );
}

/// A policy directory laid out as kubelet lays out a ConfigMap volume: the files in a
/// timestamped directory, `..data` pointing at it, each top-level name a symlink through `..data`.
fn kubelet_dir(root: &Path, stamp: &str, files: &[(String, String)]) {
    let data = root.join(stamp);
    for (rel, text) in files {
        let path = data.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }
}

/// kubelet's update: a new timestamped directory, `..data_tmp` -> it, renamed over `..data`
/// (the one atomic step), then the old directory removed.
fn kubelet_swap(root: &Path, old: &str, new: &str, files: &[(String, String)]) {
    kubelet_dir(root, new, files);
    std::os::unix::fs::symlink(new, root.join("..data_tmp")).unwrap();
    std::fs::rename(root.join("..data_tmp"), root.join("..data")).unwrap();
    std::fs::remove_dir_all(root.join(old)).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configmap_symlink_swap_reloads_the_policy() {
    let src = repo().join("policies");
    let files: Vec<(String, String)> = Policy::load(&src)
        .unwrap()
        .files()
        .iter()
        .map(|(rel, _)| (rel.clone(), std::fs::read_to_string(src.join(rel)).unwrap()))
        .collect();
    let root = tempfile::tempdir().unwrap();
    let first = "..2026_12_01_10_00_00.000000001";
    kubelet_dir(root.path(), first, &files);
    std::os::unix::fs::symlink(first, root.path().join("..data")).unwrap();
    let mut top: Vec<&str> = files
        .iter()
        .map(|(rel, _)| rel.split('/').next().unwrap())
        .collect();
    top.dedup();
    for name in top {
        std::os::unix::fs::symlink(format!("..data/{name}"), root.path().join(name)).unwrap();
    }
    let policies = root.path().to_path_buf();
    let gw = TestGateway::start_configured(Db::Sqlite, move |c, _| c.policies_dir = policies)
        .await
        .unwrap();
    let before = gw.running.started.policy_version.clone();
    assert_eq!(before, Policy::load(&src).unwrap().version());

    let edited: Vec<(String, String)> = files
        .iter()
        .map(|(rel, text)| {
            let text = if rel == "agencies/mia-border.toml" {
                text.replacen("\"documents\", ", "", 1)
            } else {
                text.clone()
            };
            (rel.clone(), text)
        })
        .collect();
    assert_ne!(edited, files, "the edit changes a grant");
    kubelet_swap(
        root.path(),
        first,
        "..2026_12_01_10_05_00.000000002",
        &edited,
    );
    let expected = Policy::load(root.path()).unwrap().version().to_owned();
    assert_ne!(expected, before);
    let policy = gw.running.gateway.policy.clone();
    assert!(
        eventually(Duration::from_secs(10), async || policy.load().version()
            == expected)
        .await,
        "the watcher did not follow the ..data swap"
    );
    let records = karibche::audit::query(&gw.running.store, &Default::default())
        .await
        .unwrap();
    let reload = records
        .iter()
        .find(|r| r.entry.path == "policy-reload")
        .expect("the reload is recorded");
    assert!(
        reload
            .entry
            .reason
            .as_deref()
            .unwrap()
            .contains("by file-watch; changed agencies/mia-border.toml"),
        "{:?}",
        reload.entry.reason
    );

    // And again: the watch outlives the directory it first saw (kubelet removed it).
    kubelet_swap(
        root.path(),
        "..2026_12_01_10_05_00.000000002",
        "..2026_12_01_10_10_00.000000003",
        &files,
    );
    assert!(
        eventually(Duration::from_secs(10), async || policy.load().version()
            == before)
        .await,
        "the second swap was missed"
    );
    gw.shutdown().await;
}
