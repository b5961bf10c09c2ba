#!/usr/bin/env bash
# Two GPUs on the toy base through the CLI: greedy evaluation on 1 and on 2 GPUs (DDP) must write each question once
# and report the same accuracy; PPO runs a few iterations under DDP with rank-reduced statistics.
set -euo pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
rm -rf /tmp/two  # evaluation would resume from an earlier run's records, and the PPO metrics be its version_0
python3 -c "from abel_lightning.data.toy import write_toy_dataset; write_toy_dataset('/tmp/two/toy', n_train=200, n_test=60)"
cli="python3 -m abel_lightning.cli"
gpu="--trainer.accelerator gpu --trainer.enable_progress_bar false --data.init_args.dataset /tmp/two/toy"
for n in 1 2; do
  $cli test --config configs/tiny/eval.yaml $gpu --trainer.devices $n --trainer.strategy ddp \
    --trainer.callbacks.init_args.output_dir /tmp/two/eval$n 2>&1 | grep platinum_accuracy
  python3 -c "import json; ids=[json.loads(l)['question_id'] for l in open('/tmp/two/eval$n/base_platinum_eval.jsonl')]; print('$n GPU(s):', len(ids), 'records,', len(set(ids)), 'distinct')"
done
$cli fit --config configs/tiny/ppo.yaml $gpu --trainer.devices 2 --trainer.strategy ddp --data.init_args.n_samples 32 \
  --trainer.callbacks.init_args.dirpath /tmp/two/ppo_lora --trainer.logger.init_args.save_dir /tmp/two/runs 2>&1 | tail -2
python3 -c "import csv; rows=list(csv.DictReader(open('/tmp/two/runs/ppo/version_0/metrics.csv'))); print('PPO DDP iterations logged:', len(rows), 'last reward', rows[-1]['reward'], 'kl', rows[-1]['kl'])"
ls /tmp/two/ppo_lora
echo "TWO GPU SMOKE OK"
