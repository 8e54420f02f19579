//! `karibche health`: asks a node's admin endpoint whether it is ready, for
//! container HEALTHCHECKs, load balancers' scripts and operators.
//!
//! GET `/readyz` over plain HTTP (the admin endpoint listens on a private
//! interface, without TLS), bounded by a timeout; exit 0 when it answers 200,
//! 1 otherwise, with one line on standard error saying why.

use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use clap::Args;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// `karibche health` options.
#[derive(Debug, Args)]
pub struct HealthArgs {
    /// The readiness URL to ask.
    #[arg(
        long,
        value_name = "URL",
        default_value = "http://127.0.0.1:9090/readyz"
    )]
    pub url: String,
    /// How long to wait for the whole answer.
    #[arg(long, value_name = "DURATION", default_value = "3s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

/// Why a node is not healthy.
#[derive(Debug, thiserror::Error)]
enum Unhealthy {
    #[error("{0}: not an http:// URL")]
    Url(String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("cannot reach the admin endpoint: {0}")]
    Unreachable(String),
    #[error("not ready ({status}): {body}")]
    NotReady { status: u16, body: String },
}

/// Runs `karibche health`: exit 0 when `/readyz` answers 200, 1 otherwise.
pub async fn run(args: &HealthArgs) -> anyhow::Result<ExitCode> {
    match tokio::time::timeout(args.timeout, ask(&args.url))
        .await
        .unwrap_or(Err(Unhealthy::Timeout(args.timeout)))
    {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(why) => {
            eprintln!("karibche health: {why}");
            Ok(ExitCode::FAILURE)
        }
    }
}

/// An error with its causes, "client error (Connect): tcp connect error: Connection refused …".
fn with_causes(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut cause = err.source();
    while let Some(c) = cause {
        let more = c.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        cause = c.source();
    }
    text
}

async fn ask(url: &str) -> Result<(), Unhealthy> {
    let uri: http::Uri = url.parse().map_err(|_| Unhealthy::Url(url.to_owned()))?;
    if uri.scheme_str() != Some("http") {
        return Err(Unhealthy::Url(url.to_owned()));
    }
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let resp = client
        .get(uri)
        .await
        .map_err(|e| Unhealthy::Unreachable(with_causes(&e)))?;
    let status = resp.status();
    if status == http::StatusCode::OK {
        return Ok(());
    }
    let body = resp
        .into_body()
        .collect()
        .await
        .map(|b| {
            String::from_utf8_lossy(&b.to_bytes())
                .chars()
                .take(500)
                .collect()
        })
        .unwrap_or_default();
    Err(Unhealthy::NotReady {
        status: status.as_u16(),
        body,
    })
}
