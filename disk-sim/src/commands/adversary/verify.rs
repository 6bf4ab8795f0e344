//! After the run: every replicating item verified through the API, every hostile item checked,
//! the API timed, the appliance stopped.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use appliance_api::model::ItemView;

use super::*;
use crate::site::Appliance;
use crate::source::{SourceModel, verify_failover_latest, verify_points};
use source_agent::sender::Agent;

#[allow(clippy::too_many_arguments)]
pub(super) fn verify_replicating(
    api: &Appliance,
    i: usize,
    hex: &str,
    agent: Option<Agent>,
    model: &SourceModel,
    last: Option<u64>,
    restore: &Path,
    report: &mut AdversaryReport,
    out: &mut dyn Write,
) {
    let mut problems = Vec::new();
    verify_item(
        api,
        i,
        hex,
        agent,
        model,
        last,
        restore,
        report,
        out,
        &mut problems,
    );
    for problem in problems {
        let _ = writeln!(out, "  item {hex}: {problem}");
        report
            .failures
            .push(format!("replicating item {hex}: {problem}"));
    }
}

#[allow(clippy::too_many_arguments)]
pub(super) fn verify_item(
    api: &Appliance,
    i: usize,
    hex: &str,
    agent: Option<Agent>,
    model: &SourceModel,
    last: Option<u64>,
    restore: &Path,
    report: &mut AdversaryReport,
    out: &mut dyn Write,
    problems: &mut Vec<String>,
) {
    let mut fail = |_: &mut AdversaryReport, what: String| problems.push(what);
    let Some(agent) = agent else {
        fail(report, "the agent is still shared; not verified".into());
        return;
    };
    let acked = match agent.flush(Duration::from_secs(60)) {
        Ok(acked) => acked,
        Err(error) => {
            fail(report, format!("flushing the agent: {error}"));
            agent.acked_seq()
        }
    };
    let _ = agent.close(Duration::from_secs(10));
    report.frames_acked += acked;
    if let Some(last) = last
        && acked < last
    {
        fail(report, format!("only seq {acked} of {last} acknowledged"));
    }
    let view = match wait_applied_or_stalled(api, hex, acked) {
        Ok(view) => view,
        Err(error) => {
            fail(report, format!("{error:#}"));
            return;
        }
    };
    let (staged, applied) = (view.staged_seq, view.applied_seq);
    let lost = acked.saturating_sub(staged.min(applied));
    let dir = restore.join(format!("item-{i}"));
    let mut sink = Vec::new();
    let check = match verify_points(
        api,
        hex,
        &model.points,
        None,
        model.points.len(),
        &dir,
        &mut sink,
    ) {
        Ok(check) => check,
        Err(error) => {
            fail(report, format!("verifying the points: {error:#}"));
            return;
        }
    };
    let lost = lost + check.missing.len() as u64;
    report.frames_lost += lost;
    report.points_verified += check.verified;
    report.points_expected += model.points.len();
    let final_check = model
        .digests()
        .map_err(anyhow::Error::from)
        .and_then(|digests| verify_failover_latest(api, hex, &digests, &dir.join("failover")));
    let final_text = match &final_check {
        Ok((point, m)) if m.is_empty() => format!("failover to latest (point {point}) equal"),
        Ok((point, _)) => format!("failover to latest (point {point}) DIFFERS"),
        Err(error) => format!("failover to latest FAILED: {error:#}"),
    };
    let _ = writeln!(
        out,
        "item {hex}: acked {acked} (staged {staged}, applied {applied}), lost {lost}; points \
         verified {} of {} bookmarks; {final_text}",
        check.verified,
        model.points.len()
    );
    if lost > 0 {
        fail(
            report,
            format!(
                "{lost} acknowledged frames or bookmark points lost (missing points {:?})",
                check.missing
            ),
        );
    }
    for mismatch in &check.mismatches {
        fail(report, format!("{mismatch}"));
    }
    if check.verified != model.points.len() {
        fail(
            report,
            format!(
                "{} of {} bookmarks verified",
                check.verified,
                model.points.len()
            ),
        );
    }
    match final_check {
        Ok((_, mismatches)) => {
            for mismatch in mismatches {
                fail(report, format!("final state: {mismatch}"));
            }
        }
        Err(error) => fail(report, format!("failover to latest: {error:#}")),
    }
}

pub(super) fn check_hostile_item(
    api: &Appliance,
    hex: &str,
    valid_seq: u64,
    report: &mut AdversaryReport,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let view = api.item(hex)?;
    let staged = view.staged_seq;
    let mut problems = Vec::new();
    if staged > valid_seq {
        problems.push(format!(
            "staged_seq {staged}, but only frames through seq {valid_seq} were valid: hostile \
             frames were staged"
        ));
    }
    let applied = match wait_applied_or_stalled(api, hex, staged) {
        Ok(view) => view.applied_seq,
        Err(_) => {
            let applied = api.item(hex)?.applied_seq;
            problems.push(format!(
                "apply stuck at seq {applied} of {staged} staged (state {})",
                view.state
            ));
            applied
        }
    };
    writeln!(
        out,
        "hostile item {hex}: staged {staged}, applied {applied}, valid control frames through \
         {valid_seq}, state {}{}",
        view.state,
        if problems.is_empty() { "" } else { " — FAIL" }
    )?;
    for problem in problems {
        report
            .failures
            .push(format!("hostile item {hex}: {problem}"));
    }
    Ok(())
}

/// Waits until `item` has applied through `seq`; an error once its `applied_seq` has not
/// moved for 20 s (apply stopped) or after 10 minutes.
pub(super) fn wait_applied_or_stalled(
    api: &Appliance,
    item: &str,
    seq: u64,
) -> anyhow::Result<ItemView> {
    let started = Instant::now();
    let (mut last, mut moved) = (u64::MAX, Instant::now());
    loop {
        let view = api.item(item)?;
        let applied = view.applied_seq;
        if applied >= seq {
            return Ok(view);
        }
        if applied != last {
            (last, moved) = (applied, Instant::now());
        }
        if moved.elapsed() > Duration::from_secs(20) || started.elapsed() > Duration::from_secs(600)
        {
            bail!(
                "item {item} has applied through seq {applied}, not {seq}, and stopped moving \
                 (state {}, health {})",
                view.state,
                view.health
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// SIGTERM, bounded: a stop that does not finish in 30 s is a failure and ends in SIGKILL.
pub(super) fn stop_appliance(
    appliance: Appliance,
    report: &mut AdversaryReport,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let pid = appliance.pid();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(appliance.stop().map_err(|e| format!("{e:#}")));
    });
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(Ok(())) => writeln!(out, "appliance stopped (SIGTERM, exit 0)")?,
        Ok(Err(error)) => report
            .failures
            .push(format!("stopping the appliance: {error}")),
        Err(_) => {
            if let Some(pid) = pid {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            let _ = rx.recv_timeout(Duration::from_secs(10));
            report
                .failures
                .push("the appliance did not finish within 30 s of SIGTERM; SIGKILLed".into());
            writeln!(
                out,
                "appliance did NOT stop on SIGTERM within 30 s; SIGKILLed"
            )?;
        }
    }
    Ok(())
}

pub(super) fn api_token(appliance: &Appliance) -> anyhow::Result<String> {
    let path = appliance.data_dir().join("api-token");
    Ok(std::fs::read_to_string(&path)
        .with_context(|| format!("reading {}", path.display()))?
        .trim()
        .to_owned())
}

/// GET `path` with a hard `deadline`; the time it took, or what went wrong.
pub(super) fn timed_get(
    base: &str,
    token: &str,
    path: &str,
    deadline: Duration,
) -> Result<Duration, String> {
    let http: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .proxy(None)
        .timeout_global(Some(deadline))
        .build()
        .into();
    let started = Instant::now();
    let result = http
        .get(&format!("{base}{path}"))
        .header("Authorization", &format!("Bearer {token}"))
        .call();
    let took = started.elapsed();
    match result {
        Ok(mut response) => {
            let status = response.status().as_u16();
            let _ = response.body_mut().read_to_string();
            if (200..300).contains(&status) {
                Ok(took)
            } else {
                Err(format!("GET {path}: HTTP {status}"))
            }
        }
        Err(error) => Err(format!(
            "GET {path}: no answer within {} ms ({error})",
            deadline.as_millis()
        )),
    }
}
