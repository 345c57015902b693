#!/usr/bin/env bash
# The GPU figures of issue 16 in one command, one JSON line each (BENCHMARKS.md, "GPU suite").
# Budget: at most 8 minutes on one H100/H200. Run from the repository root in the project's venv:
#
#     bash tests/benchmarks/gpu_suite.sh [OUT.jsonl]
#
# 1. training images/s and MFU (vs the 989 TFLOP/s H100 dense bf16 datasheet figure) of the
#    trainer's own step (bench_train.py --throughput: FSDP2 at world size 1, bf16 policy, EMA,
#    AdamW fused) for SiT-B/2 and SiT-XL/2 at 256 px, released block and modern preset, eager and
#    torch.compile'd;
# 2. SD-VAE-architecture encode images/s (random weights: nothing downloaded) at 256 and 512 px,
#    bf16, the bare encoder (bench_encode.bare_vae_rate: image and mirror per source image);
# 3. 250-step SDE + CFG (scale 4) sampling images/s of SiT-XL/2 (bench_sample.py --sampler-only,
#    bf16 autocast; no decode).
#
# Every knob has an environment override, so the same script dry-runs on a CPU with tiny sizes:
#     DEVICE=cpu TRAIN="tiny-cpu:8" TRAIN_STEPS=2 ENCODE="32:1" SAMPLE_MODEL=SiT-S/8 SAMPLE_BATCH=2 \
#       SAMPLE_STEPS=3 bash tests/benchmarks/gpu_suite.sh /tmp/dry.jsonl
set -euo pipefail
out=${1:-tests/benchmarks/results/gpu_suite-$(date +%F).jsonl}
DEVICE=${DEVICE:-cuda}
TRAIN=${TRAIN:-"sit-b2-256:128 sit-b2-256-modern:128 sit-xl2-256:64 sit-xl2-256-modern:64"}  # preset:batch
TRAIN_STEPS=${TRAIN_STEPS:-20}
ENCODE=${ENCODE:-"256:32 512:8"}  # resolution:source images per batch
SAMPLE_MODEL=${SAMPLE_MODEL:-SiT-XL/2}
SAMPLE_BATCH=${SAMPLE_BATCH:-32}
SAMPLE_STEPS=${SAMPLE_STEPS:-250}
LIMIT=${LIMIT:-150}  # seconds per measurement before it is abandoned (a line saying so is written)
PY=${PYTHON:-python}
export PYTHONPATH=.
mkdir -p "$(dirname "$out")"
start=$SECONDS

run() {  # one measurement: its JSON lines go to $out; a failure or timeout is recorded, not fatal
  local what=$1
  shift
  if ! timeout "$LIMIT" "$@" > >(tee -a "$out"); then
    echo "{\"figure\": \"failed\", \"what\": \"$what\", \"limit_s\": $LIMIT}" | tee -a "$out"
  fi
}

for item in $TRAIN; do
  preset=${item%%:*}
  batch=${item##*:}
  for compile in "" "--compile"; do
    run "train $preset $compile" "$PY" tests/benchmarks/bench_train.py --device "$DEVICE" --precision bf16 \
      $compile --throughput "$preset" --batch "$batch" --steps "$TRAIN_STEPS"
  done
done

for item in $ENCODE; do
  res=${item%%:*}
  batch=${item##*:}
  run "encode $res" "$PY" - "$DEVICE" "$res" "$batch" <<'PYEOF'
import json, sys, tempfile
from pathlib import Path
import torch
from tests.benchmarks.bench_encode import ENCODER_GMAC_256, bare_vae_rate, save_sd_vae
device, res, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
with tempfile.TemporaryDirectory() as tmp:
    rate = bare_vae_rate(save_sd_vae(Path(tmp) / "sd-vae"), res, batch, "bf16", device, torch.get_num_threads())
gmac = ENCODER_GMAC_256 * (res / 256) ** 2 * 2  # the image and its mirror
name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
print(json.dumps({"figure": "sd_vae_encode_images_per_s", "value": round(rate, 2), "resolution": res,
                  "batch": batch, "dtype": "bf16", "device": name, "tflops": round(rate * gmac * 2 / 1e3, 1),
                  "weights": "random (SD-VAE architecture)"}))
PYEOF
done

run "sample $SAMPLE_MODEL" "$PY" tests/benchmarks/bench_sample.py --sampler-only --device "$DEVICE" --precision bf16 \
  --model "$SAMPLE_MODEL" --num-images "$SAMPLE_BATCH" --steps "$SAMPLE_STEPS" --cfg-scale 4.0

echo "{\"figure\": \"gpu_suite_seconds\", \"value\": $((SECONDS - start))}" | tee -a "$out"
