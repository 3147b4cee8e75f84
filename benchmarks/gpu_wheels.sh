#!/usr/bin/env bash
# The wheels benchmarks/gpu.sh needs on a GPU machine that has PyTorch, transformers, peft, h5py,
# typer, pytest and hypothesis but no package index: reasoning-gym and what it pulls in, minus what the
# machine's image already holds, fetched for the GPU machine's Python (3.12 by default; PYTHON_VERSION)
# and Linux x86-64, binary wheels only, each wheel's tags checked before the folder is written
# (benchmarks/gpu_wheels.py). pycosat (C code, no binary wheel; reasoning-gym pins it for its zebra
# puzzles) is left out: gpu.sh puts a stand-in in its place. polars is left out too (~54 MB; only
# `musk report` and GSM8K loading import it). About 9 MB.
#
#   benchmarks/gpu_wheels.sh [DIR]        # default benchmarks/gpu_wheels (ignored by git: never commit wheels)
#
# Run it on any machine with a package index (any Python, any CPU: nothing is built for this one).
# Copy DIR next to the repository on the GPU machine and run benchmarks/gpu.sh --wheels DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-benchmarks/gpu_wheels}
python=${PYTHON:-python3}
"$python" benchmarks/gpu_wheels.py fetch "$dir" --python "${PYTHON_VERSION:-3.12}"
