#!/usr/bin/env bash
# An arm64 Python 3.11 sysroot for running aarch64 TVM libraries under qemu-user (benchmarks/cross_targets.py):
# Debian bookworm's arm64 python3.11 and the libraries it links, plus numpy and the aarch64 apache-tvm wheels.
# Needs root for apt (dpkg --add-architecture arm64) and qemu-user-static.  Usage: aarch64_sysroot.sh DIR
set -euo pipefail
root=$(realpath -m "${1:?usage: aarch64_sysroot.sh DIR}")
pip=${PIP:-.venv/bin/pip}
dpkg --add-architecture arm64
apt-get update -qq
apt-get install -y -qq qemu-user-static g++-aarch64-linux-gnu >/dev/null
debs=$(mktemp -d)
(cd "$debs" && apt-get download python3.11-minimal:arm64 libpython3.11-minimal:arm64 libpython3.11-stdlib:arm64 \
  libc6:arm64 libstdc++6:arm64 libgcc-s1:arm64 zlib1g:arm64 libexpat1:arm64 libffi8:arm64 libssl3:arm64 \
  libbz2-1.0:arm64 liblzma5:arm64 libsqlite3-0:arm64 libuuid1:arm64 libncursesw6:arm64 libtinfo6:arm64 \
  libreadline8:arm64 libcrypt1:arm64)
for deb in "$debs"/*.deb; do dpkg -x "$deb" "$root"; done
site="$root/usr/lib/python3.11/site-packages"
mkdir -p "$site"
"$pip" download -q --only-binary=:all: --platform manylinux_2_28_aarch64 --python-version 3.11 --implementation cp \
  --no-deps -d "$debs/wheels" apache-tvm==0.27.0.post1 apache-tvm-ffi==0.1.14.post1 numpy==2.4.6 ml_dtypes==0.6.0 \
  typing_extensions==4.16.0
for wheel in "$debs"/wheels/*.whl; do python3 -m zipfile -e "$wheel" "$site"; done
rm -rf "$debs"
echo "sysroot ready: $root"
