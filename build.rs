//! Build facts for `karibche --version` and `karibche_build_info`: the commit
//! and its date, from git when the tree is a checkout, else from
//! `KARIBCHE_BUILD_COMMIT` / `KARIBCHE_BUILD_DATE` in the environment, else
//! "unknown". No network; a tree without `.git` (a source archive, a
//! container build context) builds all the same.

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let s = String::from_utf8(out.stdout).ok()?.trim().to_owned();
    (!s.is_empty()).then_some(s)
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    // `sqlx::migrate!` embeds migrations/ at compile time but does not tell cargo, so an
    // added migration would otherwise be missed by an incremental build.
    println!("cargo:rerun-if-changed=migrations");
    println!("cargo:rerun-if-env-changed=KARIBCHE_BUILD_COMMIT");
    println!("cargo:rerun-if-env-changed=KARIBCHE_BUILD_DATE");
    let from_env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let commit = from_env("KARIBCHE_BUILD_COMMIT")
        .or_else(|| git(&["rev-parse", "--short=12", "HEAD"]))
        .unwrap_or_else(|| "unknown".to_owned());
    let date = from_env("KARIBCHE_BUILD_DATE")
        .or_else(|| git(&["log", "-1", "--format=%cs", "HEAD"]))
        .unwrap_or_else(|| "unknown".to_owned());
    // Rebuilt when the checked-out commit moves, and only then.
    if let Some(head) = git(&["rev-parse", "--path-format=absolute", "--git-path", "HEAD"]) {
        println!("cargo:rerun-if-changed={head}");
        if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
            if let Some(r) = git(&["rev-parse", "--path-format=absolute", "--git-path", &branch]) {
                if std::path::Path::new(&r).exists() {
                    println!("cargo:rerun-if-changed={r}");
                }
            }
        }
    }
    println!("cargo:rustc-env=KARIBCHE_BUILD_COMMIT={commit}");
    println!("cargo:rustc-env=KARIBCHE_BUILD_DATE={date}");
}
