//! CPU time of this process (and of waited-for children) from `getrusage(2)`.
//!
//! `RUSAGE_SELF` covers every thread of the process, including the io_uring worker threads
//! (`iou-wrk-*`) the kernel starts on the process's behalf, so a benchmark's figure is the
//! difference of two snapshots taken around its timed section on one thread.

use std::io;
use std::time::Duration;

use serde::Serialize;

/// User and system CPU time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct CpuTimes {
    /// User time, seconds.
    pub user_s: f64,
    /// System time, seconds.
    pub system_s: f64,
}

impl CpuTimes {
    /// User plus system.
    pub fn total_s(&self) -> f64 {
        self.user_s + self.system_s
    }

    /// `self - earlier`.
    pub fn since(&self, earlier: &CpuTimes) -> CpuTimes {
        CpuTimes {
            user_s: self.user_s - earlier.user_s,
            system_s: self.system_s - earlier.system_s,
        }
    }
}

fn timeval_s(tv: libc::timeval) -> f64 {
    Duration::new(
        u64::try_from(tv.tv_sec).unwrap_or(0),
        u32::try_from(tv.tv_usec).unwrap_or(0) * 1000,
    )
    .as_secs_f64()
}

fn rusage(who: libc::c_int) -> io::Result<CpuTimes> {
    // SAFETY: `rusage` is plain old data; all-zero is a valid value, and getrusage only writes
    // into the struct we pass, which lives for the duration of the call.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `who` is RUSAGE_SELF or RUSAGE_CHILDREN and `usage` is a valid, writable rusage.
    let rc = unsafe { libc::getrusage(who, &mut usage) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(CpuTimes {
        user_s: timeval_s(usage.ru_utime),
        system_s: timeval_s(usage.ru_stime),
    })
}

/// CPU time of this process so far (all threads).
pub fn process() -> io::Result<CpuTimes> {
    rusage(libc::RUSAGE_SELF)
}

/// CPU time of the children this process has waited for (fio runs).
pub fn children() -> io::Result<CpuTimes> {
    rusage(libc::RUSAGE_CHILDREN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_cpu_grows_with_work() {
        let before = process().unwrap();
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(i);
        }
        std::hint::black_box(x);
        let after = process().unwrap();
        assert!(after.since(&before).total_s() >= 0.0);
        assert!(after.total_s() > 0.0);
    }
}
