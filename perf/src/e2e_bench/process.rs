//! The appliance process as /proc sees it: its memory (VmHWM, VmRSS, VmPin), peak-RSS reset and CPU times.

use super::*;

/// Memory figures of a process from /proc/PID/status, KiB.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Memory {
    pub(super) hwm_kib: u64,
    pub(super) rss_kib: u64,
    pub(super) pin_kib: u64,
}

pub(super) fn memory_of(pid: u32) -> Result<Memory> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let field = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
    };
    Ok(Memory {
        hwm_kib: field("VmHWM:").ok_or_else(|| anyhow!("{path} has no VmHWM"))?,
        rss_kib: field("VmRSS:").unwrap_or(0),
        pin_kib: field("VmPin:").unwrap_or(0),
    })
}

/// Resets the peak RSS (VmHWM) of `pid` to its current RSS; false if the kernel refused.
pub(super) fn reset_peak_rss(pid: u32) -> bool {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok()
}

/// User and system CPU time of process `pid` (all its threads) from /proc/PID/stat.
pub(crate) fn cpu_of(pid: u32) -> Result<CpuTimes> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // After the command name in parentheses: state (field 3) … utime (14), stime (15).
    let rest = text
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| anyhow!("{path}: unexpected format"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> Result<f64> {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .map(|v| v as f64)
            .ok_or_else(|| anyhow!("{path}: no field {}", i + 3))
    };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok(CpuTimes {
        user_s: ticks(11)? / hz,
        system_s: ticks(12)? / hz,
    })
}
