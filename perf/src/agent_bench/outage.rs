//! The agent through an outage: the appliance stopped (SIGSTOP: the connection stays up but
//! nothing is read or acknowledged, the harder case for the agent: no error tells it), fio
//! writing 4 KiB random writes at full rate to the captured disk, the agent's RSS sampled
//! every 100 ms and its peak (VmHWM, reset first) held against its configured bound; then
//! SIGCONT and the catch-up timed: bytes resent against bytes changed.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};

use super::{
    AgentPlan, BACKLOG_LIMIT_MIB, CHANGE_MAP_LIMIT_KIB, IODEPTH, MIB, Paths, disks_sum, drain,
    fio_job,
};
use crate::fio::Fio;
use crate::report::{Bench, Chart, ChartLine, Goal, Row, Side};

/// How often the agent's RSS is read.
const SAMPLE_INTERVAL: Duration = Duration::from_millis(100);
/// Largest request one I/O in flight may carry into the agent (nbdfuse splits larger ones).
const REQUEST_MAX_MIB: u64 = 1;

/// A `VmXXX:` figure of /proc/PID/status, KiB.
pub(super) fn status_kib(pid: u32, key: &str) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow!("{path} has no {key}"))
}

/// Sends `signal` (`libc::SIGSTOP`, `libc::SIGCONT`) to the appliance.
fn signal(pid: u32, signal: libc::c_int) -> Result<()> {
    let pid = libc::pid_t::try_from(pid)?;
    // SAFETY: kill has no memory preconditions; pid is the appliance child's.
    if unsafe { libc::kill(pid, signal) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("sending signal {signal} to the appliance (pid {pid})"));
    }
    Ok(())
}

/// SIGCONT when dropped, so that an error during the outage never leaves the appliance
/// stopped.
struct Resume(u32);

impl Drop for Resume {
    fn drop(&mut self) {
        let _ = signal(self.0, libc::SIGCONT);
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// The outage table.
pub(super) fn outage(
    paths: &Paths,
    fio: &Fio,
    plan: &AgentPlan,
    lines: &mut Vec<String>,
) -> Result<Bench> {
    let title = format!(
        "agent: {} s outage at full write rate, then catch-up",
        plan.outage_s
    );
    let mut bench = Bench::new("agent", &title);
    let agent = &paths.on.0;
    let pid = agent.pid();
    let appliance_pid = paths
        .appliance
        .pid()
        .ok_or_else(|| anyhow!("the appliance has no process id"))?;
    drain(agent, "before the outage")?;
    let before = agent.status()?;
    let idle_kib = status_kib(pid, "VmRSS:")?;
    let hwm_reset = std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok();

    progress!("[{title}] appliance stopped (SIGSTOP); fio writing");
    signal(appliance_pid, libc::SIGSTOP)?;
    let resume = Resume(appliance_pid);
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let started = Instant::now();
            let mut samples = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                if let Ok(kib) = status_kib(pid, "VmRSS:") {
                    samples.push((started.elapsed().as_secs_f64(), kib));
                }
                std::thread::sleep(SAMPLE_INTERVAL);
            }
            samples
        })
    };
    let job = fio_job(
        "agent-outage",
        &paths.on.1.device,
        "randwrite",
        "4k",
        plan.disk_bytes,
        plan.outage_s,
    );
    let result = fio.run(&job);
    stop.store(true, Ordering::Relaxed);
    let samples = sampler
        .join()
        .map_err(|_| anyhow!("the RSS sampler panicked"))?;
    let result = result?;
    let during = agent.status()?;
    let hwm_kib = status_kib(pid, "VmHWM:")?;
    let peak_sampled_kib = samples.iter().map(|s| s.1).max().unwrap_or(0);

    progress!("[{title}] appliance resumed (SIGCONT); catch-up");
    signal(appliance_pid, libc::SIGCONT)?;
    drop(resume);
    let catch_up = drain(agent, "catch-up")?;
    let after = agent.status()?;
    let delta = |field: &str| disks_sum(&after, field).saturating_sub(disks_sum(&before, field));
    let (written, sent, resent) = (
        delta("written_bytes"),
        delta("sent_bytes"),
        delta("resent_bytes"),
    );

    // The bound: what the config allows (backlog, change map) plus the agent's own memory
    // (its RSS at start, before any I/O) plus the requests in flight (IODEPTH × 1 MiB).
    let start_kib = paths.on_start_rss_kib;
    let bound_kib = (BACKLOG_LIMIT_MIB << 10)
        + CHANGE_MAP_LIMIT_KIB
        + start_kib
        + ((IODEPTH as u64 * REQUEST_MAX_MIB) << 10);
    let peak_kib = if hwm_reset {
        hwm_kib.max(peak_sampled_kib)
    } else {
        peak_sampled_kib
    };

    let mut row = Row::fio("fio 4 KiB random write, appliance stopped", &result);
    row.side = Side::Engine;
    let row = row
        .with_extra("agent_rss_idle_mib", mib(idle_kib))
        .with_extra("agent_rss_start_mib", mib(start_kib))
        .with_extra("agent_rss_peak_sampled_mib", mib(peak_sampled_kib))
        .with_extra("agent_vmhwm_mib", mib(hwm_kib))
        .with_extra("vmhwm_reset", hwm_reset)
        .with_extra("unsent_bytes_at_end", disks_sum(&during, "unsent_bytes"))
        .with_extra("grain_bytes_at_end", disks_sum(&during, "grain_bytes"))
        .with_extra(
            "backlog_bytes_at_end",
            during["backlog_bytes"].as_u64().unwrap_or(0),
        )
        .with_extra("link_at_end", during["link"].clone());
    bench.rows.push(row);
    bench.rows.push(
        Row::engine(
            "catch-up (appliance resumed)",
            resent,
            0,
            catch_up.as_secs_f64(),
        )
        .with_extra("written_bytes", written)
        .with_extra("sent_bytes", sent)
        .with_extra("resent_bytes", resent),
    );
    bench.param("outage_s", plan.outage_s);
    bench.param("backlog_limit_mib", BACKLOG_LIMIT_MIB);
    bench.param("change_map_limit_kib", CHANGE_MAP_LIMIT_KIB);
    bench.param("bound_mib", mib(bound_kib));
    lines.push(bench.add_value_ratio(
        "agent peak RSS vs bound",
        ("peak RSS", mib(peak_kib)),
        ("bound", mib(bound_kib)),
        Some(Goal::AtMost(1.0)),
    ));
    lines.push(bench.add_value_ratio(
        "bytes resent vs changed",
        ("resent", resent as f64 / MIB as f64),
        ("written", written as f64 / MIB as f64),
        None,
    ));
    lines.push(bench.add_value_ratio(
        "bytes resent vs disk size",
        ("resent", resent as f64 / MIB as f64),
        ("disk", plan.disk_bytes as f64 / MIB as f64),
        None,
    ));
    bench.charts.push(Chart {
        name: "agent RSS during the outage".into(),
        x_desc: "seconds since the appliance was stopped".into(),
        y_desc: "agent VmRSS, MiB".into(),
        log_y: false,
        lines: vec![
            ChartLine {
                label: "bound".into(),
                points: vec![
                    (0.0, mib(bound_kib)),
                    (plan.outage_s as f64, mib(bound_kib)),
                ],
                reference: true,
            },
            ChartLine {
                label: "VmRSS every 100 ms".into(),
                points: samples.iter().map(|&(t, kib)| (t, mib(kib))).collect(),
                reference: false,
            },
        ],
    });
    bench.notes.push(format!(
        "The appliance is stopped with SIGSTOP (its connection stays open, nothing is read or \
         acknowledged) and fio writes 4 KiB random writes at qd {IODEPTH} to the captured disk \
         for {} s. Bound = backlog_limit_mib ({BACKLOG_LIMIT_MIB} MiB) + change_map_limit_kib \
         ({CHANGE_MAP_LIMIT_KIB} KiB) + the agent's RSS right after start, before any I/O \
         ({:.1} MiB: code, heap, thread stacks) + {IODEPTH} requests in flight × \
         {REQUEST_MAX_MIB} MiB. Peak = VmHWM (reset through clear_refs before the outage: \
         {hwm_reset}) or the highest 100 ms VmRSS sample, whichever is higher. At the end of the \
         outage the status said: unsent_bytes {}, grain_bytes {}, backlog_bytes {}, link {}. \
         Catch-up: SIGCONT, then until nothing is unsent and the backlog is empty; the catch-up \
         row's bytes are resent_bytes (read back from the disk by the change map's catch-up); \
         written_bytes is what fio wrote during the outage (overwrites included; the disk is \
         {} MiB).",
        plan.outage_s,
        mib(start_kib),
        disks_sum(&during, "unsent_bytes"),
        disks_sum(&during, "grain_bytes"),
        during["backlog_bytes"],
        during["link"],
        plan.disk_bytes >> 20,
    ));
    Ok(bench)
}
