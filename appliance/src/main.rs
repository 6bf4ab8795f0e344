//! `appliance`: the DR appliance daemon and its command-line tools.

use std::fs::File;
use std::io::BufReader;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod inspect;

#[derive(Parser, Debug)]
#[command(
    name = "appliance",
    version,
    about = "DR appliance: replica disks, recovery points, failover"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Delta-stream files.
    Stream {
        #[command(subcommand)]
        command: StreamCommand,
    },
}

#[derive(Subcommand, Debug)]
enum StreamCommand {
    /// Validate a delta-stream file and print a summary per frame kind.
    ///
    /// Exit status: 0 when valid, 2 when the stream is corrupt or unreadable (one error line
    /// naming the frame index, byte offset and reason).
    Inspect {
        /// The stream file.
        file: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Stream {
            command: StreamCommand::Inspect { file },
        } => {
            let opened = match File::open(&file) {
                Ok(opened) => opened,
                Err(error) => {
                    eprintln!("error: {}: cannot open: {error}", file.display());
                    return ExitCode::from(2);
                }
            };
            match inspect::inspect(BufReader::with_capacity(1 << 20, opened)) {
                Ok(report) => {
                    println!("{}", inspect::render(&report));
                    ExitCode::SUCCESS
                }
                Err(error) => {
                    eprintln!("error: {}: {error}", file.display());
                    ExitCode::from(2)
                }
            }
        }
    }
}
