#!/usr/bin/env bash
# Installs the outside tools the tests, demo and benchmarks compare against, if missing:
# fio (physical limit), qemu-img (VHD checks), promtool (`/metrics` checks: Debian ships it in
# the `prometheus` package, whose server service the package also installs), the NBD clients
# and reference server (nbdinfo/nbdcopy/nbdfuse from libnbd-bin, nbdkit) and FUSE (fusermount3)
# for nbd-server/tests/tools.rs and appliance/tests/exports*.rs (e2fsprogs for their ext4
# checks), sqlite3 and fsfreeze (util-linux) for appliance/tests/source_agent_*.rs (real
# programs on the source agent's disk, frozen for app-consistent bookmarks). Debian packages;
# needs root or sudo.
set -euo pipefail
missing=()
command -v fio >/dev/null 2>&1 || missing+=(fio)
command -v qemu-img >/dev/null 2>&1 || missing+=(qemu-utils)
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v nbdinfo >/dev/null 2>&1 || missing+=(libnbd-bin)
command -v nbdkit >/dev/null 2>&1 || missing+=(nbdkit)
command -v fusermount3 >/dev/null 2>&1 || missing+=(fuse3)
command -v mkfs.ext4 >/dev/null 2>&1 || missing+=(e2fsprogs)
command -v sqlite3 >/dev/null 2>&1 || missing+=(sqlite3)
command -v fsfreeze >/dev/null 2>&1 || missing+=(util-linux)
[ ${#missing[@]} -eq 0 ] && exit 0
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
echo "installing: ${missing[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
