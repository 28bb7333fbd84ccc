#!/usr/bin/env bash
# Install zfserve into a fresh virtualenv at PREFIX and prove that the result starts. This is the one install
# recipe: the Dockerfile's builder stage runs it, and so does CI (.ci/run), so CI exercises what the image ships.
#
#   bash scripts/install.sh [--no-check] PREFIX        # from any directory
#
# Steps: python3 -m venv PREFIX; pip install torch; pip install <this checkout>[cpu] (not editable, so PREFIX
# holds everything and can be copied as is); then the check: `zfserve --version`, and a real start of
# `zfserve serve --http-port 0` on free loopback ports, polled with `zfserve health` until SERVING, the explorer
# page and its files fetched over HTTP, then SIGTERM, which must exit 0. --no-check skips the start (for a
# build host that cannot open a loopback port).
#
# Environment:
#   PYTHON           the interpreter for the venv (default python3)
#   TORCH_SPEC       the torch requirement (default torch==2.13.0: a CPU build on our machines; an unpinned torch
#                    from PyPI is the multi-GB CUDA build)
#   TORCH_INDEX_URL  pip --index-url for torch alone, when set (the Dockerfile uses PyTorch's CPU wheel index)
#   ZFSERVE_INSTALL_TIMEOUT_S  how long the start check may wait for SERVING (default 120)
#
# PREFIX may be an existing virtualenv (it is recreated) or a missing or empty directory; anything else is
# refused rather than overwritten. A virtualenv embeds its absolute path: install where it will be used.
set -euo pipefail

die() { echo "install.sh: error: $*" >&2; exit 1; }
usage() { echo "usage: bash scripts/install.sh [--no-check] PREFIX" >&2; exit 2; }

check=1
prefix=
while [ $# -gt 0 ]; do
  case "$1" in
    --no-check) check=0 ;;
    -h | --help) echo "usage: bash scripts/install.sh [--no-check] PREFIX"; exit 0 ;;
    -*) echo "install.sh: error: unknown option $1" >&2; usage ;;
    *) [ -z "$prefix" ] || usage; prefix=$1 ;;
  esac
  shift
done
[ -n "$prefix" ] || usage

python=${PYTHON:-python3}
torch_spec=${TORCH_SPEC:-torch==2.13.0}
timeout_s=${ZFSERVE_INSTALL_TIMEOUT_S:-120}
# The checkout this script belongs to, whatever the caller's directory.
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
started=$(date +%s)
say() { echo "install.sh: [$(( $(date +%s) - started )) s] $*"; }

[ -f "$root/pyproject.toml" ] || die "$root/pyproject.toml not found: this script must stay in a zfserve checkout"
command -v "$python" >/dev/null 2>&1 || die "$python not found (set PYTHON to a Python 3.10+ interpreter)"
if [ -e "$prefix" ] && [ ! -f "$prefix/pyvenv.cfg" ] && [ -n "$(ls -A "$prefix" 2>/dev/null)" ]; then
  die "$prefix exists and is not a virtualenv; choose another PREFIX or remove it"
fi

say "creating the virtualenv $prefix with $python"
"$python" -m venv --clear "$prefix" || die "$python -m venv $prefix failed (Debian: apt-get install python3-venv)"
prefix=$(cd "$prefix" && pwd)
pip=("$prefix/bin/python" -m pip install --no-cache-dir --progress-bar off)

torch_index=()
if [ -n "${TORCH_INDEX_URL:-}" ]; then torch_index=(--index-url "$TORCH_INDEX_URL"); fi
say "installing $torch_spec${TORCH_INDEX_URL:+ from $TORCH_INDEX_URL}"
"${pip[@]}" ${torch_index[@]+"${torch_index[@]}"} "$torch_spec" || die "pip could not install $torch_spec"

scratch=$(mktemp -d)
server=
cleanup() {
  if [ -n "$server" ]; then kill -KILL "$server" 2>/dev/null || true; fi
  rm -rf "$scratch"
}
trap cleanup EXIT

# torch is already satisfied, so this leaves it alone and adds the rest (onnxruntime through the cpu extra).
# setuptools builds in the source tree by default (build/, *.egg-info), and files left in an old build/lib end
# up in the wheel; DIST_EXTRA_CONFIG moves both into the scratch directory, so the checkout is only read.
printf '[build]\nbuild_base = %s/build\n[egg_info]\negg_base = %s\n' "$scratch" "$scratch" >"$scratch/setup.cfg"
say "installing zfserve from $root with the cpu extra"
DIST_EXTRA_CONFIG=$scratch/setup.cfg "${pip[@]}" "${root}[cpu]" || die "pip could not install ${root}[cpu]"

# From the scratch directory, so a checkout in the current directory cannot shadow the installed package.
cd "$scratch"

version=$("$prefix/bin/zfserve" --version) || die "$prefix/bin/zfserve --version failed"
location=$("$prefix/bin/python" -c 'import zfserve; print(zfserve.__file__)') || die "zfserve does not import"
case "$location" in
  "$prefix"/*) ;;
  *) die "zfserve imports from $location, not from $prefix" ;;
esac
say "installed $version"

if [ "$check" = 0 ]; then
  say "done (start check skipped)"
  exit 0
fi

# The start check. Its ONNX export goes to a scratch cache, so nothing is left in ~/.cache (or in the image).
log=$scratch/serve.log
say "start check: zfserve serve --http-port 0 on free loopback ports"
ZFSERVE_CACHE_DIR=$scratch/cache "$prefix/bin/zfserve" serve --host 127.0.0.1 --port 0 --http-port 0 >"$log" 2>&1 &
server=$!
deadline=$(( $(date +%s) + timeout_s ))
alive_or_die() {
  if ! kill -0 "$server" 2>/dev/null; then
    server=
    sed 's/^/  serve: /' "$log" >&2
    die "zfserve serve exited during the start check (its output is above)"
  fi
  if [ "$(date +%s)" -ge "$deadline" ]; then
    sed 's/^/  serve: /' "$log" >&2
    die "zfserve serve was not SERVING within ${timeout_s} s (ZFSERVE_INSTALL_TIMEOUT_S)"
  fi
}

port=
while [ -z "$port" ]; do
  alive_or_die
  port=$(sed -n 's/^zfserve: listening on 127\.0\.0\.1:\([0-9][0-9]*\)$/\1/p' "$log")
  [ -n "$port" ] || sleep 0.2
done
until status=$("$prefix/bin/zfserve" health --server "127.0.0.1:$port" 2>&1); do
  alive_or_die
  sleep 1
done
say "health on port $port: $status"

# The HTTP side from the installed files: the explorer page, its scripts and bundled examples (package data).
http_port=$(sed -n 's/^zfserve: http on 127\.0\.0\.1:\([0-9][0-9]*\)$/\1/p' "$log")
[ -n "$http_port" ] || die "zfserve serve --http-port 0 printed no HTTP address"
"$prefix/bin/python" - "$http_port" <<'PY' || die "the installed package does not serve the explorer page"
import json, sys, urllib.request
base = f"http://127.0.0.1:{sys.argv[1]}"
for path in ("/", "/explorer/app.js", "/explorer/style.css"):
    with urllib.request.urlopen(base + path, timeout=30) as response:
        assert response.status == 200 and response.read(), path
with urllib.request.urlopen(base + "/v2/health/ready", timeout=30) as response:   # REST health: the status says
    assert response.status == 200, "/v2/health/ready"
with urllib.request.urlopen(base + "/api/v1/examples", timeout=30) as response:
    examples = json.load(response)
assert examples, "no bundled examples"
with urllib.request.urlopen(f"{base}/explorer/examples/{examples[0]['name']}.jpg", timeout=30) as response:
    assert response.read(3) == b"\xff\xd8\xff", "an example is not a JPEG"
PY
say "HTTP on port $http_port: the explorer page, its files and examples served"

# SIGTERM must drain and exit 0 (what Kubernetes sends on a pod's deletion).
kill -TERM "$server"
for _ in $(seq 1 120); do
  kill -0 "$server" 2>/dev/null || break
  sleep 0.5
done
if kill -0 "$server" 2>/dev/null; then
  sed 's/^/  serve: /' "$log" >&2
  die "zfserve serve did not exit within 60 s of SIGTERM"
fi
rc=0
wait "$server" || rc=$?
server=
if [ "$rc" != 0 ]; then
  sed 's/^/  serve: /' "$log" >&2
  die "zfserve serve exited with status $rc after SIGTERM (expected 0)"
fi
say "done: $version in $prefix starts, reports SERVING and stops cleanly on SIGTERM"
