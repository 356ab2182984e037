#!/bin/bash
# Device run 3: steady state (longer timed runs) of the loader lever, workers 0 vs 2, same code otherwise.
D=$(cd "$(dirname "$0")" && pwd)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
t0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $D/whl/*.whl 2>&1 | tail -3
export PYTHONPATH=/tmp/site:$D/site
cd $D/new
V=("bf16" "bf16, batch 128" "bf16, batch 512" "bf16, paper setting: 32 x 256 tokens, accumulation 8" "bf16, Rotten Tomatoes as is")
for w in 2 0; do
  timeout 110 python3 -m benchmarks.gpu --variants "${V[@]}" --steps 120 --loader-workers $w --out $OUT/steady-workers$w.json > $OUT/steady-workers$w.log 2>&1
  echo "workers $w rc=$? at $(( $(date +%s) - t0 )) s"; grep -E "gpu (ceilings|finetune)|Error|Traceback" $OUT/steady-workers$w.log | tail -7
done
