#!/usr/bin/env bash
# The product's main job: the end-to-end demo, on local files, no external services.
#
# Part one, `disk-sim demo`: two real `appliance serve` processes (site A and site B) on
# loopback, a VM with an OS disk and two data disks on site A, and the whole cycle through the
# appliances' control APIs and data ports: enable protection → initial replication → steady
# replication under a workload → test failover (verify, clean up, replication still moving) →
# the same test failover in export mode (NBD at once; nbdcopy'd bytes checked, a drill write
# the replica never sees) → failover to a Custom point → change to the latest app-consistent
# point → commit → the VM runs on site B → re-protect to site A (original disks become
# replicas, temporary 1 GiB OS disk, delta resync) → failback (temporary disk removed, VM back
# on site A) → protect A→B again → failover in export mode (the VM writes through NBD while
# the copy job runs; commit).
# Every disk the appliances hand back is compared byte for byte with the source VM's disks.
# Then, as root (it says why it skips otherwise), a real filesystem: ext4 on a disk image
# protected by the source-agent binary (NBD → nbdfuse → loop device), through a test failover
# at an app-consistent bookmark taken with fsfreeze, a quiesced failover, commit, re-protect
# and failback, every step checked by mounting and comparing the files' checksums
# (`disk-sim demo --real-fs only` runs just that part).
#
# Part two, scripts/offline-demo.sh: the data path on a stream file (ingest with a SIGKILL,
# restores checked with cmp and qemu-img compare, corrupt input refused).
#
# DEMO_DIR=… keeps the files there.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-tools.sh
cargo build --release --locked -q -p appliance -p disk-sim -p source-agent
bin="${CARGO_TARGET_DIR:-target}/release"

printf '\n==> part one: the whole DR cycle with two appliances (disk-sim demo)\n'
if [ -n "${DEMO_DIR:-}" ]; then
    rm -rf "$DEMO_DIR/cycle"
    "$bin/disk-sim" demo --dir "$DEMO_DIR/cycle"
else
    "$bin/disk-sim" demo
fi

printf '\n==> part two: the offline data path on a stream file\n'
DEMO_DIR="${DEMO_DIR:+$DEMO_DIR/offline}" scripts/offline-demo.sh
