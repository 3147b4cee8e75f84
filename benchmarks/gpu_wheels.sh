#!/usr/bin/env bash
# The wheels benchmarks/gpu.sh needs on a GPU machine that has PyTorch, transformers, peft, h5py and
# typer but no package index: musk's other needs on the path it runs (reasoning-gym and everything it
# pulls in) and the test runner (pytest, hypothesis), each with its dependencies, minus what an
# install of PyTorch + transformers + peft + h5py + typer already holds. Size target: under 64 MB.
#
#   benchmarks/gpu_wheels.sh [DIR]        # default benchmarks/gpu_wheels (ignored by git: never commit wheels)
#
# Run it on a machine with a package index and the GPU machine's Python version and CPU architecture:
# three of reasoning-gym's dependencies are source archives (pycosat has C code), built into wheels
# here. polars is left out: nothing on gpu.sh's path imports it (only `musk report` and GSM8K
# loading do), and its wheel alone is ~54 MB; WITH_POLARS=1 adds it (the folder then exceeds 64 MB).
# Copy DIR next to the repository on the GPU machine and run benchmarks/gpu.sh --wheels DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-benchmarks/gpu_wheels}
python=${PYTHON:-python3}
wants="reasoning-gym>=0.1.20 pytest>=8 hypothesis>=6.100"
[ "${WITH_POLARS:-0}" = 1 ] && wants="$wants polars>=1.0"

mkdir -p "$dir"
# shellcheck disable=SC2086
"$python" -m pip wheel --quiet --wheel-dir "$dir" $wants
# What the GPU machine already has: the distributions an install of its five packages resolves to.
base=$(mktemp)
trap 'rm -f "$base"' EXIT
"$python" -m pip install --quiet --dry-run --ignore-installed --report "$base" torch transformers peft h5py typer
"$python" - "$dir" "$base" <<'EOF'
import json, re, sys
from pathlib import Path

folder, report = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text())
norm = lambda s: re.sub(r"[-_.]+", "-", s).lower()
have = {norm(i["metadata"]["name"]) for i in report["install"]}
for w in folder.glob("*.whl"):
    if norm(w.name.split("-")[0]) in have:
        w.unlink()
EOF
printf '%s\n' $wants > "$dir/requirements.txt"
size=$(du -sm "$dir" | cut -f1)
ls -1 "$dir"
echo "$dir: ${size} MB (target < 64 MB)"
[ "$size" -lt 64 ] || echo "gpu_wheels.sh: over the 64 MB target" >&2
