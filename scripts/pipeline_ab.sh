#!/usr/bin/env bash
# On a multi-GPU machine: the pipeline benchmark for two or more source trees, run alternately on the same machine
# (machine-to-machine spread of the 8-sequence throughput is larger than most code changes; see
# docs/benchmarks.md). Each argument is a folder holding a qwen_vl_distributed package: "src" for the working tree,
# or an older revision unpacked beside it before the run (ab_* is git-ignored: name it in the device tool's
# carry), e.g.:
#     mkdir -p ab_0e920ee && git archive 0e920ee src | tar -x -C ab_0e920ee      # -> ab_0e920ee/src
#     bash scripts/pipeline_ab.sh ab_0e920ee/src src                               # on the GPU machine
# Env: ROUNDS (default 2), STAGES (2), LAYERS (16), SEQS (8), LIMIT (seconds per run, 110). Results under $OUT.
set -u
OUT=${OUT:-out}; mkdir -p "$OUT"
for round in $(seq "${ROUNDS:-2}"); do
  for tree in "$@"; do
    name=$(echo "$tree" | tr '/' '_')_$round
    PYTHONPATH=$tree PYTHONUNBUFFERED=1 timeout "${LIMIT:-110}" python3 -m qwen_vl_distributed bench-pipeline \
      --preset 235b-a22b --layers "${LAYERS:-16}" --stages "${STAGES:-2}" --sequences "${SEQS:-8}" --device cuda \
      --json "$OUT/ab_$name.json" > /dev/null 2> "$OUT/ab_$name.err" || echo "$name: failed (see $OUT/ab_$name.err)"
    python3 - "$OUT/ab_$name.json" "$name" <<'PY' 2>/dev/null
import json, sys
d = json.load(open(sys.argv[1]))
busy = [{k: s[k]["busy_s"] for k in ("single", "throughput") if isinstance(s.get(k), dict)} or s.get("busy_s")
        for s in d["stage_busy_s"]]
print(sys.argv[2], "decode ms/token", d["single_sequence"]["decode_ms_per_token"], "prefill ms",
      d["single_sequence"]["prefill_ms"], "tokens/s", d["throughput"]["tokens_per_s"], "busy", busy)
PY
  done
done
