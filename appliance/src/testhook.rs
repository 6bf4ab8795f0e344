//! Deterministic fault points for the process-level tests, compiled into debug builds only
//! (a release build has empty functions: nothing is read from the environment).
//!
//! - `APPLIANCE_TEST_CRASH_AT=<point>` aborts the process (`abort()`: no destructor, no
//!   buffered write runs, like a SIGKILL) when it reaches `<point>`, e.g. `enable:record`.
//!   `appliance/tests/start_damaged.rs` kills `serve` at every step of enable this way.
//! - `APPLIANCE_TEST_PAUSE_AT=<point>=<path>` holds the thread that reaches `<point>`: it
//!   creates `<path>.reached`, then waits until `<path>` exists. A test uses it to hold a race
//!   window open (e.g. a job between its end and its record write) for as long as it wants.
//!   Several points: `<point>=<path>;<point>=<path>`.
//! - `APPLIANCE_TEST_FAIL_AT=<point>` makes the step at `<point>` fail as if its I/O had
//!   failed (the caller decides what failing means there), to reach error paths no real
//!   fault reaches reliably: `enable:slots-commit` (the commit of a new item's slots, record and job).
//!
//! The points, in the order they are reached:
//!
//! | point | where |
//! |---|---|
//! | `enable:reserved` | enable: slots reserved (memory only) |
//! | `enable:item-dir` | enable: the item directory and its `enabling` marker made |
//! | `enable:header` | enable: `header.drs` written |
//! | `enable:replicas` | enable: the replica disks created |
//! | `enable:token` | enable: the stream token written |
//! | `enable:job` | enable: the initial-replication job prepared (memory only) |
//! | `enable:record` | enable: slots, record and job committed in one transaction (the commit point) |
//! | `enable:slots` | enable: the `enabling` marker removed |
//! | `enable:started` | enable: replication started, before the answer |
//! | `resync:marker` | the resync job, holding the staging log's lock, before writing the resync marker |
//! | `export-change-point:held` | a change point of a failover in export mode, after it held the copy and cancelled it, before it waits for the copy to stop |
//! | `export-failover:copied-chunk` | a failover in export mode, after each chunk of the copy into the target files (outside every lock: clients keep reading and writing) |
//! | `job:finish:<kind>` | a job's end decided, before its record is written (`<kind>` as in `JobKind::name`) |

/// Every point of enable, in order.
pub const ENABLE_POINTS: [&str; 9] = [
    "enable:reserved",
    "enable:item-dir",
    "enable:header",
    "enable:replicas",
    "enable:token",
    "enable:job",
    "enable:record",
    "enable:slots",
    "enable:started",
];

/// Aborts the process here if `APPLIANCE_TEST_CRASH_AT` names `point` (debug builds only).
pub fn crash_point(point: &str) {
    #[cfg(debug_assertions)]
    if std::env::var("APPLIANCE_TEST_CRASH_AT").is_ok_and(|wanted| wanted == point) {
        eprintln!("APPLIANCE_TEST_CRASH_AT: aborting at {point}");
        std::process::abort();
    }
    #[cfg(not(debug_assertions))]
    let _ = point;
}

/// True if `APPLIANCE_TEST_FAIL_AT` names `point`: the caller then fails that step (debug
/// builds only; a release build always answers false).
pub fn fail_point(point: &str) -> bool {
    #[cfg(debug_assertions)]
    if std::env::var("APPLIANCE_TEST_FAIL_AT").is_ok_and(|wanted| wanted == point) {
        eprintln!("APPLIANCE_TEST_FAIL_AT: failing {point}");
        return true;
    }
    let _ = point;
    false
}

/// Holds the calling thread here if `APPLIANCE_TEST_PAUSE_AT` names `point` (debug builds
/// only); see the module comment.
pub fn pause_point(point: &str) {
    #[cfg(debug_assertions)]
    if let Ok(settings) = std::env::var("APPLIANCE_TEST_PAUSE_AT")
        && let Some((_, path)) = settings
            .split(';')
            .filter_map(|setting| setting.split_once('='))
            .find(|(wanted, _)| *wanted == point)
    {
        let release = std::path::PathBuf::from(path);
        let reached = std::path::PathBuf::from(format!("{path}.reached"));
        if let Err(error) = std::fs::write(&reached, point) {
            eprintln!(
                "APPLIANCE_TEST_PAUSE_AT: cannot create {}: {error}",
                reached.display()
            );
            return;
        }
        while !release.exists() {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
    #[cfg(not(debug_assertions))]
    let _ = point;
}
