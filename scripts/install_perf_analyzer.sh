#!/usr/bin/env bash
# Install Triton's perf_analyzer (a C++ binary) into DIR, for tests/test_perf_analyzer.py and
# benchmarks/perf_analyzer_sweep.py:
#
#     bash scripts/install_perf_analyzer.sh [DIR]        # default: .tools/perf_analyzer in this checkout
#     DIR/perf_analyzer -m zfnet-demo -i grpc -u 127.0.0.1:8001 --concurrency-range 1:4
#
# Where it comes from: PyPI's tritonclient wheels for Linux x86-64 carry the binary up to 2.60 (later ones
# depend on an empty "perf-analyzer" placeholder); 2.52..2.60 need glibc 2.38, so 2.51.0 is the newest that
# runs on Debian 12 (glibc 2.36). Only the binary is taken from the wheel (no Python package is installed, so
# its protobuf < 5 pin does not matter). It links two libraries the base system lacks:
#   libb64.so.0d     Debian's libb64-0d (apt-get install as root; otherwise the .deb is unpacked into DIR/lib)
#   libcudart.so.12  the CUDA runtime, needed even for CPU-only use: PyPI's nvidia-cuda-runtime-cu12
# DIR/perf_analyzer is a wrapper that puts DIR/lib on LD_LIBRARY_PATH and runs DIR/bin/perf_analyzer.
set -euo pipefail

TRITONCLIENT_VERSION=2.51.0
CUDART_VERSION=12.9.79
here=$(cd "$(dirname "$0")/.." && pwd)
dir=${1:-$here/.tools/perf_analyzer}
python=${PYTHON:-python3}

fail() { echo "install_perf_analyzer: $*" >&2; exit 1; }
[ "$(uname -sm)" = "Linux x86_64" ] || fail "perf_analyzer wheels exist for Linux x86-64 only (this is $(uname -sm))"

mkdir -p "$dir/bin" "$dir/lib"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# The two wheels, without dependencies; a wheel is a zip file, so only the needed members are extracted.
"$python" -m pip download --quiet --no-deps --only-binary=:all: --dest "$work" \
  "tritonclient==$TRITONCLIENT_VERSION" "nvidia-cuda-runtime-cu12==$CUDART_VERSION" ||
  fail "pip download failed (needs the package registry)"
"$python" - "$work" "$dir" <<'EOF'
import glob, os, sys, zipfile
work, out = sys.argv[1:]
wanted = {"tritonclient-": ("/bin/perf_analyzer", "bin"), "nvidia_cuda_runtime_cu12-": ("/lib/libcudart.so.12", "lib")}
for prefix, (suffix, sub) in wanted.items():
    (wheel,) = glob.glob(os.path.join(work, prefix + "*.whl"))
    with zipfile.ZipFile(wheel) as z:
        (member,) = [n for n in z.namelist() if n.endswith(suffix)]
        target = os.path.join(out, sub, os.path.basename(member))
        with z.open(member) as src, open(target, "wb") as dst:
            dst.write(src.read())
        os.chmod(target, 0o755)
EOF

if ! ldconfig -p 2>/dev/null | grep -q 'libb64\.so\.0d' && [ ! -e "$dir/lib/libb64.so.0d" ]; then
  if [ "$(id -u)" = 0 ]; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libb64-0d >/dev/null; } ||
      fail "apt-get install libb64-0d failed"
  else   # no root: unpack the package into DIR/lib
    (cd "$work" && apt-get download libb64-0d >/dev/null) || fail "apt-get download libb64-0d failed"
    dpkg-deb -x "$work"/libb64-0d_*.deb "$work/deb"
    cp "$work"/deb/usr/lib/x86_64-linux-gnu/libb64.so.0d* "$dir/lib/"
  fi
fi

cat >"$dir/perf_analyzer" <<EOF
#!/usr/bin/env bash
# perf_analyzer $TRITONCLIENT_VERSION with the libraries installed beside it (scripts/install_perf_analyzer.sh).
export LD_LIBRARY_PATH="$dir/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
exec "$dir/bin/perf_analyzer" "\$@"
EOF
chmod +x "$dir/perf_analyzer"
version=$("$dir/perf_analyzer" --version 2>&1) ||
  fail "the installed binary does not start: $version"
echo "install_perf_analyzer: $version -> $dir/perf_analyzer"
