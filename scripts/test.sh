#!/usr/bin/env bash
# The project's test command: what CI runs (.ci/run) and what a developer runs before pushing.
# Installs what it needs itself, so it passes on a fresh machine with only the Rust toolchain.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\n==> %s\n' "$*"; }

say "toolchain components (rustfmt, clippy)"
if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
    rustup component add rustfmt clippy
fi

# Outside tools that tests check our output against (qemu-img, promtool) are installed when missing.
# Tests that need them say so and skip only when installation is impossible.
scripts/install-tools.sh || echo "warning: could not install outside tools; tests that need them will say so"

say "cargo fmt --check"
cargo fmt --all --check

say "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

say "import cycles between sibling modules (scripts/check-import-cycles.py)"
python3 scripts/check-import-cycles.py --self-test
python3 scripts/check-import-cycles.py

say "cargo test"
cargo test --workspace --locked

say "control API: schemathesis (every check, stateful phase) against a real serve"
scripts/schemathesis.sh
