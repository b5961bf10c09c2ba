#!/usr/bin/env bash
# FSDP through the CLI with configs/strategy/fsdp.yaml on FSDP_DEVICES GPUs (default 2: on one, FSDP shards nothing and training refuses to start): PPO, DPO,
# rollouts and evaluation on the toy base (needs runs/tiny from `abel-lightning pipeline`), DPO on a random-weight
# Mistral-7B; every adapter saved under FSDP is then loaded with PeftModel.from_pretrained on one device.
# Each step reports OK or FAILED with its last error line, and the script goes on.
set -uo pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
n=${FSDP_DEVICES:-2}
out=/tmp/fsdp
rm -rf $out && mkdir -p $out
fsdp="--config configs/strategy/fsdp.yaml --trainer.devices $n --trainer.enable_progress_bar false"
tiny="--trainer.precision 32-true --data.init_args.dataset runs/tiny/data/toy"
model=$(python3 -c "from bench.models import materialize; print(materialize('mistral-7b-random'))" 2>/dev/null | tail -1)
python3 -c "
from bench.dpo_step import synthetic_pairs; from abel_lightning.jsonl import write_jsonl_atomic; from abel_lightning.models.loading import load_tokenizer
write_jsonl_atomic('$out/pairs7b.jsonl', synthetic_pairs(load_tokenizer('$model'), 16, 160, 256))" 2>/dev/null

step() {  # step NAME COMMAND...: run an abel-lightning command, report OK or the error
  local name=$1; shift
  if python3 -m abel_lightning.cli "$@" > $out/$name.log 2>&1; then echo "OK      $name: $(grep -E 'global batch' $out/$name.log | head -1)"
  else echo "FAILED  $name: $(grep -E '^(\[rank0\]: )?[A-Za-z.]*(Error|Exception)' $out/$name.log | tail -1)"; fi
}
loads() {  # loads BASE ADAPTER
  python3 -c "from bench.models import adapter_report; print('OK     ', adapter_report('$1', '$2', 'cuda:0'))" 2>&1 | tail -1
}
curve() { python3 -c "import csv,glob; r=list(csv.DictReader(open(glob.glob('$1/*/version_0/metrics.csv')[0]))); print('        $2', [x['$2'][:6] for x in r if x.get('$2')])" 2>&1 | tail -1; }

step dpo7b fit --config configs/dpo.yaml $fsdp --model.init_args.model $model --model.init_args.adapter null \
  --data.init_args.pairs $out/pairs7b.jsonl --data.init_args.rollouts null --data.init_args.val_fraction 0 \
  --trainer.max_steps 3 --trainer.callbacks.init_args.dirpath $out/dpo7b_lora --trainer.logger.init_args.save_dir $out/runs7b
curve $out/runs7b train/global_batch_loss
loads $model $out/dpo7b_lora
step ppo fit --config configs/tiny/ppo.yaml $fsdp $tiny --data.init_args.n_samples $((8 * n * 2)) \
  --trainer.callbacks.init_args.dirpath $out/ppo_lora --trainer.logger.init_args.save_dir $out/runs_ppo
curve $out/runs_ppo reward
loads builtin:toy $out/ppo_lora
step dpo fit --config configs/tiny/dpo.yaml $fsdp --trainer.precision 32-true --trainer.max_steps 5 \
  --trainer.callbacks.init_args.dirpath $out/dpo_lora --trainer.logger.init_args.save_dir $out/runs_dpo
loads builtin:toy $out/dpo_lora
step rollouts predict --config configs/tiny/rollouts.yaml $fsdp $tiny --model.init_args.adapter runs/tiny/checkpoints/ppo_lora \
  --data.init_args.n_samples 16 --trainer.callbacks.init_args.output $out/rollouts.jsonl
step eval test --config configs/tiny/eval.yaml $fsdp $tiny --data.init_args.n_samples 40 --trainer.callbacks.init_args.output_dir $out/eval
python3 -c "import json; ids=[json.loads(l)['question_id'] for l in open('$out/rollouts.jsonl')]; print('        rollouts:', len(ids), 'records,', len(set(ids)), 'distinct')" 2>&1 | tail -1
grep -h "platinum_accuracy\|accuracy" $out/eval.log | tail -1
