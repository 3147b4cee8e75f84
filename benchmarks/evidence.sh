#!/usr/bin/env bash
# The evidence tables of docs/evaluation.md, made with `musk eval` and `musk report` on the final code:
# train each method on a cache for each seed (skipping finished runs, resuming unfinished ones), evaluate
# each run not evaluated before (delete its eval folder to redo): every run with C (single too: "ablated
# - single" reads its folder), each run that has C also with C removed and null (C's information removed,
# slots kept), each run that reads experts under the content controls: each expert dropped, each expert's
# features shuffled across prompts, all experts shuffled together (shuffle:all); then report (paired
# intervals against single and prefix, the expert-ablation table, routing per dataset). Default methods:
# single, prefix (m trainable context tokens, no experts) and perceiver.
#
#   benchmarks/evidence.sh NAME CACHE TRAIN_CONFIG OUT [SEEDS] [METHODS]
#
#   benchmarks/evidence.sh probe    caches/probe.h5           configs/train/probe.yaml            evidence "0 1 2"
#   benchmarks/evidence.sh embedded caches/easy-arithmetic.h5 configs/train/embedded-default.yaml evidence "0 1 2"
#
# Writes OUT/NAME-runs/<method>-<seed>/ (each run's eval/final-val-ablations/ inside) and
# OUT/NAME-report/ (summary.md, report.html, paired.md, ablations.md, ...), and prints the two tables.
# Environment: MUSK (the command, default musk), THREADS (--threads for every job, default torch's),
# EVAL_ARGS (extra `musk eval` options, e.g. "--limit 64" or "--samples 4 --temperature 1.0"),
# TRAIN_SET (space-separated KEY=VALUE for every `musk train`, e.g. a recipe: "sft_warmup_steps=30").
set -euo pipefail

if [ $# -lt 4 ]; then
  sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
name=$1 cache=$2 config=$3 out=$4
seeds=${5:-"0 1 2"}
methods=${6:-"single prefix perceiver"}
musk=${MUSK:-musk}
threads=${THREADS:+--threads $THREADS}
runs=$out/$name-runs
train_set=()
for kv in ${TRAIN_SET:-}; do train_set+=(--set "$kv"); done

for s in $seeds; do
  for m in $methods; do
    run=$runs/$m-$s
    [ -f "$run/summary.json" ] && continue
    resume=""
    [ -f "$run/config.yaml" ] && resume=--resume
    $musk train --cache "$cache" --method "$m" --config "$config" --seed "$s" --out "$run" $resume $threads --no-progress \
      "${train_set[@]}"
  done
done

for run in "$runs"/*/; do
  run=${run%/}
  [ -f "$run/eval/final-val-ablations/summary.json" ] && continue  # evaluated before: delete the folder to redo
  # method and team from the run's own config.yaml
  read -r method experts < <(python -c 'import sys, yaml; c = yaml.safe_load(open(sys.argv[1]))
print(c["method"], " ".join(c.get("experts") or []))' "$run/config.yaml")
  contexts=with,without,null
  case $method in single|output-collab) contexts=with ;; esac  # single too: "ablated − single" reads its folder
  ablate=()
  for e in $experts; do ablate+=(--ablate "drop:$e" --ablate "shuffle:$e"); done
  [ -n "$experts" ] && ablate+=(--ablate shuffle:all)
  $musk eval "$run" --context $contexts "${ablate[@]}" --out "$run/eval/final-val-ablations" $threads \
    --no-progress ${EVAL_ARGS:-}
done

$musk report "$runs" --out "$out/$name-report"
echo
cat "$out/$name-report/paired.md" "$out/$name-report/ablations.md"
