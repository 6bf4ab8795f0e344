//! The demo's NBD clients: the outside tools (`nbdinfo`, `nbdcopy` from libnbd, `qemu-io` from
//! qemu-utils) run against an appliance's exports, each call's failure naming the tool, the
//! URI and what the tool said.

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};

/// The tools and the Debian package of each (`scripts/install-tools.sh` installs them).
const TOOLS: [(&str, &str); 3] = [
    ("nbdinfo", "libnbd-bin"),
    ("nbdcopy", "libnbd-bin"),
    ("qemu-io", "qemu-utils"),
];

/// How long to wait between two `nbdinfo` attempts while an export is not answering yet.
const RETRY_INTERVAL: Duration = Duration::from_millis(5);

/// An error naming every tool missing from `PATH` (the demo installs nothing itself).
pub(super) fn check_tools() -> anyhow::Result<()> {
    let missing: Vec<String> = TOOLS
        .iter()
        .filter(|(tool, _)| !on_path(tool))
        .map(|(tool, package)| format!("{tool} (package {package})"))
        .collect();
    if !missing.is_empty() {
        bail!(
            "the demo reads the appliance's NBD exports with outside tools, missing here: {}; \
             run scripts/install-tools.sh (scripts/demo.sh does)",
            missing.join(", ")
        );
    }
    Ok(())
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(tool).is_file()))
}

fn run(tool: &str, args: &[&str], uri: &str) -> anyhow::Result<Output> {
    Command::new(tool)
        .args(args)
        .output()
        .with_context(|| format!("running {tool} on {uri}"))
}

fn said(output: &Output) -> String {
    let mut text = String::from_utf8_lossy(&output.stderr).trim().to_owned();
    if text.is_empty() {
        text = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    }
    text
}

/// Runs `nbdinfo --size URI` until it answers (at most `timeout`); the size it reports.
pub(super) fn wait_size(uri: &str, timeout: Duration) -> anyhow::Result<u64> {
    let started = Instant::now();
    loop {
        let output = run("nbdinfo", &["--size", uri], uri)?;
        if output.status.success() {
            let text = String::from_utf8_lossy(&output.stdout);
            return text
                .trim()
                .parse()
                .with_context(|| format!("nbdinfo --size {uri} printed {text:?}"));
        }
        if started.elapsed() > timeout {
            bail!(
                "nbdinfo --size {uri} did not answer within {timeout:?}: {}",
                said(&output)
            );
        }
        std::thread::sleep(RETRY_INTERVAL);
    }
}

/// Asks every disk at once (as a VM's disks would be opened) until each answers with its
/// size, `uris[i]` being disk `i` of size `sizes_bytes[i]`.
pub(super) fn wait_all(
    uris: &[String],
    sizes_bytes: &[u64],
    timeout: Duration,
) -> anyhow::Result<()> {
    if uris.len() != sizes_bytes.len() {
        bail!(
            "the export serves {} disks, the VM has {}",
            uris.len(),
            sizes_bytes.len()
        );
    }
    let answers: Vec<anyhow::Result<u64>> = std::thread::scope(|scope| {
        let asks: Vec<_> = uris
            .iter()
            .map(|uri| scope.spawn(|| wait_size(uri, timeout)))
            .collect();
        asks.into_iter()
            .map(|ask| {
                ask.join()
                    .unwrap_or_else(|_| Err(anyhow!("nbdinfo's thread panicked")))
            })
            .collect()
    });
    for ((answer, uri), size) in answers.into_iter().zip(uris).zip(sizes_bytes) {
        let answered = answer?;
        if answered != *size {
            bail!("nbdinfo --size {uri} answered {answered} bytes, the disk has {size}");
        }
    }
    Ok(())
}

/// `nbdcopy URI FILE`: the export's bytes into a new file.
pub(super) fn copy_out(uri: &str, file: &Path) -> anyhow::Result<()> {
    std::fs::File::create(file).with_context(|| format!("creating {}", file.display()))?;
    let path = file.display().to_string();
    let output = run("nbdcopy", &[uri, &path], uri)?;
    if !output.status.success() {
        bail!("nbdcopy {uri} {path} failed: {}", said(&output));
    }
    Ok(())
}

/// Writes `length_bytes` of `byte` at `offset_bytes` through NBD, then flushes (`qemu-io`).
pub(super) fn write_pattern(
    uri: &str,
    offset_bytes: u64,
    length_bytes: u64,
    byte: u8,
) -> anyhow::Result<()> {
    let write = format!("write -P {byte:#04x} {offset_bytes} {length_bytes}");
    let output = run(
        "qemu-io",
        &["-f", "raw", "-c", &write, "-c", "flush", uri],
        uri,
    )?;
    let text = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() || !text.contains("wrote") {
        bail!("qemu-io -c '{write}' {uri} failed: {}", said(&output));
    }
    Ok(())
}
