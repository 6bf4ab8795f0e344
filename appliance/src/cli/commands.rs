//! Each client subcommand: find the item the command line names, call the API through the
//! typed client, print the answer (or its JSON), and follow jobs with `--wait`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use appliance_api::model::{
    ChangePointRequest, DiskMode, EnableRequest, Enabled, ExportMode, ExportRequest,
    FailoverRequest, ItemView, JobState, JobView, MaterializeRequest, PolicyRequest,
    PromoteRequest, ReprotectRequest,
};
use appliance_api::{Client, Error, poll_until};
use serde::Serialize;

use super::Failure;
use super::args::{ApiArgs, ClientCommand, DiskArg, order_disks};
use super::render::{
    render_enabled, render_export, render_exports, render_item, render_items, render_job,
    render_jobs, render_points, render_slots, render_status,
};

/// How often `--wait` polls a job.
const POLL_INTERVAL: Duration = Duration::from_millis(200);
/// How long `--wait` keeps polling through transport errors (an appliance restart) before it
/// gives up; the job itself is not affected.
const POLL_OUTAGE: Duration = Duration::from_secs(30);

/// A client from the command line's `--api`, `--token`, `--token-file` (or environment).
pub fn client_from_args(args: &ApiArgs) -> Result<Client, Failure> {
    let token = resolve_token(args)?;
    let client = Client::new(&args.api, token)?;
    Ok(client)
}

/// The token: `--token`/`APPLIANCE_TOKEN`, else the file of `--token-file`/
/// `APPLIANCE_TOKEN_FILE`, else none (the API will answer 401, with a hint).
fn resolve_token(args: &ApiArgs) -> Result<Option<String>, Failure> {
    if let Some(token) = args.token.as_deref().map(str::trim)
        && !token.is_empty()
    {
        return Ok(Some(token.to_string()));
    }
    let Some(path) = &args.token_file else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(path).map_err(|e| {
        Failure::machine(format!("token file {}: cannot read: {e}", path.display()))
    })?;
    let token = text.trim();
    if token.is_empty() || token.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(Failure::bad_input(format!(
            "token file {}: expected one token (64 hex digits)",
            path.display()
        )));
    }
    Ok(Some(token.to_string()))
}

/// Finds the item `text` names: an id (32 hex digits) as is; else, among `items` (the answer
/// of `GET /v1/items`), the one whose name is `text` or whose id starts with it (4 digits at
/// least).
pub fn match_item(items: &[ItemView], text: &str) -> Result<String, String> {
    let text = text.trim();
    if let Ok(id) = text.parse::<appliance_api::ItemId>() {
        return Ok(id.to_string());
    }
    let lower = text.to_ascii_lowercase();
    let prefix = text.len() >= 4 && text.bytes().all(|b| b.is_ascii_hexdigit());
    let by_name: Vec<&ItemView> = items.iter().filter(|item| item.name == text).collect();
    let candidates: Vec<&ItemView> = if by_name.is_empty() && prefix {
        items
            .iter()
            .filter(|item| item.id.to_ascii_lowercase().starts_with(&lower))
            .collect()
    } else {
        by_name
    };
    match candidates.as_slice() {
        [] => Err(format!(
            "no item {text:?}: give an item id (32 hex digits), a unique prefix of one, or an \
             item name (`appliance items` lists them)"
        )),
        [one] => Ok(one.id.clone()),
        many => Err(format!(
            "{text:?} names {} items: {}; give the id",
            many.len(),
            many.iter()
                .map(|item| format!("{} ({}, {})", item.id, item.name, item.state))
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

/// The id of the item `text` names (asks the API for the list unless `text` is an id).
fn item_id(client: &Client, text: &str) -> Result<String, Failure> {
    match match_item(&[], text) {
        Ok(id) => Ok(id),
        Err(_) => match_item(&client.items()?, text).map_err(Failure::bad_input),
    }
}

fn absolute(path: &Path) -> Result<String, Failure> {
    std::path::absolute(path)
        .map(|p| p.display().to_string())
        .map_err(|e| Failure::bad_input(format!("{}: {e}", path.display())))
}

fn print_json(value: &impl Serialize) {
    match serde_json::to_string_pretty(value) {
        Ok(text) => println!("{text}"),
        Err(error) => println!("{{\"error\": \"cannot print the answer: {error}\"}}"),
    }
}

/// Prints `value` as JSON with `--json`, else as `render` makes it.
fn show<T: Serialize + ?Sized>(json: bool, value: &T, render: fn(&T) -> String) {
    if json {
        print_json(&value);
    } else {
        print!("{}", render(value));
    }
}

/// Polls `GET /v1/jobs/{id}` every 200 ms until the job is no longer running, drawing a
/// progress bar on stderr; returns the final job.
pub fn wait_for_job(client: &Client, job: JobView) -> Result<JobView, Failure> {
    let id = job.id;
    let bar = indicatif::ProgressBar::with_draw_target(
        Some(100),
        indicatif::ProgressDrawTarget::stderr(),
    );
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{spinner} job {prefix} [{bar:30}] {pos:>3}% {wide_msg}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_prefix(format!("{id} ({})", job.kind));
    bar.enable_steady_tick(Duration::from_millis(100));
    let mut outage: Option<Instant> = None;
    let mut current = Some(job);
    let result = poll_until(POLL_INTERVAL, Duration::MAX, || {
        let next = match current.take() {
            Some(job) => Ok(job),
            None => client.job(id),
        };
        match next {
            Ok(job) => {
                outage = None;
                if job.state != JobState::Running {
                    return Ok(Some(job));
                }
                bar.set_position(u64::from(job.percent.min(100)));
                bar.set_message(job.message);
                Ok(None)
            }
            // Unreachable (a restart?): keep trying for a while.
            Err(error @ Error::Transport { .. }) => {
                let since = *outage.get_or_insert_with(Instant::now);
                if since.elapsed() > POLL_OUTAGE {
                    return Err(error);
                }
                bar.set_message(format!(
                    "(API unreachable, retrying) {}",
                    Failure::from(error).message
                ));
                Ok(None)
            }
            // The API itself said no (the job vanished, the token changed): stop.
            Err(error) => Err(error),
        }
    });
    bar.finish_and_clear();
    result.map_err(|error| {
        let mut failure = Failure::from(error);
        let _ = write!(
            failure.message,
            "\n  job {id} may still be running on the appliance: `appliance jobs {id} --wait` \
             follows it"
        );
        failure
    })
}

/// Prints a job (JSON or for people); a failed job becomes a [`Failure`] with its error.
fn finish_job(job: &JobView, json: bool) -> Result<(), Failure> {
    show(json, job, render_job);
    if job.state == JobState::Failed {
        return Err(Failure::machine(format!(
            "job {} ({}) failed: {}",
            job.id,
            job.kind,
            job.error.as_deref().unwrap_or("-")
        )));
    }
    Ok(())
}

/// A `202 JobView` answer: shown, or followed to its end with `--wait`.
fn job_answer(client: &Client, job: JobView, wait: bool, json: bool) -> Result<(), Failure> {
    if !wait {
        show(json, &job, render_job);
        return Ok(());
    }
    let job = wait_for_job(client, job)?;
    finish_job(&job, json)
}

/// A `201 Enabled` answer: the item and its token at once (the token is shown only here),
/// then with `--wait` the job followed to its end.
fn enabled_answer(
    client: &Client,
    enabled: Enabled,
    wait: bool,
    json: bool,
) -> Result<(), Failure> {
    show(json, &enabled, render_enabled);
    if !wait {
        return Ok(());
    }
    if !json {
        println!();
    }
    let job = wait_for_job(client, enabled.job)?;
    finish_job(&job, json)
}

/// `appliance item ITEM`.
pub fn show_item(api: &ApiArgs, item: &str) -> Result<(), Failure> {
    let client = client_from_args(api)?;
    let id = item_id(&client, item)?;
    show(api.json, &client.item(&id)?, render_item);
    Ok(())
}

/// `appliance points ITEM`.
pub fn show_points(api: &ApiArgs, item: &str) -> Result<(), Failure> {
    let client = client_from_args(api)?;
    let id = item_id(&client, item)?;
    show(api.json, client.points(&id)?.as_slice(), render_points);
    Ok(())
}

/// `enable`'s request: the disks in command-line order across `--disk` and `--attach`
/// (`matches`, the subcommand's own, gives their indices).
#[allow(clippy::too_many_arguments)]
fn enable_request(
    matches: Option<&clap::ArgMatches>,
    name: String,
    disks: Vec<DiskArg>,
    attach: Vec<PathBuf>,
    policy: PolicyRequest,
    temporary_os_disk: Option<PathBuf>,
) -> Result<EnableRequest, Failure> {
    let indices = |id: &str| -> Vec<usize> {
        matches
            .and_then(|m| m.indices_of(id))
            .map(Iterator::collect)
            .unwrap_or_default()
    };
    let (new_at, attach_at) = (indices("disks"), indices("attach"));
    // Without indices (a caller without matches), new disks come first.
    let new_at = if new_at.len() == disks.len() {
        new_at
    } else {
        (0..disks.len()).collect()
    };
    let attach_at = if attach_at.len() == attach.len() {
        attach_at
    } else {
        (disks.len()..disks.len() + attach.len()).collect()
    };
    let attach = attach
        .iter()
        .map(|path| absolute(path).map(PathBuf::from))
        .collect::<Result<Vec<_>, _>>()?;
    let ordered = order_disks(
        new_at.into_iter().zip(disks),
        attach_at.into_iter().zip(attach),
    );
    Ok(EnableRequest {
        name,
        disks: ordered.iter().map(DiskArg::to_wire).collect(),
        policy: (policy != PolicyRequest::default()).then_some(policy),
        temporary_os_disk: temporary_os_disk.map(|p| absolute(&p)).transpose()?,
    })
}

/// Runs a client command. `enable` needs `matches` (the subcommand's own) to keep the order
/// of `--disk` and `--attach`.
pub fn run(command: ClientCommand, matches: Option<&clap::ArgMatches>) -> Result<(), Failure> {
    match command {
        ClientCommand::Status { api } => {
            let client = client_from_args(&api)?;
            let info = client.appliance()?;
            if api.json {
                print_json(&info);
                return Ok(());
            }
            let slots = client.slots().map_err(Failure::from);
            let slots_shown = match &slots {
                Ok(view) => Ok(view),
                Err(failure) => Err(failure.message.lines().next().unwrap_or("")),
            };
            print!("{}", render_status(&info, slots_shown));
            Ok(())
        }
        ClientCommand::Slots { api } => {
            let client = client_from_args(&api)?;
            show(api.json, &client.slots()?, render_slots);
            Ok(())
        }
        ClientCommand::Items { api } => {
            let client = client_from_args(&api)?;
            show(api.json, client.items()?.as_slice(), render_items);
            Ok(())
        }
        ClientCommand::Enable {
            name,
            disks,
            attach,
            keep_points,
            keep_minutes,
            app_minutes,
            temporary_os_disk,
            wait,
            api,
        } => {
            let client = client_from_args(&api)?;
            let policy = PolicyRequest {
                keep_points,
                keep_minutes,
                app_consistent_minutes: app_minutes,
            };
            let request = enable_request(matches, name, disks, attach, policy, temporary_os_disk)?;
            let enabled = client.enable(&request)?;
            enabled_answer(&client, enabled, wait, api.json)
        }
        ClientCommand::TestFailover {
            item,
            point,
            target,
            export,
            format,
            wait,
            api,
        } => {
            let client = client_from_args(&api)?;
            let request = MaterializeRequest {
                point: point.to_wire(),
                target_dir: match &target {
                    Some(target) => absolute(target)?,
                    None => String::new(),
                },
                format: format.map(|f| f.to_wire()).unwrap_or_default(),
                mode: if export {
                    DiskMode::Export
                } else {
                    DiskMode::Copy
                },
            };
            let id = item_id(&client, &item)?;
            let job = client.test_failover(&id, &request)?;
            if !export {
                return job_answer(&client, job, wait, api.json);
            }
            let view = client.item(&id)?;
            match view.test_failover.and_then(|t| t.export_id) {
                Some(export_id) => show(api.json, &client.export_view(&export_id)?, render_export),
                None => show(api.json, &job, render_job),
            }
            Ok(())
        }
        ClientCommand::Promote {
            item,
            target,
            source_shut_down,
            wait,
            api,
        } => {
            let client = client_from_args(&api)?;
            let request = PromoteRequest {
                target_dir: absolute(&target)?,
                source_shut_down,
            };
            let job = client.promote(&item_id(&client, &item)?, &request)?;
            job_answer(&client, job, wait, api.json)
        }
        ClientCommand::Export {
            item,
            point,
            drill,
            api,
        } => {
            let client = client_from_args(&api)?;
            let request = ExportRequest {
                point: point.to_wire(),
                mode: if drill {
                    ExportMode::Drill
                } else {
                    ExportMode::ReadOnly
                },
            };
            let view = client.export(&item_id(&client, &item)?, &request)?;
            show(api.json, &view, render_export);
            Ok(())
        }
        ClientCommand::Exports { export, api } => {
            let client = client_from_args(&api)?;
            match export {
                Some(id) => show(api.json, &client.export_view(&id)?, render_export),
                None => show(api.json, &client.exports()?, |e| render_exports(e)),
            }
            Ok(())
        }
        ClientCommand::ExportRemove { export, api } => {
            let client = client_from_args(&api)?;
            let view = client.remove_export(&export)?;
            if api.json {
                show(true, &view, render_export);
            } else {
                println!("export {} removed", view.id);
            }
            Ok(())
        }
        ClientCommand::TestFailoverCleanup { item, api } => {
            let client = client_from_args(&api)?;
            let view = client.test_failover_cleanup(&item_id(&client, &item)?)?;
            show(api.json, &view, render_item);
            Ok(())
        }
        ClientCommand::Failover {
            item,
            point,
            target,
            format,
            source_shut_down,
            export,
            wait,
            api,
        } => {
            let client = client_from_args(&api)?;
            let request = FailoverRequest {
                point: point.to_wire(),
                target_dir: absolute(&target)?,
                format: format.map(|f| f.to_wire()).unwrap_or_default(),
                source_shut_down,
                mode: if export {
                    DiskMode::Export
                } else {
                    DiskMode::Copy
                },
            };
            let job = client.failover(&item_id(&client, &item)?, &request)?;
            job_answer(&client, job, wait, api.json)
        }
        ClientCommand::ChangePoint {
            item,
            point,
            wait,
            api,
        } => {
            let client = client_from_args(&api)?;
            let request = ChangePointRequest {
                point: point.to_wire(),
            };
            let job = client.change_point(&item_id(&client, &item)?, &request)?;
            job_answer(&client, job, wait, api.json)
        }
        ClientCommand::Commit { item, api } => {
            let client = client_from_args(&api)?;
            let view = client.commit(&item_id(&client, &item)?)?;
            show(api.json, &view, render_item);
            Ok(())
        }
        ClientCommand::Reprotect {
            item,
            disks,
            temporary_os_disk,
            name,
            wait,
            api,
        } => {
            let client = client_from_args(&api)?;
            let request = ReprotectRequest {
                disks: disks
                    .iter()
                    .map(|path| absolute(path))
                    .collect::<Result<Vec<_>, _>>()?,
                temporary_os_disk: temporary_os_disk.map(|p| absolute(&p)).transpose()?,
                name,
            };
            let enabled = client.reprotect(&item_id(&client, &item)?, &request)?;
            enabled_answer(&client, enabled, wait, api.json)
        }
        ClientCommand::Failback { item, wait, api } => {
            let client = client_from_args(&api)?;
            let job = client.failback(&item_id(&client, &item)?)?;
            job_answer(&client, job, wait, api.json)
        }
        ClientCommand::Resync { item, wait, api } => {
            let client = client_from_args(&api)?;
            let job = client.resync(&item_id(&client, &item)?)?;
            job_answer(&client, job, wait, api.json)
        }
        ClientCommand::Disable { item, api } => {
            let client = client_from_args(&api)?;
            let view = client.disable(&item_id(&client, &item)?)?;
            show(api.json, &view, render_item);
            Ok(())
        }
        ClientCommand::Jobs { job, wait, api } => {
            let client = client_from_args(&api)?;
            match job {
                None => {
                    show(api.json, client.jobs()?.as_slice(), render_jobs);
                    Ok(())
                }
                Some(id) => {
                    let job = client.job(id)?;
                    job_answer(&client, job, wait, api.json)
                }
            }
        }
    }
}
