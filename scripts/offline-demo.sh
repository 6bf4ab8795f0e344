#!/usr/bin/env bash
# The offline data path, part two of scripts/demo.sh: a simulated source VM writes a seeded
# workload as a delta stream file; the appliance validates it, stages it durably, applies it to
# replica disks with io_uring, is killed with SIGKILL mid-way and resumes; recovery points are
# materialized as raw and fixed-VHD images and checked byte for byte against the source VM's
# disks (cmp, qemu-img compare); damaged input is refused with exit status 2.
set -euo pipefail
cd "$(dirname "$0")/.."

dir="${DEMO_DIR:-$(mktemp -d -t dr-demo.XXXXXX)}"
mkdir -p "$dir"
rm -rf "$dir/data" "$dir/source" "$dir/restore"
bin="${CARGO_TARGET_DIR:-target}/release"
step() { printf '\n==> %s\n' "$*"; }
now_ms() { echo $(( $(date +%s%N) / 1000000 )); }
checks=()
check() { # name, then the command that must succeed
    local name=$1; shift
    if "$@"; then checks+=("ok    $name"); else checks+=("FAIL  $name"); fi
}

step "build (release) and outside tools"
scripts/install-tools.sh
cargo build --release --locked -q -p appliance -p disk-sim

step "source VM: 3 disks of 64 MiB, seeded workload, 2100 frames, zstd"
start=$(now_ms)
$bin/disk-sim stream --out "$dir/vm.drs" --seed 42 --disks 3 --size-mib 64 --frames 2100 \
    --source-out "$dir/source"
echo "    took $(( $(now_ms) - start )) ms"

step "appliance: validate the stream (every checksum, sequence number and extent)"
$bin/appliance stream inspect "$dir/vm.drs" | tail -9

step "appliance: ingest (stage durably, apply with io_uring); SIGKILL after 1 s, then resume"
start=$(now_ms)
$bin/appliance ingest --data-dir "$dir/data" "$dir/vm.drs" > "$dir/ingest-1.log" 2>&1 &
pid=$!
sleep 1
kill -9 "$pid" 2>/dev/null && echo "    killed pid $pid with SIGKILL; last ack: $(grep '^ack' "$dir/ingest-1.log" | tail -1 || echo none)"
wait "$pid" 2>/dev/null || true
$bin/appliance ingest --data-dir "$dir/data" "$dir/vm.drs" | grep -v '^ack'
echo "    took $(( $(now_ms) - start )) ms (both runs)"

item=$($bin/appliance points --data-dir "$dir/data" | awk '/^item/ {print $2; exit}')
step "recovery points of item $item (first and last five)"
$bin/appliance points --data-dir "$dir/data" --item "$item" | sed -n '1,7p'
echo "    ..."
$bin/appliance points --data-dir "$dir/data" --item "$item" | tail -5

step "materialize the latest app-consistent point (raw) and compare with the source at that bookmark"
start=$(now_ms)
$bin/appliance materialize --data-dir "$dir/data" --item "$item" --point latest-app \
    --out "$dir/restore/app" --format raw
echo "    took $(( $(now_ms) - start )) ms"
for i in 0 1 2; do
    check "disk $i at the last app-consistent point equals the source (cmp)" \
        cmp -s "$dir/restore/app/disk-$i.raw" "$dir/source/disk-$i.app.img"
done

step "materialize the latest processed point as fixed VHD and compare with qemu-img"
start=$(now_ms)
$bin/appliance materialize --data-dir "$dir/data" --item "$item" --point latest-processed \
    --out "$dir/restore/latest" --format vhd
echo "    took $(( $(now_ms) - start )) ms"
qemu-img info -f vpc "$dir/restore/latest/disk-0.vhd" | sed -n '1,3p'
for i in 0 1 2; do
    check "disk $i (VHD) at the latest point equals the source (qemu-img compare)" \
        qemu-img compare -q -f raw -F vpc "$dir/source/disk-$i.img" "$dir/restore/latest/disk-$i.vhd"
done

step "bad input: a flipped bit and a truncated copy must be refused (exit 2, named error)"
size=$(stat -c %s "$dir/vm.drs")
cp "$dir/vm.drs" "$dir/flipped.drs"
pos=$((size / 2))
byte=$(od -An -tu1 -j "$pos" -N1 "$dir/vm.drs" | tr -d ' ')
printf "$(printf '\\%03o' $((byte ^ 1)))" | dd of="$dir/flipped.drs" bs=1 seek="$pos" conv=notrunc status=none
head -c $((size - 1000)) "$dir/vm.drs" > "$dir/truncated.drs"
refused() {
    local rc=0
    $bin/appliance stream inspect "$1" >/dev/null || rc=$?
    [ "$rc" -eq 2 ]
}
check "a flipped bit is refused with exit 2" refused "$dir/flipped.drs"
check "a truncated stream is refused with exit 2" refused "$dir/truncated.drs"

step "summary"
printf '  %s\n' "${checks[@]}"
echo "  files in $dir"
if printf '%s\n' "${checks[@]}" | grep -q '^FAIL'; then
    echo "DEMO FAILED"
    exit 1
fi
echo "all checks passed"
