#!/usr/bin/env bash
# The main job on the built-in default (README command 1): fetches the offline pretrained weights
# and the object photographs into .assets/, builds, and runs `slot4acir demo` (benchmark, training,
# before/after evaluation, report and submission under demo-out/). Extra arguments go to the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/fetch-assets.sh
./scripts/fetch-stamps.sh
cargo build --release --quiet
exec ./target/release/slot4acir demo --out demo-out "$@"
