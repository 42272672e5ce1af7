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
# summary lines (batch-8 speedup kept, compiled decode of bound, LaVIN vs EAS-12) and the machine. It is
# written after each part, and each part's bench JSON (beside it, in <out>_parts/) after each batch size
# and mode: a part that fails (or a run that is stopped) keeps everything timed before; a failed part is
# named in the JSON ("failed") and the script then exits 1, after running the other part.
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
case "$BUDGET" in ''|*[!0-9]*) echo "--budget-s takes whole seconds, got '$BUDGET'" >&2; exit 2 ;; esac
PY="${PYTHON:-python}"
command -v "$PY" >/dev/null || { echo "no Python at '$PY'; set PYTHON=/path/to/python" >&2; exit 2; }
if [ -n "$WHEELS" ]; then
  [ -d "$WHEELS" ] || { echo "--wheels $WHEELS is not a folder" >&2; exit 2; }
  if ! "$PY" -m pip install -q --no-index --find-links "$WHEELS" "transformers>=5.23.0,<5.25" accelerate; then
    echo "could not install transformers>=5.23.0,<5.25 and accelerate from $WHEELS without internet: pip names" \
      "the missing wheel above; make the folder with the pip download line in the header of $0" >&2
    exit 3
  fi
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# Before minutes of work: skipvlm imports (its dependencies are there) and, for the real run, a GPU.
WANT_CUDA=$(( 1 - DRY ))
"$PY" - "$WANT_CUDA" <<'PYEOF' || exit 3
import sys
try:
    import torch
    import transformers
    import skipvlm.bench  # noqa: F401
    import skipvlm.cli  # noqa: F401
except ImportError as err:
    sys.exit(f"gpu_suite: {err}; install it (pass --wheels DIR on a machine without internet)")
print(f"gpu_suite: torch {torch.__version__}, transformers {transformers.__version__}, python {sys.version.split()[0]}")
if sys.argv[1] == "1" and not torch.cuda.is_available():
    sys.exit("gpu_suite: torch sees no CUDA device; run on the GPU machine, or pass --dry-run for the CPU check")
PYEOF
STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
OUT="${OUT:-benchmarks/results/gpu_suite_$STAMP.json}"
PARTS="${OUT%.json}_parts"
mkdir -p "$PARTS" "$(dirname "$OUT")"
FAILED=()

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

write_suite() {  # the suite's JSON from the part files there are so far (partial ones included)
  "$PY" - "$PARTS" "$OUT" "$(( SECONDS - START ))" "$PART2_NOTE" "${FAILED[*]:-}" <<'PYEOF'
import json, sys
from pathlib import Path
from skipvlm.io import atomic_write_text

parts, out, wall, note, failed = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]

def part(name):
    path = parts / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else {"rows": [], "partial": True, "error": "not run"}

suite = {
    "suite": "benchmarks/gpu_suite.sh",
    "wall_s": wall,
    "failed": failed.split(),
    "parts": {
        "serving": part("serving"),
        "lavin_vs_eas": {**part("lavin_vs_eas"), "note": f"LaVIN (unmerged) vs EAS-12 (merged): {note}"},
    },
}
atomic_write_text(out, json.dumps(suite, indent=1) + "\n")
print(f"wrote {out} ({wall} s)")
PYEOF
}

run_part() {  # NAME BENCH-ARGS...: a failing part is recorded, and the suite goes on
  local name="$1"; shift
  "$PY" -m skipvlm.cli bench "$@" --out "$PARTS/$name.json" || {
    echo "gpu_suite: part $name failed (exit $?); its rows timed before the error are kept" >&2
    FAILED+=("$name")
  }
}

START=$SECONDS
PART2_NOTE="not run yet"
run_part serving "${COMMON[@]}" "${PART1[@]}" --methods stock,eas,vtw,eas+vtw
write_suite
LEFT=$(( BUDGET - (SECONDS - START) ))
PART2_NOTE="eager and compiled"
if [ "$LEFT" -lt $(( BUDGET / 3 )) ]; then  # compiling two more 7B models would overrun the budget
  EAGER=()
  for a in "${COMMON[@]}"; do [ "$a" = --compile ] || EAGER+=("$a"); done
  COMMON=("${EAGER[@]}")
  PART2_NOTE="eager only: part 1 left ${LEFT}s of the ${BUDGET}s budget"
fi
run_part lavin_vs_eas "${COMMON[@]}" "${PART2[@]}" --methods stock,lavin,eas
write_suite
[ ${#FAILED[@]} -eq 0 ] || { echo "gpu_suite: failed parts: ${FAILED[*]} (see $OUT)" >&2; exit 1; }
