#!/usr/bin/env bash
# The project's test command (README). Tests read ../shared/fixtures and fail if it is absent.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/fetch-assets.sh
./scripts/install-chromium.sh   # the web-page test (tests/serve_page.rs); no-op when present
cargo test --release 2>&1
