#!/usr/bin/env bash
# The project's test command (README). Tests read ../shared/fixtures and fail if it is absent.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/fetch-assets.sh
cargo test --release 2>&1
