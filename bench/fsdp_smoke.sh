#!/usr/bin/env bash
# FSDP through the CLI with configs/strategy/fsdp.yaml on the GPUs there are (FSDP_DEVICES, default 1): PPO, DPO,
# rollouts and evaluation on the toy base (needs runs/tiny from `abel-lightning pipeline`), DPO on a random-weight
# Mistral-7B; then every adapter saved under FSDP is loaded with PeftModel.from_pretrained on one device.
set -euo pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
n=${FSDP_DEVICES:-1}
out=/tmp/fsdp
cli="python3 -m abel_lightning.cli"
fsdp="--config configs/strategy/fsdp.yaml --trainer.devices $n --trainer.enable_progress_bar false"
tiny="--trainer.precision 32-true --data.init_args.dataset runs/tiny/data/toy"
$cli fit --config configs/tiny/ppo.yaml $fsdp $tiny --data.init_args.n_samples $((8 * n * 2)) \
  --trainer.callbacks.init_args.dirpath $out/ppo_lora --trainer.logger.init_args.save_dir $out/runs 2>&1 | tail -1
python3 -c "import csv; r=[x for x in csv.DictReader(open('$out/runs/ppo/version_0/metrics.csv')) if x.get('reward')]; print('PPO under FSDP:', len(r), 'iterations, rewards', [x['reward'][:5] for x in r])"
$cli fit --config configs/tiny/dpo.yaml $fsdp --trainer.precision 32-true --trainer.max_steps 5 \
  --trainer.callbacks.init_args.dirpath $out/dpo_lora --trainer.logger.init_args.save_dir $out/runs 2>&1 | grep "global batch"
$cli predict --config configs/tiny/rollouts.yaml $fsdp $tiny --model.init_args.adapter $out/ppo_lora \
  --data.init_args.n_samples 16 --trainer.callbacks.init_args.output $out/rollouts.jsonl 2>&1 | tail -1
$cli test --config configs/tiny/eval.yaml $fsdp $tiny --data.init_args.n_samples 40 \
  --trainer.callbacks.init_args.output_dir $out/eval 2>&1 | grep -i "accuracy" | tail -2
python3 -c "import json; ids=[json.loads(l)['question_id'] for l in open('$out/rollouts.jsonl')]; print('rollouts under FSDP:', len(ids), 'records,', len(set(ids)), 'distinct')"
model=$(python3 -c "from bench.models import materialize; print(materialize('mistral-7b-random'))" | tail -1)
python3 -c "
from bench.dpo_step import synthetic_pairs; from abel_lightning.jsonl import write_jsonl_atomic; from abel_lightning.models.loading import load_tokenizer
write_jsonl_atomic('$out/pairs7b.jsonl', synthetic_pairs(load_tokenizer('$model'), 32, 160, 256))"
$cli fit --config configs/dpo.yaml $fsdp --model.init_args.model $model --model.init_args.adapter null \
  --data.init_args.pairs $out/pairs7b.jsonl --data.init_args.rollouts null --data.init_args.val_fraction 0 \
  --trainer.max_steps 4 --trainer.callbacks.init_args.dirpath $out/dpo7b_lora --trainer.logger.init_args.save_dir $out/runs7b 2>&1 | grep "global batch"
python3 -c "import csv; r=list(csv.DictReader(open('$out/runs7b/dpo/version_0/metrics.csv'))); print('7B DPO under FSDP, global-batch loss:', [x['train/global_batch_loss'][:7] for x in r if x.get('train/global_batch_loss')], 'tokens/s per device:', [x['train/tokens_per_s'][:6] for x in r if x.get('train/tokens_per_s')][-2:])"
for pair in "builtin:toy $out/ppo_lora" "builtin:toy $out/dpo_lora" "$model $out/dpo7b_lora"; do set -- $pair
  python3 -c "
import torch; from peft import PeftModel; from abel_lightning.models.loading import load_base
m = PeftModel.from_pretrained(load_base('$1', 'bfloat16').to('cuda:0'), '$2')
b = [p for n, p in m.named_parameters() if 'lora_B' in n]
print('$2 loads on one device:', len(b), 'LoRA B matrices, mean |B| %.2e' % torch.stack([p.float().abs().mean() for p in b]).mean().item())"
done
echo "FSDP SMOKE OK"
