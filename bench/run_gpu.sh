#!/usr/bin/env bash
# Every GPU figure of docs/PERFORMANCE.md in one go (one device call): python bench/... each prints its table.
set -uo pipefail
export PYTHONUNBUFFERED=1
out=${OUT:-/tmp/bench-out}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/device.txt"
python3 -c "import torch, transformers, peft, lightning; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'lightning', lightning.__version__)" | tee -a "$out/device.txt"
for cmd in \
  "bench/rollout.py --model mistral-7b-random --questions 64 --samples 8 --new-tokens 256" \
  "bench/ppo_step.py --model mistral-7b-random --iterations 3" \
  "bench/ppo_step.py --model mistral-7b-random --quantization 4bit --iterations 3" \
  "bench/dpo_step.py --model mistral-7b-random --steps 6" \
  "bench/dpo_step.py --model mistral-7b-random --quantization 4bit --steps 6"; do
  echo "=== python $cmd" | tee -a "$out/tables.md"
  python3 $cmd 2>&1 | tee "$out/$(echo $cmd | tr ' /' '__' | cut -c1-60).log" | grep -E '^\||^[0-9]+ |built|Error|error' | tee -a "$out/tables.md"
done
