#!/bin/bash
# Device run for issue 14 item 3: install carried wheels, then the GPU benchmark (before/after finetune.py change).
D=$(cd "$(dirname "$0")" && pwd)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
t0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $D/whl/*.whl 2>&1 | tail -3
chmod +x /tmp/site/hivemind/hivemind_cli/p2pd
export PYTHONPATH=/tmp/site:$D/site
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,power.draw,power.limit,driver_version --format=csv | tee $OUT/nvidia-smi.txt
python3 -c "
import torch, transformers, tokenizers, pyarrow, datasets, hivemind, bitsandbytes, google.protobuf as pb
print('versions', torch.__version__, transformers.__version__, tokenizers.__version__, 'pyarrow', pyarrow.__version__, 'datasets', datasets.__version__, 'hivemind', hivemind.__version__, 'bnb', bitsandbytes.__version__, 'protobuf', pb.__version__)
" 2>&1 | tail -3
echo "setup $(( $(date +%s) - t0 )) s"
cd $D/before && timeout 150 python3 -m benchmarks.gpu --variants "fp32" "bf16" "bf16, batch 128" "bf16, batch 512" "bf16, paper setting: 32 x 256 tokens, accumulation 8" "bf16, Rotten Tomatoes as is" --out $OUT/before.json > $OUT/before.log 2>&1; echo "before rc=$? at $(( $(date +%s) - t0 )) s"; grep -E "gpu (ceilings|finetune)|Error|error" $OUT/before.log | tail -8
cd $D/new && timeout 360 python3 -m benchmarks.gpu > $OUT/after.log 2>&1; echo "after rc=$? at $(( $(date +%s) - t0 )) s"
cp $D/new/benchmarks/gpu/*.json $OUT/ 2>/dev/null
grep -E "gpu |Error|error|Traceback" $OUT/after.log | tail -30
