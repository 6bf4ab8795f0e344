#!/usr/bin/env bash
# Schema-driven fuzzing of the control API: schemathesis (every check, every phase including
# the stateful one that follows the document's links) against a real `appliance serve` on a
# temporary data directory. Fails on any finding: a request valid by /openapi.json refused as
# malformed, a 5xx, an answer that contradicts the document, ...
#
#   scripts/schemathesis.sh                 # 100 examples per operation, seed 1
#   EXAMPLES=500 SEED=7 scripts/schemathesis.sh
#
# Installs schemathesis into a virtualenv (target/schemathesis-venv) when missing.
#
# One check is excluded, `use_after_free`: DELETE /v1/items/{id} disables protection and the
# item stays readable in state `disabled` (docs/design/control-api.md), which that check
# counts as a deleted resource still available.
set -euo pipefail
cd "$(dirname "$0")/.."

EXAMPLES="${EXAMPLES:-100}"
SEED="${SEED:-1}"
VENV="${SCHEMATHESIS_VENV:-target/schemathesis-venv}"

say() { printf '\n==> %s\n' "$*"; }

if ! "$VENV/bin/schemathesis" --version >/dev/null 2>&1; then
    say "installing schemathesis into $VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet schemathesis
fi
"$VENV/bin/schemathesis" --version

say "building appliance"
cargo build --locked -p appliance
APPLIANCE="$(pwd)/target/debug/appliance"

WORK="$(mktemp -d)"
SERVE_PID=""
cleanup() {
    if [ -n "$SERVE_PID" ] && kill -0 "$SERVE_PID" 2>/dev/null; then
        kill -TERM "$SERVE_PID"
        wait "$SERVE_PID" || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

say "starting appliance serve on $WORK/data"
mkdir "$WORK/data"
"$APPLIANCE" serve --data-dir "$WORK/data" --data-addr 127.0.0.1:0 --api-addr 127.0.0.1:0 --nbd-addr 127.0.0.1:0 \
    >"$WORK/serve.out" 2>"$WORK/serve.err" &
SERVE_PID=$!
API=""
for _ in $(seq 1 600); do
    API="$(sed -n 's/^control API listening on //p' "$WORK/serve.out")"
    [ -n "$API" ] && break
    kill -0 "$SERVE_PID" 2>/dev/null || { cat "$WORK/serve.err"; exit 1; }
    sleep 0.1
done
[ -n "$API" ] || { echo "serve did not start"; cat "$WORK/serve.err"; exit 1; }
TOKEN="$(cat "$WORK/data/api-token")"

say "schemathesis: $EXAMPLES examples per operation, seed $SEED, against http://$API"
started=$(date +%s)
status=0
# From the temporary directory: schemathesis keeps its example database in the working directory.
VENV_ABS="$(cd "$VENV" && pwd)"
(cd "$WORK" && "$VENV_ABS/bin/schemathesis" run "http://$API/openapi.json" \
    --checks all --exclude-checks use_after_free \
    --phases examples,coverage,fuzzing,stateful \
    --header "Authorization: Bearer $TOKEN" \
    --max-examples "$EXAMPLES" --seed "$SEED" \
    --no-color) || status=$?
echo "schemathesis took $(( $(date +%s) - started )) s"

# No request may have made the server fail or stop.
if ! kill -0 "$SERVE_PID" 2>/dev/null; then
    echo "serve is no longer running"; cat "$WORK/serve.err"; exit 1
fi
if grep -E 'panicked' "$WORK/serve.err"; then
    echo "serve panicked during the run (above)"; status=1
fi
exit "$status"
