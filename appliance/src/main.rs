//! `appliance`: the DR appliance daemon and its command-line tools; this file only parses the
//! command line (`cli/`) and turns the outcome into an exit status.
//!
//! Exit status: 0 on success, 2 when the input is at fault (a corrupt stream, an unknown point,
//! a bad argument, an API answer 400/403/404/409), 1 when the machine is (I/O errors, an
//! unreachable API, a failed job and the like).

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches};

use appliance::offline;

mod cli;
mod config;

fn main() -> ExitCode {
    // Logs go to stderr; RUST_LOG overrides the default level (info).
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    // Parsed in two steps: `enable` needs the raw matches to keep the order of its disks.
    let matches = cli::Cli::command().get_matches();
    let cli = cli::Cli::from_arg_matches(&matches).unwrap_or_else(|error| error.exit());
    match cli::dispatch(cli, &matches) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {}", appliance::store::describe(&error));
            if let Some(failure) = error.downcast_ref::<cli::Failure>() {
                ExitCode::from(failure.exit)
            } else if error.downcast_ref::<offline::BadInput>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
