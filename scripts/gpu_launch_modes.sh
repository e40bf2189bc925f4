#!/usr/bin/env bash
# Launch modes on a GPU machine: S=1, the built-in launcher (NCCL), torchrun (NCCL), two stages sharing one GPU
# (gloo). All four must print the same tokens.
set -u
export PYTHONPATH=src PYTHONUNBUFFERED=1
python3 -m qwen_vl_distributed synth /tmp/tiny > /dev/null
GEN=(generate --model /tmp/tiny --prompt "hi there" --image src/qwen_vl_distributed/assets/sample.png
     --max-new-tokens 12 --temperature 0 --json --quiet --device cuda)
tok() { tail -n 1 | python3 -c "import json,sys; print(json.loads(sys.stdin.read())['token_ids'])"; }
echo "S=1:        $(python3 -m qwen_vl_distributed "${GEN[@]}" 2>&1 | tok)"
echo "S=2 nccl:   $(python3 -m qwen_vl_distributed "${GEN[@]}" --stages 2 2>&1 | tok)"
echo "torchrun:   $(torchrun --nproc-per-node 2 --master-port 29517 -m qwen_vl_distributed "${GEN[@]}" --stages 2 2>/dev/null | tok)"
echo "shared gpu: $(CUDA_VISIBLE_DEVICES=0 python3 -m qwen_vl_distributed "${GEN[@]}" --stages 2 2>&1 | tok)"
