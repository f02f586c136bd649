#!/usr/bin/env bash
# Installs Debian's Chromium for the web-page test (tests/serve_page.rs), once.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then exit 0; fi
if [ "$(id -u)" != 0 ]; then
  echo "install-chromium: chromium is missing and this is not root; install it by hand" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq chromium >/dev/null
