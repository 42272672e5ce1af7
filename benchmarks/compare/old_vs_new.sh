#!/usr/bin/env bash
# make bench's four benchmarks under an older skipvlm (OLD, a checkout of that commit, e.g.
# `git worktree add /tmp/old ec0a79e`) and this tree, one after the other in one session, so their
# ratios can be compared. Results go to $OUT/old and $OUT/new. Run from the repository root:
#   OLD=/tmp/old bash benchmarks/compare/old_vs_new.sh
set -uo pipefail
PY=${PY:-$PWD/.venv/bin/python}
OLD=${OLD:?set OLD to a checkout of the older commit}
NEW=$PWD
OUT=${OUT:-/tmp/skipvlm-old-vs-new}
mkdir -p "$OUT/old" "$OUT/new"
for b in skip_runtime eas_merge token_exit; do
  for side in old new; do
    dir=$NEW; [ "$side" = old ] && dir=$OLD
    echo "=== $b $side $(date +%T)"
    (cd "$dir" && PYTHONPATH=$dir/src:$dir/benchmarks "$PY" benchmarks/$b.py --out "$OUT/$side/$b.json")
  done
done
for side in old new; do
  # the bench's count flag was --skip before the CLI redesign
  dir=$NEW; flag=--skip-attention-counts; [ "$side" = old ] && dir=$OLD && flag=--skip
  echo "=== bench $side $(date +%T)"
  (cd "$dir" && PYTHONPATH=$dir/src "$PY" -m skipvlm.cli bench --preset llama-cpu $flag 0,4,6,8 \
      --methods stock,lora,pia,eas --device cpu --out "$OUT/$side/bench")
done
