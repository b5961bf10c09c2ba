#!/usr/bin/env bash
# Issue 17, goal 4: Phase 2 at the seed's size (500 GSM8K train questions x 8 arms, configs/rollouts.yaml) and Phase 5
# (the 1,209 GSM8K Platinum questions, configs/eval.yaml, three models) through the real CLI on one GPU, on a
# random-weight Mistral-7B with two random LoRA adapters standing in for PPO's and DPO's. Prints each phase's wall
# time; each phase prints its own tokens/s.
#   bash bench/cli_phases.sh DATA [CLI ARGS...]
# DATA holds gsm8k/train.jsonl and gsm8k_platinum/test.jsonl (../shared/data beside the checkout; on a device machine,
# a copy in an ignored folder of it, carried). CLI ARGS go to every command, after the script's own: a smoke run on
# the CPU is MODEL=tiny-llama-random bash bench/cli_phases.sh ../shared/data --trainer.accelerator cpu
# --data.init_args.n_samples 2
set -euo pipefail
data=${1:?usage: bash bench/cli_phases.sh DATA_FOLDER}
export PYTHONUNBUFFERED=1
shift
model=$(python3 -c "from bench.models import materialize; print(materialize('${MODEL:-mistral-7b-random}'))" | tail -1)
for name in ppo dpo; do
  python3 -c "from bench.models import random_adapter; random_adapter('$model', '/tmp/cli_phases/abel_${name}_lora')"
done
cli="python3 -m abel_lightning.cli"
rm -rf /tmp/cli_phases/rollouts.jsonl /tmp/cli_phases/eval
start=$(date +%s)
$cli predict --config configs/rollouts.yaml --trainer.enable_progress_bar false --model.init_args.model "$model" \
  --model.init_args.adapter /tmp/cli_phases/abel_ppo_lora --data.init_args.dataset "$data/gsm8k/train.jsonl" \
  --data.init_args.n_samples 500 --trainer.callbacks.init_args.output /tmp/cli_phases/rollouts.jsonl "$@"
echo "Phase 2: $(( $(date +%s) - start )) s wall, $(wc -l < /tmp/cli_phases/rollouts.jsonl) questions written"
for adapter in null /tmp/cli_phases/abel_ppo_lora /tmp/cli_phases/abel_dpo_lora; do
  start=$(date +%s)
  $cli test --config configs/eval.yaml --trainer.enable_progress_bar false --model.init_args.model "$model" \
    --model.init_args.adapter $adapter --data.init_args.dataset "$data/gsm8k_platinum/test.jsonl" \
    --trainer.callbacks.init_args.output_dir /tmp/cli_phases/eval "$@"
  echo "Phase 5 ($adapter): $(( $(date +%s) - start )) s wall"
done
wc -l /tmp/cli_phases/eval/*.jsonl
