#!/usr/bin/env bash
# The five phases through the real CLI and the shipped GPU configs, shortened, on a random-weight Mistral-7B:
# proves configs/{ppo,rollouts,dpo,eval}.yaml run as written on a GPU (timings: see the other bench scripts).
set -euo pipefail
export PYTHONUNBUFFERED=1
model=$(python3 -c "from bench.models import materialize; print(materialize('mistral-7b-random'))" | tail -1)
python3 -c "from abel_lightning.data.toy import write_toy_dataset; write_toy_dataset('/tmp/smoke/toy', n_train=64, n_test=16)"
cli="python3 -m abel_lightning.cli"
short="--trainer.enable_progress_bar false --data.init_args.dataset /tmp/smoke/toy"
[ -f /tmp/smoke/ppo_lora/adapter_model.safetensors ] || $cli fit --config configs/ppo.yaml $short --model.init_args.model $model --data.init_args.n_samples 8 \
  --model.init_args.sampling.max_new_tokens 64 --trainer.callbacks.init_args.dirpath /tmp/smoke/ppo_lora \
  --trainer.logger.init_args.save_dir /tmp/smoke/runs
$cli predict --config configs/rollouts.yaml $short --model.init_args.model $model --model.init_args.adapter /tmp/smoke/ppo_lora \
  --data.init_args.n_samples 8 --model.init_args.sampling.max_new_tokens 64 --trainer.callbacks.init_args.output /tmp/smoke/rollouts.jsonl
$cli preferences --rollouts /tmp/smoke/rollouts.jsonl --out /tmp/smoke/pairs.jsonl
# A random model answers nothing right, so there are no real pairs: pair each question's first two samples instead.
python3 - <<'PY'
import json
from abel_lightning.jsonl import read_jsonl, write_jsonl_atomic
records = read_jsonl("/tmp/smoke/rollouts.jsonl")
write_jsonl_atomic("/tmp/smoke/pairs.jsonl", [
    {"question_id": r["question_id"], "prompt": r["prompt"], "chosen": r["trajectories"][0]["full_text"],
     "rejected": r["trajectories"][1]["full_text"], "kind": "correctness", "reward_gap": 1.0} for r in records])
PY
$cli fit --config configs/dpo.yaml --trainer.enable_progress_bar false --model.init_args.model $model \
  --model.init_args.adapter /tmp/smoke/ppo_lora --data.init_args.pairs /tmp/smoke/pairs.jsonl --data.init_args.rollouts null \
  --trainer.max_steps 3 --trainer.callbacks.init_args.dirpath /tmp/smoke/dpo_lora --trainer.logger.init_args.save_dir /tmp/smoke/runs
for adapter in null /tmp/smoke/ppo_lora /tmp/smoke/dpo_lora; do
  $cli test --config configs/eval.yaml $short --data.init_args.split test --model.init_args.model $model \
    --model.init_args.adapter $adapter --model.init_args.sampling.max_new_tokens 64 --trainer.callbacks.init_args.output_dir /tmp/smoke/eval
done
$cli compare /tmp/smoke/eval/*_platinum_eval.jsonl --out /tmp/smoke/compare.png
ls /tmp/smoke/ppo_lora /tmp/smoke/dpo_lora
echo "CLI SMOKE OK"
