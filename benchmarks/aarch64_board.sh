#!/usr/bin/env bash
# An emulated aarch64 board for the ssh device: the arm64 Python 3.11 sysroot of benchmarks/aarch64_sysroot.sh plus the
# aarch64 onnxruntime wheel, and DIR/python, an sh wrapper that runs that Python under qemu-aarch64-static as a
# Cortex-A76 (there is no binfmt here).  Point an ssh device's python at DIR/python.  It checks that builds run on
# aarch64 and agree; timings under emulation are meaningless.  Needs root (as aarch64_sysroot.sh).
# Usage: aarch64_board.sh DIR
set -euo pipefail
root=$(realpath -m "${1:?usage: aarch64_board.sh DIR}")
pip=${PIP:-.venv/bin/pip}
mkdir -p "$root"  # dpkg -x makes no parent folders
PIP=$pip bash "$(dirname "$0")/aarch64_sysroot.sh" "$root"
site="$root/usr/lib/python3.11/site-packages"
wheels=$(mktemp -d)
# import onnxruntime needs only numpy (in the sysroot); its other Requires-Dist (flatbuffers, packaging, protobuf) serve tools
"$pip" download -q --only-binary=:all: --platform manylinux_2_28_aarch64 --python-version 3.11 --implementation cp \
  --no-deps -d "$wheels" onnxruntime==1.31.1
for wheel in "$wheels"/*.whl; do python3 -m zipfile -e "$wheel" "$site"; done
rm -rf "$wheels"
# qemu 7.2 shows the guest the host's x86 /proc/cpuinfo, and onnxruntime's cpuinfo segfaults on it at import.  Under -L,
# qemu opens DIR/proc/cpuinfo instead: one of the Cortex-A76 (Raspberry Pi 5) it emulates, as Linux writes it.
mkdir -p "$root/proc"
for ((cpu = 0; cpu < $(nproc --all); cpu++)); do
  printf 'processor\t: %d\nBogoMIPS\t: 108.00\nFeatures\t: %s\nCPU implementer\t: 0x41\nCPU architecture: 8\n' "$cpu" \
    'fp asimd aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp'
  printf 'CPU variant\t: 0x4\nCPU part\t: 0xd0b\nCPU revision\t: 1\n\n'
done > "$root/proc/cpuinfo"
# The wrapper must work from env -i /bin/sh (an ssh command): an absolute qemu path, and it sets PYTHONPATH itself.
q() { printf "'%s'" "${1//\'/\'\\\'\'}"; }
cat > "$root/python" <<EOF
#!/bin/sh
PYTHONPATH=$(q "$site")\${PYTHONPATH:+:\$PYTHONPATH} exec $(q "$(command -v qemu-aarch64-static)") -cpu cortex-a76 \\
  -L $(q "$root") $(q "$root/usr/bin/python3.11") "\$@"
EOF
chmod +x "$root/python"
"$root/python" -c 'import platform, onnxruntime; print(platform.machine(), onnxruntime.__version__)'
echo "board ready: $root/python"
