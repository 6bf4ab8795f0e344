//! Runs the command the command line names: the daemon, an offline tool on a data directory,
//! or a client command of the control API (`commands.rs`).

use std::fs::File;
use std::io::BufReader;

use appliance::{daemon, inspect, offline};

use super::app::{Cli, Command, Format, ItemCommand, StreamCommand};
use crate::config;

/// Runs `cli`; `matches` are the raw ones (`enable` keeps the order of its disks with them).
pub(crate) fn run(cli: Cli, matches: &clap::ArgMatches) -> anyhow::Result<()> {
    match cli.command {
        Command::Stream {
            command: StreamCommand::Inspect { file },
        } => {
            let opened = File::open(&file)
                .map_err(|e| offline::BadInput(format!("{}: cannot open: {e}", file.display())))?;
            let report = inspect::inspect(BufReader::with_capacity(1 << 20, opened))
                .map_err(|e| offline::BadInput(format!("{}: {e}", file.display())))?;
            println!("{}", inspect::render(&report));
            Ok(())
        }
        Command::Ingest {
            data_dir,
            stream,
            keep_points,
            cache_mib,
            queue_depth,
        } => {
            let summary = offline::ingest(
                &data_dir,
                &stream,
                offline::IngestOptions {
                    keep_points: keep_points as usize,
                    cache_bytes: cache_mib << 20,
                    queue_depth: queue_depth as usize,
                },
            )?;
            println!(
                "item {}: {} frames staged ({} already staged), applied through seq {}, {} \
                 recovery points kept, replica I/O backend {}",
                summary.item,
                summary.frames_staged,
                summary.frames_skipped,
                summary.applied_seq,
                summary.points,
                summary.backend
            );
            Ok(())
        }
        Command::Serve {
            data_dir,
            config,
            data_addr,
            api_addr,
            nbd_addr,
            keep_points,
            cache_mib,
            queue_depth,
            slots,
            disk_stores,
            max_jobs,
            api_max_connections,
        } => {
            let flags = config::Flags {
                data_addr,
                api_addr,
                nbd_addr,
                keep_points,
                cache_mib,
                queue_depth,
                slots,
                disk_stores,
                max_jobs,
                api_max_connections,
            };
            let options = config::load(config.as_deref(), &flags)?;
            daemon::serve(&data_dir, options)
        }
        Command::Item {
            command: None,
            item,
            api,
        } => {
            // clap requires ITEM when there is no subcommand.
            let item = item.unwrap_or_default();
            Ok(super::show_item(&api, &item)?)
        }
        Command::Item {
            command:
                Some(ItemCommand::Create {
                    data_dir,
                    name,
                    disks,
                }),
            ..
        } => {
            let disks = disks
                .iter()
                .map(|d| daemon::parse_disk(d))
                .collect::<Result<Vec<_>, _>>()?;
            let (item, token) = daemon::create_item(
                &data_dir,
                &name,
                &disks,
                daemon::ServeOptions::offline_default(),
            )?;
            println!("item {item}");
            println!("token {token}");
            Ok(())
        }
        Command::Points {
            target,
            data_dir,
            item,
            api,
        } => match data_dir {
            Some(data_dir) => {
                print!("{}", offline::points(&data_dir, item.as_deref())?);
                Ok(())
            }
            None => {
                // clap requires ITEM without --data-dir.
                let target = target.unwrap_or_default();
                Ok(super::show_points(&api, &target)?)
            }
        },
        Command::Client(command) => {
            let sub = matches.subcommand().map(|(_, sub)| sub);
            Ok(super::run(command, sub)?)
        }
        Command::Materialize {
            data_dir,
            item,
            point,
            out,
            format,
        } => {
            let choice = offline::parse_point(&point)?;
            let format = match format {
                Format::Raw => engine::materialize::OutputFormat::Raw,
                Format::Vhd => engine::materialize::OutputFormat::FixedVhd,
            };
            let (point_id, paths) = offline::materialize(&data_dir, &item, choice, &out, format)?;
            for path in paths {
                println!("point {point_id}: {}", path.display());
            }
            Ok(())
        }
    }
}
