//! The file-descriptor budget of `serve`, checked once at start.
//!
//! Every configured limit bounds some open files: control API connections (one socket each),
//! data-port connections (a socket, and a replica opened for a hash list), disk slots (each
//! replicating disk holds its replica and its share of the item's staging, preserve and
//! io_uring files; an item has at least one disk, so per-item files are counted per slot) and
//! jobs that write disks (a replica and an output file, plus preserve files). Their sum plus a
//! margin for the process itself is what `RLIMIT_NOFILE` must allow. At start the soft limit
//! is raised toward the hard limit when it is lower; when even the hard limit is lower,
//! `serve` refuses to start with a message naming the numbers, rather than failing later
//! with "Too many open files" in the middle of an agent's session.

use nix::sys::resource::{Resource, getrlimit, setrlimit};

/// Files of the process itself: stdio, the data directory's lock, the metadata store, the
/// two listeners, the runtimes' epoll and event descriptors, the job and slot tables, and
/// room for the transient files of requests (records written atomically, directory syncs).
pub const PROCESS_FDS: u64 = 64;
/// Per data-port connection: its socket, and a replica file while it serves a hash list.
pub const FDS_PER_DATA_CONNECTION: u64 = 2;
/// Per disk slot: the replica (apply and a reader), and the item's staging segment, staging
/// and preserve directories, io_uring ring and preserve file (counted per slot: an item has
/// at least one disk).
pub const FDS_PER_SLOT: u64 = 8;
/// Per disk-writing job: the replica, the output file and its directory, preserve files.
pub const FDS_PER_JOB: u64 = 6;

/// What the configured limits allow to be open at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdNeeds {
    /// Control API connections (its cap).
    pub api_connections: usize,
    /// Data-port connections (its cap).
    pub data_connections: usize,
    /// Disk slots (LUN 0 included: counted as a margin).
    pub disk_slots: usize,
    /// Disk-writing jobs at once.
    pub jobs: usize,
}

impl FdNeeds {
    /// File descriptors these limits need.
    pub fn needed(&self) -> u64 {
        let n = |v: usize| u64::try_from(v).unwrap_or(u64::MAX);
        PROCESS_FDS
            .saturating_add(n(self.api_connections))
            .saturating_add(n(self.data_connections).saturating_mul(FDS_PER_DATA_CONNECTION))
            .saturating_add(n(self.disk_slots).saturating_mul(FDS_PER_SLOT))
            .saturating_add(n(self.jobs).saturating_mul(FDS_PER_JOB))
    }

    /// The sum spelled out, for the refusal.
    fn breakdown(&self) -> String {
        format!(
            "{} control API connections + {} data-port connections × {FDS_PER_DATA_CONNECTION} \
             + {} disk slots × {FDS_PER_SLOT} + {} jobs × {FDS_PER_JOB} + {PROCESS_FDS} for \
             the process",
            self.api_connections, self.data_connections, self.disk_slots, self.jobs
        )
    }
}

/// The limit after [`ensure`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdLimits {
    /// What the configuration needs.
    pub needed: u64,
    /// The soft limit now.
    pub soft: u64,
    /// The hard limit.
    pub hard: u64,
}

/// The soft limit to set for `needed` under (`soft`, `hard`): `Ok(None)` when `soft` is
/// enough, `Ok(Some(new))` to raise it (to `needed`), `Err` when `hard` is below `needed`.
pub fn plan(needs: &FdNeeds, soft: u64, hard: u64) -> Result<Option<u64>, String> {
    let needed = needs.needed();
    if needed <= soft {
        Ok(None)
    } else if needed <= hard {
        Ok(Some(needed))
    } else {
        Err(format!(
            "the configured limits need {needed} open files ({}), but the hard limit on open \
             files (RLIMIT_NOFILE) is {hard} (soft {soft}); raise it (systemd: LimitNOFILE=, \
             shell: ulimit -Hn) or lower api_max_connections, slots or max_jobs",
            needs.breakdown()
        ))
    }
}

/// Checks the budget and raises the soft limit when needed (see [`plan`]).
pub fn ensure(needs: &FdNeeds) -> Result<FdLimits, String> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)
        .map_err(|e| format!("reading the open-files limit (RLIMIT_NOFILE): {e}"))?;
    let needed = needs.needed();
    match plan(needs, soft, hard)? {
        None => Ok(FdLimits { needed, soft, hard }),
        Some(raised) => {
            setrlimit(Resource::RLIMIT_NOFILE, raised, hard).map_err(|e| {
                format!(
                    "raising the soft open-files limit (RLIMIT_NOFILE) from {soft} to {raised} \
                     (hard {hard}), which the configured limits need ({}): {e}",
                    needs.breakdown()
                )
            })?;
            tracing::info!(
                from = soft,
                to = raised,
                hard,
                "raised the soft open-files limit for the configured limits"
            );
            Ok(FdLimits {
                needed,
                soft: raised,
                hard,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEFAULTS: FdNeeds = FdNeeds {
        api_connections: 256,
        // The data port's default sessions (64) and unauthenticated handshakes (128).
        data_connections: 192,
        disk_slots: 32,
        jobs: 8,
    };

    #[test]
    fn needed_is_the_sum_of_every_limit_and_the_margin() {
        assert_eq!(
            DEFAULTS.needed(),
            PROCESS_FDS + 256 + 192 * FDS_PER_DATA_CONNECTION + 32 * FDS_PER_SLOT + 8 * FDS_PER_JOB
        );
        let more_api = FdNeeds {
            api_connections: 1256,
            ..DEFAULTS
        };
        assert_eq!(more_api.needed(), DEFAULTS.needed() + 1000);
        let more_slots = FdNeeds {
            disk_slots: 33,
            ..DEFAULTS
        };
        assert_eq!(more_slots.needed(), DEFAULTS.needed() + FDS_PER_SLOT);
        let huge = FdNeeds {
            api_connections: usize::MAX,
            ..DEFAULTS
        };
        assert_eq!(huge.needed(), u64::MAX, "saturates, never wraps");
    }

    #[test]
    fn the_defaults_fit_the_usual_soft_limit_of_1024() {
        let port = crate::dataport::DataPortConfig::default();
        assert_eq!(
            port.max_sessions + port.max_handshakes,
            DEFAULTS.data_connections
        );
        assert!(DEFAULTS.needed() <= 1024, "{}", DEFAULTS.needed());
        assert_eq!(
            DEFAULTS.needed(),
            1008,
            "docs/design/control-api.md states it"
        );
        assert_eq!(plan(&DEFAULTS, 1024, 4096), Ok(None));
    }

    #[test]
    fn a_low_soft_limit_is_raised_to_what_is_needed() {
        let needed = DEFAULTS.needed();
        assert_eq!(plan(&DEFAULTS, 256, 524_288), Ok(Some(needed)));
        assert_eq!(plan(&DEFAULTS, needed - 1, needed), Ok(Some(needed)));
        assert_eq!(plan(&DEFAULTS, needed, needed), Ok(None));
    }

    #[test]
    fn a_hard_limit_below_the_need_is_refused_with_the_numbers() {
        let needed = DEFAULTS.needed();
        let message = plan(&DEFAULTS, 64, 64).expect_err("refused");
        for part in [
            needed.to_string().as_str(),
            "hard limit on open files (RLIMIT_NOFILE) is 64",
            "256 control API connections",
            "192 data-port connections",
            "32 disk slots",
            "8 jobs",
            "LimitNOFILE",
        ] {
            assert!(message.contains(part), "{part:?} missing: {message}");
        }
        assert!(plan(&DEFAULTS, needed - 1, needed - 1).is_err());
    }
}
