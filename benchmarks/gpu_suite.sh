#!/usr/bin/env bash
# The serving benchmark on one GPU, in one command (issue 18; the LaVIN row of issue 15).
#
#   bash benchmarks/gpu_suite.sh [--wheels DIR] [--out FILE] [--budget-s SECONDS] [--dry-run]
#
# Part 1, llava-1.5-7b in bf16 with random weights (speed does not depend on trained values), batch 1
# and 8 (left-padded prompts of 700 tokens, 576 of them one image at a different place in each row),
# 32 decoded tokens, medians of 5 interleaved rounds:
#   stock / EAS merged k = 8, 12, 16 / VTW K = 16 / EAS-12 + VTW-16, eager (dynamic cache) and compiled
#   (static cache + torch.compile'd decoding step, CUDA graphs; token-exit rows stay eager: a static
#   cache cannot hold their per-layer token counts).
# Part 2, lavin-7b (LLaMA-7B + ViT-L/14 at 224 px): LaVIN (adapt-PIA with bottleneck 8 in every layer,
#   unmerged) against EAS-12 merged, the EAS paper's 2.18x; batch 1 and 8, eager and compiled (compiled
#   dropped, and said so in the JSON, when part 1 left less than a third of --budget-s).
# Both parts go into one JSON (default benchmarks/results/gpu_suite_<date>.json) with every row, the
# summary lines (batch-8 speedup kept, compiled decode of bound, LaVIN vs EAS-12) and the machine.
#
# --wheels DIR: pip install --no-index transformers / accelerate (and their dependencies) from DIR first,
#   for a machine without internet, e.g. a DIR made beforehand with
#   pip download -d wheels --only-binary=:all: --python-version 3.12 "transformers==5.24.0" accelerate
# --dry-run: the same steps on the CPU with the tiny llava-cpu-tiny preset (8 layers: EAS k = 3 and
#   VTW K = 4 stand for all the k and K above), batch 1 and 2, 2 decoded tokens, 1 round, torch.compile's
#   eager backend (tracing only); the test suite runs it.
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS="" OUT="" DRY=0 BUDGET=480
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) WHEELS="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --budget-s) BUDGET="$2"; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    *) echo "unknown option $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done
PY="${PYTHON:-python}"
if [ -n "$WHEELS" ]; then
  [ -d "$WHEELS" ] || { echo "--wheels $WHEELS is not a folder" >&2; exit 2; }
  "$PY" -m pip install -q --no-index --find-links "$WHEELS" "transformers>=5.23.0,<5.25" accelerate
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
OUT="${OUT:-benchmarks/results/gpu_suite_$STAMP.json}"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

if [ "$DRY" = 1 ]; then
  COMMON=(--device cpu --dtype float32 --new-tokens 2 --repeats 1 --batch-size 1,2 --compile
          --compile-backend eager --threads 1)
  PART1=(--preset llava-cpu-tiny --prompt-tokens 40 --skip-attention-counts 3 --eas-vtw-counts 3
         --vtw-layer 4)
  PART2=(--preset llava-cpu-tiny --prompt-tokens 40 --skip-attention-counts 3)
else
  COMMON=(--device cuda --dtype bfloat16 --new-tokens 32 --repeats 5 --batch-size 1,8 --compile)
  PART1=(--preset llava-1.5-7b --prompt-tokens 700 --skip-attention-counts 8,12,16 --eas-vtw-counts 12
         --vtw-layer 16)
  PART2=(--preset lavin-7b --prompt-tokens 400 --skip-attention-counts 12)
fi

START=$SECONDS
"$PY" -m skipvlm.cli bench "${COMMON[@]}" "${PART1[@]}" --methods stock,eas,vtw,eas+vtw \
  --out "$TMP/part1.json"
LEFT=$(( BUDGET - (SECONDS - START) ))
PART2_NOTE="eager and compiled"
if [ "$LEFT" -lt $(( BUDGET / 3 )) ]; then  # compiling two more 7B models would overrun the budget
  EAGER=()
  for a in "${COMMON[@]}"; do [ "$a" = --compile ] || EAGER+=("$a"); done
  COMMON=("${EAGER[@]}")
  PART2_NOTE="eager only: part 1 left ${LEFT}s of the ${BUDGET}s budget"
fi
"$PY" -m skipvlm.cli bench "${COMMON[@]}" "${PART2[@]}" --methods stock,lavin,eas --out "$TMP/part2.json"

"$PY" - "$TMP/part1.json" "$TMP/part2.json" "$OUT" "$(( SECONDS - START ))" "$PART2_NOTE" <<'PYEOF'
import json, sys
from pathlib import Path
from skipvlm.io import atomic_write_text

part1, part2 = (json.loads(Path(p).read_text()) for p in sys.argv[1:3])
suite = {
    "suite": "benchmarks/gpu_suite.sh",
    "wall_s": int(sys.argv[4]),
    "parts": {
        "serving": part1,
        "lavin_vs_eas": {**part2, "note": f"LaVIN (unmerged) vs EAS-12 (merged): {sys.argv[5]}"},
    },
}
atomic_write_text(sys.argv[3], json.dumps(suite, indent=1) + "\n")
print(f"wrote {sys.argv[3]} ({sys.argv[4]} s)")
PYEOF
