#!/usr/bin/env bash
# The multi-GPU session: correctness of the NCCL pipeline on a tiny model, then the pipeline benchmark on
# random 235B-dimension layers. Results under $OUT (or ./out).
set -u
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpus.txt"
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)" | tee -a "$OUT/gpus.txt"
python3 -m qwen_vl_distributed synth /tmp/tiny > /dev/null
python3 scripts/gpu_pipeline_check.py /tmp/tiny --stages 2 2>&1 | tail -n 3 | tee "$OUT/check.txt"
timeout 300 python3 scripts/gpu_pipeline_check.py /tmp/tiny --stages 2 --dtype float32 2>&1 | tail -n 1 | tee "$OUT/check_fp32.txt"
python3 -m qwen_vl_distributed generate --model /tmp/tiny --stages 2 --device cuda --prompt "hi" --image src/qwen_vl_distributed/assets/sample.png --max-new-tokens 8 --temperature 0 --json --quiet 2>&1 | tail -n 1 | cut -c1-400
for S in 1 2; do
  timeout 240 python3 -m qwen_vl_distributed bench-pipeline --preset 235b-a22b --layers ${LAYERS:-16} --stages $S --sequences 8 --device cuda --json "$OUT/pipeline_s$S.json" 2>&1 | tail -n 25
done
