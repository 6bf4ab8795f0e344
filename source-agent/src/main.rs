//! `source-agent`: protects a VM's disks. `run` is the daemon; `status`, `bookmark`,
//! `quiesce` and `resume` talk to a running daemon over its control socket.
//!
//! Exit status: 0 on success, 1 when the agent refused or something failed (the message on
//! stderr names what), 2 on a usage error.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use source_agent::config::Config;
use source_agent::control::client;
use source_agent::control::protocol::{ConsistencyName, Request, Response};

mod show;

/// Protects a VM's disks: serves each over NBD, writes every write through to the disk, and
/// streams it to the appliance.
#[derive(Debug, Parser)]
#[command(
    name = "source-agent",
    version,
    about,
    long_about = "Protects a VM's disks against an appliance item.\n\n\
        `source-agent run` serves each disk named in the config over NBD (qemu, libvirt, the \
        kernel's nbd client or nbdfuse attach it), writes every write through to the disk, and \
        streams it to the appliance's data port. A FLUSH from the client makes a \
        crash-consistent bookmark (at most one per bookmark_interval_ms). The other commands \
        talk to the running agent over its control socket.\n\n\
        Exit status: 0 on success, 1 when the agent refused or something failed (the message \
        on stderr names what), 2 on a usage error.\n\n\
        See docs/design/source-agent.md."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Which running agent to talk to.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
struct Target {
    /// The agent's config file: its control socket is `control_socket` (default
    /// `<state_dir>/control.sock`).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The agent's control socket, directly.
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
}

impl Target {
    fn socket(&self) -> anyhow::Result<PathBuf> {
        match (&self.socket, &self.config) {
            (Some(socket), _) => Ok(socket.clone()),
            (None, Some(config)) => Ok(Config::load(config)?.control_socket),
            (None, None) => anyhow::bail!("name the agent with --config FILE or --socket PATH"),
        }
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the agent: serve the disks over NBD and stream their writes to the appliance.
    ///
    /// Prints, in this order: the version, item and appliance; `NBD server listening on
    /// IP:PORT`; one `disk NAME: nbd://IP:PORT/NAME (SIZE bytes, PATH)` line per disk;
    /// `control socket: PATH`; `ready`. Then serves until SIGTERM or SIGINT, and shuts down
    /// gracefully: stops the NBD server, lets the sender deliver for up to 30 s, saves the
    /// change maps. Disks are served even while the appliance is unreachable; what it has not
    /// acknowledged is kept in the change map and resent later.
    #[command(
        after_long_help = "Example:\n  source-agent run --config /etc/source-agent/web-1.toml"
    )]
    Run {
        /// The config file (TOML; see docs/design/source-agent.md for every key).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Show the running agent's link, sequence numbers, backlog and per-disk counters.
    ///
    /// Per disk: bytes written by the VM since the start, sent directly, resent from the disk
    /// by the catch-up, recovered (marked unsent at start), and unsent now.
    #[command(
        after_long_help = "Examples:\n  source-agent status --config /etc/source-agent/web-1.toml\n  \
        source-agent status --socket /run/source-agent/web-1.sock --json"
    )]
    Status {
        #[command(flatten)]
        target: Target,
        /// Print the status as one JSON object (the `CaptureStatus` of the docs).
        #[arg(long)]
        json: bool,
    },
    /// Take a bookmark now: a recovery point at the appliance covering every disk.
    ///
    /// Refused while the agent is catching up (the replica is not consistent then) or
    /// quiesced. Prints `bookmark ID seq SEQ (CONSISTENCY)`; the appliance's recovery point
    /// for it has the same bookmark id.
    #[command(
        after_long_help = "Examples:\n  source-agent bookmark --config /etc/source-agent/web-1.toml --label before-upgrade\n  \
        source-agent bookmark --config web-1.toml --freeze /mnt/web-1 --label nightly --wait-secs 60"
    )]
    Bookmark {
        #[command(flatten)]
        target: Target,
        /// Mark the bookmark application-consistent (you quiesced the applications yourself).
        #[arg(long)]
        app: bool,
        /// Text stored with the recovery point (at most 256 bytes).
        #[arg(long, value_name = "TEXT", default_value = "")]
        label: String,
        /// Freeze this mounted filesystem (`fsfreeze -f`) around the bookmark and thaw it
        /// after (`fsfreeze -u`, always, also on error). Repeatable: frozen in order, thawed
        /// in reverse. Implies --app. The agent runs fsfreeze, so it needs CAP_SYS_ADMIN.
        /// Never name the filesystem that holds the agent's disk images or state directory.
        #[arg(long, value_name = "MOUNTPOINT")]
        freeze: Vec<PathBuf>,
        /// Wait up to N seconds for the appliance to acknowledge the bookmark as durable
        /// (at most 3600); without it the command returns once the bookmark is in the stream.
        #[arg(long, value_name = "N")]
        wait_secs: Option<u64>,
        /// Print the bookmark as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Planned failover: refuse new writes, drain everything to the appliance, take a final
    /// bookmark and wait for its acknowledgement.
    ///
    /// After it succeeds, the appliance holds every write the VM made: fail over to that
    /// bookmark's point (`appliance failover ITEM --point latest --source-shut-down`). Writes
    /// stay refused (the VM sees I/O errors) until `resume`; shut the VM down first.
    #[command(
        after_long_help = "Example:\n  source-agent quiesce --config /etc/source-agent/web-1.toml --label planned-failover --timeout-secs 300"
    )]
    Quiesce {
        #[command(flatten)]
        target: Target,
        /// Mark the final bookmark application-consistent.
        #[arg(long)]
        app: bool,
        /// Text stored with the final recovery point.
        #[arg(long, value_name = "TEXT", default_value = "")]
        label: String,
        /// How long to drain and wait for the acknowledgement (default 60, at most 3600).
        #[arg(long, value_name = "N")]
        timeout_secs: Option<u64>,
        /// Print the bookmark as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Accept writes again after `quiesce` (a failover that was called off).
    #[command(
        after_long_help = "Example:\n  source-agent resume --config /etc/source-agent/web-1.toml"
    )]
    Resume {
        #[command(flatten)]
        target: Target,
    },
}

/// Most glibc malloc arenas. Frames are allocated on the NBD threads and freed on the
/// sender's ack thread; with glibc's default (8 per core) the freed buffers stay spread over
/// per-thread arenas and the agent's RSS sits far above what it holds (measured: 135 MiB
/// with an empty backlog, 71 MiB with 2 arenas). The memory bound is the config's.
const MALLOC_ARENAS: i32 = 2;

fn main() -> ExitCode {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets an allocator parameter; called before any other thread.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, MALLOC_ARENAS);
    }
    // Logs go to stderr; RUST_LOG overrides the default level (info).
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    match dispatch(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn consistency(app: bool) -> ConsistencyName {
    if app {
        ConsistencyName::App
    } else {
        ConsistencyName::Crash
    }
}

fn dispatch(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Run { config } => source_agent::daemon::run(&config),
        Command::Status { target, json } => {
            let response = client::call(&target.socket()?, &Request::Status {})?;
            let status = response.status.unwrap_or_default();
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{}", show::status(&status));
            }
            Ok(())
        }
        Command::Bookmark {
            target,
            app,
            label,
            freeze,
            wait_secs,
            json,
        } => {
            let request = Request::Bookmark {
                consistency: consistency(app || !freeze.is_empty()),
                label,
                freeze,
                wait_secs,
            };
            print_bookmark(&client::call(&target.socket()?, &request)?, json)
        }
        Command::Quiesce {
            target,
            app,
            label,
            timeout_secs,
            json,
        } => {
            let request = Request::Quiesce {
                consistency: consistency(app),
                label,
                timeout_secs,
            };
            print_bookmark(&client::call(&target.socket()?, &request)?, json)
        }
        Command::Resume { target } => {
            client::call(&target.socket()?, &Request::Resume {})?;
            println!("resumed: writes are accepted again");
            Ok(())
        }
    }
}

fn print_bookmark(response: &Response, json: bool) -> anyhow::Result<()> {
    let b = response
        .bookmark
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("the agent answered without a bookmark"))?;
    if json {
        println!("{}", serde_json::to_string(b)?);
    } else {
        println!(
            "bookmark {} seq {} ({})",
            b.bookmark_id, b.seq, b.consistency
        );
    }
    Ok(())
}
