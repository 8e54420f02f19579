//! The `karibche` binary: parse the command line, run the command.

#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = karibche::cli::Cli::parse();
    match karibche::cli::run(cli).await {
        Ok(code) => code,
        Err(err) => {
            eprintln!("karibche: {}", karibche::cli::error_message(&err));
            ExitCode::FAILURE
        }
    }
}
