#!/usr/bin/env bash
# Installs everything modelfs and its tests need on a fresh Debian machine (run as root):
# system packages (FUSE 3, CNCF Distribution) and a virtualenv at .venv with modelfs[test]
# (which brings modelfs[signing]: signature checks are tested too).
set -euo pipefail
cd "$(dirname "$0")/.."

# gcc, python3-dev and python3-venv: pyfuse3 compiles against libfuse3 when pip finds no wheel.
packages=(fuse3 libfuse3-dev pkg-config gcc python3-dev python3-venv docker-registry skopeo curl ca-certificates)
missing=()
for pkg in "${packages[@]}"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${missing[@]}" >/dev/null
fi
# Debian's package may start a registry of its own on :5000; modelfs uses its own ports.
# Unprivileged mounts need /dev/fuse at Debian's default mode (udev sets 0666); some
# containers create it 0600.
[ -c /dev/fuse ] && chmod 0666 /dev/fuse || true

python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip >/dev/null
.venv/bin/pip install -q -e '.[test]'
# mount(8) runs fstab/`mount -t fuse.modelfs` helpers with a fixed PATH; the systemd unit
# names /usr/local/bin/modelfs. Make this checkout's modelfs the one they find.
ln -sf "$(pwd)/.venv/bin/modelfs" /usr/local/bin/modelfs
