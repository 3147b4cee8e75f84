#!/usr/bin/env bash
# The paper's scale on one GPU, proved and timed in one command (about 8 minutes on one H100/H200):
# the GPU-marked tests, then benchmarks/gpu_check.py (a cache from experts of the default team's
# exact shapes, `single` and `perceiver` trained a few steps at the paper's step shape through the
# CUDA-graph decoder with the first step's KL checked to be exactly 0 and every metric finite,
# decode ms a token at batch 32 x 8 against the weight-read floor, the paper step's seconds).
#
#   benchmarks/gpu.sh [--tiny] [--out DIR] [--wheels DIR] [--tokenizer DIR] [--work DIR]
#
#   --out DIR        where figures.json, log.txt and tests.log go (default gpu-check-<UTC date-time>)
#   --wheels DIR     wheels of what a bare GPU machine lacks, made by benchmarks/gpu_wheels.sh on a
#                    machine with a package index (default benchmarks/gpu_wheels); installed with
#                    pip --no-index only when an import is missing
#   --tokenizer DIR  a tokenizer folder for experts and policy (default: musk's byte-level one)
#   --work DIR       scratch for the models and runs, ~32 GB at the paper's shapes, removed at the end
#                    (default: a temporary folder under $TMPDIR or /tmp)
#   --tiny           the same path on a CPU with tiny shapes (about a minute; tests/test_gpu_script.py)
#
# Needs PyTorch, transformers, peft, h5py and typer; no hub, no index (pip's own settings apply to the
# install, e.g. PIP_USER=1 outside a virtual environment). Run from anywhere: it works in the
# repository it belongs to. Exit status: 0 when the tests passed and every check held.
set -euo pipefail
cd "$(dirname "$0")/.."

tiny="" out="gpu-check-$(date -u +%Y%m%d-%H%M%S)" wheels=benchmarks/gpu_wheels tokenizer="" work=""
while [ $# -gt 0 ]; do
  case $1 in
    --tiny) tiny=--tiny; shift ;;
    --out) out=$2; shift 2 ;;
    --wheels) wheels=$2; shift 2 ;;
    --tokenizer) tokenizer=$2; shift 2 ;;
    --work) work=$2; shift 2 ;;
    -h|--help) sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
# The files that hold GPU-marked tests (tests/test_gpu_script.py checks that none is missing); only
# these are collected, so test files that import what the bare machine lacks are never imported.
gpu_tests="tests/test_decode_step.py"
python=${PYTHON:-python3}

mkdir -p "$out"
exec > >(tee "$out/log.txt") 2>&1
home=$(mktemp -d)
trap 'rm -rf "$home"' EXIT
export MUSK_HOME=$home HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false TRANSFORMERS_VERBOSITY=error
echo "gpu.sh $(date -u +%FT%TZ) in $(pwd) (git $(git rev-parse --short HEAD 2>/dev/null || echo '?')), out $out"

if ! "$python" -c "import reasoning_gym, pytest, hypothesis, yaml, h5py, peft, typer" 2>/dev/null; then
  if [ ! -f "$wheels/requirements.txt" ]; then
    echo "gpu.sh: a module is missing and $wheels/requirements.txt is not there: make the folder with" \
         "benchmarks/gpu_wheels.sh on a machine with a package index and pass --wheels" >&2
    exit 2
  fi
  echo "installing from $wheels (no index)"
  "$python" -m pip install --quiet --no-index --find-links "$wheels" -r "$wheels/requirements.txt"
fi

t0=$(date +%s)
set +e
# shellcheck disable=SC2086
"$python" -m pytest -q -p no:cacheprovider -m gpu $gpu_tests 2>&1 | tee "$out/tests.log"
rc=${PIPESTATUS[0]}
set -e
echo "GPU-marked tests: exit status $rc in $(( $(date +%s) - t0 )) s"

t0=$(date +%s)
set +e
"$python" benchmarks/gpu_check.py --out "$out" $tiny --tests-rc "$rc" --tests-log "$out/tests.log" \
  ${tokenizer:+--tokenizer "$tokenizer"} ${work:+--work "$work"}
status=$?
set -e
echo "gpu_check: exit status $status in $(( $(date +%s) - t0 )) s; figures in $out/figures.json, log in $out/log.txt"
exit $status
