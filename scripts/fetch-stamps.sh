#!/usr/bin/env bash
# Unpacks the demo's object photographs, Debian's `tuxpaint-stamps-default`, into
# .assets/tuxpaint/ (project-local: downloaded with apt-get and unpacked with dpkg -x, nothing is
# installed). Skipped when already there or installed system-wide; without it the demo draws
# shapes instead and says so.
set -uo pipefail
cd "$(dirname "$0")/.."
dest=.assets/tuxpaint
if [ -d "$dest/usr/share/tuxpaint/stamps" ] || [ -d /usr/share/tuxpaint/stamps ]; then exit 0; fi
command -v apt-get >/dev/null 2>&1 || { echo "fetch-stamps: no apt-get; the demo will draw shapes" >&2; exit 0; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
download() { (cd "$tmp" && apt-get download -qq tuxpaint-stamps-default >/dev/null 2>&1); }
# A fresh machine may have no package lists yet.
if ! download && [ "$(id -u)" = 0 ]; then apt-get update -qq >/dev/null 2>&1; download; fi
deb=$(ls "$tmp"/tuxpaint-stamps-default_*.deb 2>/dev/null | head -n 1)
if [ -z "$deb" ]; then
  echo "fetch-stamps: could not download tuxpaint-stamps-default; the demo will draw shapes" >&2
  exit 0
fi
mkdir -p "$dest" && dpkg -x "$deb" "$dest" && echo "fetch-stamps: unpacked $(find "$dest" -name '*.png' | wc -l) stamps into $dest"
exit 0
