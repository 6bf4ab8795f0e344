//! The `source-agent` binary driven like an operator drives it, and its NBD disks seen by the
//! kernel: the demo's real-filesystem part and perf's agent benchmark share this.
//!
//! ```text
//!  AgentSetup ──write──► <dir>/agent.toml (+ token file, mode 0600)
//!  AgentProcess::start ─► `source-agent run --config …` (stdout parsed up to `ready`: the NBD
//!                         address, one URI per disk, the control socket; stderr kept)
//!     status / bookmark / quiesce / resume: the binary's own subcommands (`--json`)
//!  KernelDisk::attach(uri) ─► nbdfuse DIR URI (DIR/nbd) ─► losetup --direct-io=on --sector-size 4096
//!                           ─► /dev/loopN
//!  mkfs_ext4, Mounted::mount (umount on drop), sha256 of a tree
//! ```
//!
//! Everything here runs outside programs (`nbdfuse`, `losetup`, `mount`, `mkfs.ext4`,
//! `fusermount3`); [`why_not_runnable`] says what is missing before anything starts. Every
//! failure names the program, its arguments and what it printed.

mod kernel;
mod process;
#[cfg(test)]
mod tests;

pub use kernel::{KernelDisk, Mounted, is_root, mkfs_ext4, tree_digests, why_not_runnable};
pub use process::{AgentProcess, AgentSetup, Bookmarked, ServedDisk};

use std::process::{Command, Output};

use anyhow::{Context, bail};

/// The command line of `cmd`, for messages.
pub(crate) fn command_line(cmd: &Command) -> String {
    std::iter::once(cmd.get_program().to_string_lossy().into_owned())
        .chain(cmd.get_args().map(|a| a.to_string_lossy().into_owned()))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `cmd` to its end; its output, or an error naming the command, its exit status and
/// what it printed on stderr (or stdout when stderr is empty).
pub fn run_checked(cmd: &mut Command) -> anyhow::Result<Output> {
    let line = command_line(cmd);
    let out = cmd.output().with_context(|| format!("starting {line}"))?;
    if !out.status.success() {
        let mut said = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        if said.is_empty() {
            said = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        }
        bail!("{line} failed ({}): {said}", out.status);
    }
    Ok(out)
}
