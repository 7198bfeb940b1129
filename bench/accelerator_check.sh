#!/usr/bin/env bash
# The device check of issue 23, about 8 minutes on one H200 with 16 CPU cores:
#   1. read rate of a synthetic Meta-Dataset-format array_record split by worker count
#      (bench/data_md.py; the split is written first by the project's builder);
#   2. 1000 fed ERM and SAM steps against 1000 bare steps, ResNet-18 at 84 px fp32,
#      batch 64 and 256 (bench/data_md.py);
#   3. embedding 1M images through evaluate.embed_split in bounded memory
#      (bench/embed_many.py).
# Figures go to OUTDIR as JSON (one file per section, and accelerator_check.json with
# all of them); a table is printed at the end. A section that fails or overruns its
# time limit is recorded as such and the others still run; the exit status is then 1.
#
#   bench/accelerator_check.sh [OUTDIR]       # default: $OUT, else build/accelerator_check
#   ACCEL_CHECK_TINY=1 PYTHON=.venv/bin/python JAX_PLATFORMS=cpu bench/accelerator_check.sh
#       (a CPU-sized run of every section, about 4-6 minutes on 2 shared cores)
#
# Environment: PYTHON (default python3), ACCEL_LOOP_WORKERS (worker_count of the fed
# loop, default 8), ACCEL_CHECK_WORK (scratch for the split, default a temporary dir).
# Packages the machine lacks travel as wheels in build/wheels (bench/accelerator_wheels.sh
# fetches them); when that folder exists they are installed into a private
# directory first, without touching the machine's Python.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
OUTDIR="${1:-${OUT:-$ROOT/build/accelerator_check}}"
mkdir -p "$OUTDIR"
WORK="${ACCEL_CHECK_WORK:-$(mktemp -d)}"
mkdir -p "$WORK"
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3
LOG="$OUTDIR/accelerator_check.log"
: > "$LOG"
say() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$LOG"; }

export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
imports_ok() {
  "$PY" - >> "$LOG" 2>&1 << 'EOF'
import grain, array_record, tensorflow_datasets, ml_collections, jax, flax, optax  # noqa: F401
print("python ok:", jax.__version__, jax.devices())
EOF
}
if ! imports_ok; then
  if compgen -G "$ROOT/build/wheels/*.whl" > /dev/null; then
    say "installing the carried wheels (build/wheels) into $WORK/site"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$WORK/site" "$ROOT"/build/wheels/*.whl >> "$LOG" 2>&1
    export PYTHONPATH="$PYTHONPATH:$WORK/site"
  fi
  if ! imports_ok; then
    say "the project's packages do not import with $PY (the end of $LOG says why): run"
    say "bench/accelerator_wheels.sh where pip works and carry build/wheels"
    tail -5 "$LOG"
    exit 2
  fi
fi
tail -1 "$LOG"

if [[ "${ACCEL_CHECK_TINY:-0}" == 1 ]]; then
  MD_IMAGES=600; MD_CLASSES=10; SWEEP_WORKERS=0,1; SECONDS_EACH=1
  LOOP=(--arch resnet10 --width 0.125 --steps 6 --rounds 2); BATCHES=(8 16)
  EMBED=(--num-images 2048 --pool 64 --chunk 1024 --batch 128 --arch resnet10 --width 0.125)
  T_READ=400; T_LOOP_8=400; T_LOOP_16=400; T_EMBED=200; LOOP_WORKERS="${ACCEL_LOOP_WORKERS:-1}"
else
  MD_IMAGES=16384; MD_CLASSES=100; SWEEP_WORKERS=0,1,2,4,8,16; SECONDS_EACH=2
  LOOP=(--arch resnet18 --width 1 --steps 1000 --rounds 2); BATCHES=(64 256)
  EMBED=(--num-images 1000000 --chunk 32768 --batch 1024 --arch resnet18 --width 1)
  # Limits sum to 540 s, so that the whole check ends inside a 600 s call.
  T_READ=150; T_LOOP_64=120; T_LOOP_256=170; T_EMBED=100; LOOP_WORKERS="${ACCEL_LOOP_WORKERS:-8}"
fi

FAILED=()
section() {  # section NAME SECONDS COMMAND...: runs it under a time limit, records the outcome
  local name="$1" limit="$2"
  shift 2
  say "section $name (limit ${limit} s): $*"
  local start=$SECONDS rc
  # The status goes through a file: the filter's own status must not mask it.
  { rc=0; timeout --kill-after=15 "$limit" "$@" 2>&1 || rc=$?; echo "$rc" > "$WORK/rc"; } \
    | grep --line-buffered -v -E "examples/s" | tee -a "$LOG" || true
  rc="$(cat "$WORK/rc")"
  if [[ $rc -ne 0 ]]; then
    FAILED+=("$name(rc=$rc)")
    say "section $name FAILED with status $rc after $((SECONDS - start)) s (124: time limit)"
  else
    say "section $name done in $((SECONDS - start)) s"
  fi
}

# 1. The split (written once) and the read sweep.
section read "$T_READ" "$PY" bench/data_md.py --data-dir "$WORK/md" \
  --num-images "$MD_IMAGES" --num-classes "$MD_CLASSES" --workers "$SWEEP_WORKERS" \
  --sweep-modes device,host --seconds "$SECONDS_EACH" --batch 64 --no-loop \
  --json "$OUTDIR/read_sweep.json"

# 2. Fed ERM and SAM steps against the bare step.
for batch in "${BATCHES[@]}"; do
  limit_name="T_LOOP_$batch"
  section "loop_b$batch" "${!limit_name}" "$PY" bench/data_md.py --data-dir "$WORK/md" \
    --num-images "$MD_IMAGES" --num-classes "$MD_CLASSES" --no-sweep --methods erm,sam \
    --batch "$batch" --loop-workers "$LOOP_WORKERS" "${LOOP[@]}" \
    --json "$OUTDIR/loop_b$batch.json"
done

# 3. Embedding.
section embed "$T_EMBED" "$PY" bench/embed_many.py "${EMBED[@]}" --json "$OUTDIR/embed.json"

"$PY" - "$OUTDIR" << 'EOF' | tee -a "$LOG"
import glob, json, os, sys

out = sys.argv[1]
figures = {}
for path in sorted(glob.glob(os.path.join(out, "*.json"))):
    name = os.path.basename(path)[:-5]
    if name != "accelerator_check":
        with open(path) as f:
            figures[name] = json.load(f)
with open(os.path.join(out, "accelerator_check.json"), "w") as f:
    json.dump(figures, f, indent=2)
print("\n| figure | value |\n| --- | --- |")
sweep = figures.get("read_sweep", {})
if sweep:
    m = sweep["machine"]
    print(f"| machine | {m['device_kind']} x{m['device_count']}, {m['cpu_count']} CPUs, "
          f"jax {m['jax']}, {m['date_utc']} |")
for row in sweep.get("read_sweep", []):
    cells = ", ".join(f"{k} {row[k]:.0f}" for k in ("device", "host") if k in row)
    print(f"| read img/s, {row['worker_count']} workers, batch 64 | {cells} |")
for name in sorted(n for n in figures if n.startswith("loop_")):
    for row in figures[name].get("loop", []):
        print(f"| {row['method'].upper()} batch {row['batch']}, {row['worker_count']} workers "
              f"| bare {row['bare_img_s']:.0f} img/s, fed {row['fed_img_s']:.0f} img/s, "
              f"fed/bare {row['fed_over_bare']:.3f} |")
if "embed" in figures:
    e = figures["embed"]
    print(f"| embed {e['num_images']} images | {e['img_s']:.0f} img/s, peak RSS "
          f"{e['peak_rss_mib']:.0f} MiB |")
EOF

if [[ ${#FAILED[@]} -gt 0 ]]; then
  say "failed sections: ${FAILED[*]}"
  exit 1
fi
say "all sections passed; figures in $OUTDIR"
