"""DPO on a tiny random model, driven by ``lightning.Trainer`` on the CPU: the step-0 loss, learning, the exported
adapter, the reference cache, and DDP against one process.

Run as a script, this file is the DDP worker of ``test_ddp_matches_one_process`` (Lightning relaunches the script
once per rank, which ``python -c`` cannot be).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from test_preferences import rollout, trajectory
from transformers import AutoModelForCausalLM

from abel_lightning.callbacks.adapter_checkpoint import AdapterCheckpoint
from abel_lightning.data.preferences import PreferenceDataModule, collate_pairs, encode_response, held_out_questions
from abel_lightning.jsonl import read_jsonl
from abel_lightning.models.architectures import ALL_PROJECTIONS
from abel_lightning.models.loading import LoraSettings, attach_lora, load_base, load_tokenizer, save_adapter
from abel_lightning.models.sequences import pack, sequence_logprobs
from abel_lightning.models.tiny import randomize_lora
from abel_lightning.modules.dpo import DPOModule
from abel_lightning.modules.reference_logprobs import ReferenceLogprobs

# Easy pairs a tiny random model learns in a few steps: whatever the question, "#### 7" beats "#### 3".
N_PAIRS = 10


def write_pairs(path: Path, n: int = N_PAIRS) -> Path:
    with path.open("w") as file:
        for i in range(n):
            pair = {
                "question_id": f"test/{i}",
                "prompt": f"Question:\nWhat is {i} + 7 - {i}?\nAnswer:\n",
                "chosen": "#### 7",
                "rejected": "#### 3",
                "kind": "correctness",
                "reward_gap": 1.0,
            }
            file.write(json.dumps(pair) + "\n")
    return path


def make_adapter(model: str, folder: Path) -> Path:
    """A LoRA adapter with random (non-zero) B weights, so that the policy differs from the base, and dropout, which
    the module must switch off."""
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=ALL_PROJECTIONS, task_type="CAUSAL_LM")
    policy = randomize_lora(get_peft_model(load_base(model, "float32"), config), 0.05, torch.Generator().manual_seed(1))
    return save_adapter(policy, load_tokenizer(model), folder)


@pytest.fixture(scope="module")
def adapter(tiny_model, tmp_path_factory) -> str:
    return str(make_adapter(tiny_model, tmp_path_factory.mktemp("ppo_adapter")))


class Record(L.Callback):
    """Keeps the synced training metrics of every batch."""

    def __init__(self):
        self.rows: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.rows.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")})


def fit(
    model: str,
    adapter: str | None,
    pairs: Path,
    steps: int,
    *,
    callbacks: tuple = (),
    ckpt_path: str | None = None,
    devices: int = 1,
    batch_size: int = 2,
    val_fraction: float = 0.2,
    **module_args,
) -> tuple[DPOModule, L.Trainer, list[dict[str, float]]]:
    L.seed_everything(0)
    module_args = {"learning_rate": 1e-2, "dtype": "float32", "gradient_checkpointing": False} | module_args
    module = DPOModule(model, adapter=adapter, **module_args)
    data = PreferenceDataModule(str(pairs), rollouts=None, batch_size=batch_size, val_fraction=val_fraction)
    record = Record()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        max_steps=steps,
        max_epochs=100,
        callbacks=[record, *callbacks],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, data, ckpt_path=ckpt_path)
    return module, trainer, record.rows


# -- the data module ---------------------------------------------------------------------------------------------


def test_encoding_matches_the_joint_tokenization_and_truncates_prompt_left_response_right(tiny_model):
    tokenizer = load_tokenizer(tiny_model)
    prompt, response = "Question:\nWhat is 2 + 5?\nAnswer:\n", "2 + 5 = 7\n#### 7"
    prompt_ids, response_ids = encode_response(tokenizer, prompt, response, 512, 1024)
    assert prompt_ids + response_ids == tokenizer(prompt + response)["input_ids"] + [tokenizer.eos_token_id]

    short_prompt, short_response = encode_response(tokenizer, prompt, response, 4, 10)
    assert short_prompt == prompt_ids[-4:]  # the question's end and the answer cue survive
    assert short_response == response_ids[:6]  # cut at the end: no EOS, the response did not end there


def test_held_out_slice_keeps_each_question_on_one_side_and_is_seeded():
    questions = [f"q{i // 3}" for i in range(60)]  # 20 questions, 3 pairs each
    held = held_out_questions(questions, 0.1, seed=0)
    assert len(held) == 2 and held == held_out_questions(questions, 0.1, seed=0)
    assert held != held_out_questions(questions, 0.1, seed=1)
    assert held_out_questions(questions, 0.0, seed=0) == set()


def test_setup_filters_kinds_and_indexes_pairs_by_their_line(tiny_model, tmp_path):
    pairs = write_pairs(tmp_path / "pairs.jsonl", 6)
    records = read_jsonl(pairs)
    records[1]["kind"] = records[4]["kind"] = "coherence"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in records))
    data = PreferenceDataModule(str(pairs), rollouts=None, kinds=["coherence"], val_fraction=0.0)
    data.trainer = SimpleNamespace(lightning_module=SimpleNamespace(tokenizer=load_tokenizer(tiny_model)))
    data.setup("fit")
    assert [pair.index for pair in data.train_pairs] == [1, 4] and data.val_pairs == []
    batch = collate_pairs(data.train_pairs, pad_id=0)
    assert batch.sequences.input_ids.shape[0] == 4 and batch.index.tolist() == [1, 4]  # chosen rows, then rejected


def test_prepare_data_builds_missing_pairs_from_rollouts(tmp_path):
    answered = [
        trajectory("#### 18", True, 1.1),
        trajectory("so #### 18", True, 1.0),
        trajectory("#### 20", False, 0.0),
    ]
    rollouts = tmp_path / "rollouts.jsonl"
    rollouts.write_text(json.dumps(rollout("test/0", answered)) + "\n")
    data = PreferenceDataModule(str(tmp_path / "pairs.jsonl"), rollouts=str(rollouts))
    data.prepare_data()
    assert [pair["kind"] for pair in read_jsonl(tmp_path / "pairs.jsonl")] == [
        "correctness",
        "correctness",
        "coherence",
    ]


# -- the module --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("reference", "start"), [("cached", "ppo"), ("adapter", "ppo"), ("adapter", "fresh")])
def test_first_step_loss_is_log_2_with_the_starting_policy_as_reference(
    tiny_model, adapter, tmp_path, reference, start
):
    start_adapter = adapter if start == "ppo" else None  # a fresh LoRA: the reference is the base alone
    module, _, rows = fit(tiny_model, start_adapter, write_pairs(tmp_path / "pairs.jsonl"), 1, reference=reference)
    assert rows[0]["train/loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert rows[0]["train/reward_margin"] == pytest.approx(0.0, abs=1e-5)
    if reference == "cached":
        # The reference is the PPO adapter, not the base: the base scores these responses differently.
        batch = collate_pairs(module.trainer.datamodule.all_pairs, module.tokenizer.pad_token_id)
        with torch.no_grad(), module.policy.disable_adapter():
            base = torch.stack(sequence_logprobs(module.policy, batch.sequences).chunk(2), -1)
        assert (base - module.reference.logps[batch.index]).abs().max() > 1e-2


def test_fifteen_steps_lower_the_loss_and_raise_reward_accuracy(tiny_model, adapter, tmp_path):
    _, trainer, rows = fit(tiny_model, adapter, write_pairs(tmp_path / "pairs.jsonl"), 15)
    losses = [row["train/loss"] for row in rows]
    accuracy = [row["train/reward_accuracy"] for row in rows]
    assert len(rows) == 15
    assert sum(losses[-3:]) / 3 < math.log(2) - 0.1, losses
    assert accuracy[0] == 0.0 and accuracy[-3:] == [1.0, 1.0, 1.0], accuracy  # a tie at step 0 counts as wrong
    # The held-out questions (never trained on) learned it too.
    assert float(trainer.callback_metrics["val/reward_accuracy"]) == 1.0
    assert float(trainer.callback_metrics["val/loss"]) < math.log(2) - 0.1


def test_adapter_reference_trains_exactly_like_the_cache(tiny_model, adapter, tmp_path):
    _, _, cached = fit(tiny_model, adapter, write_pairs(tmp_path / "pairs.jsonl"), 4, reference="cached")
    # With activation checkpointing, whose recomputed forward must find the trained adapter active again.
    _, _, frozen = fit(
        tiny_model, adapter, tmp_path / "pairs.jsonl", 4, reference="adapter", gradient_checkpointing=True
    )
    assert [r["train/loss"] for r in frozen] == pytest.approx([r["train/loss"] for r in cached], abs=1e-5)
    assert frozen[-1]["train/loss"] < frozen[0]["train/loss"] - 0.02  # the reference stayed put while the policy moved


def test_saved_adapter_loads_on_the_plain_base_and_checkpoint_holds_trainable_weights_only(
    tiny_model, adapter, tmp_path
):
    folder = tmp_path / "dpo_lora"
    module, _, _ = fit(
        tiny_model,
        adapter,
        write_pairs(tmp_path / "pairs.jsonl"),
        3,
        reference="adapter",
        callbacks=(AdapterCheckpoint(str(folder), save_every=0),),
    )
    assert (folder / "adapter_model.safetensors").exists() and not (folder / "reference").exists()

    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), folder)
    batch = collate_pairs(module.trainer.datamodule.all_pairs, module.tokenizer.pad_token_id).sequences
    with torch.no_grad():
        torch.testing.assert_close(sequence_logprobs(loaded, batch), sequence_logprobs(module.policy, batch))
        with module.policy.disable_adapter():
            assert not torch.allclose(sequence_logprobs(loaded, batch), sequence_logprobs(module.policy, batch))

    state = torch.load(folder / "last.ckpt", weights_only=False)["state_dict"]
    assert state and all("lora_" in key and ".default." in key for key in state), sorted(state)[:5]


def test_reference_cache_is_reused_and_invalidated_by_a_new_pairs_file(tiny_model, adapter, tmp_path, monkeypatch):
    pairs = write_pairs(tmp_path / "pairs.jsonl")
    first, _, _ = fit(tiny_model, adapter, pairs, 1)
    assert first.reference.path.exists() and first.reference.path.parent == tmp_path

    computed = []
    original = ReferenceLogprobs._score_rows
    monkeypatch.setattr(ReferenceLogprobs, "_score_rows", staticmethod(lambda *a: computed.append(1) or original(*a)))
    second, _, _ = fit(tiny_model, adapter, pairs, 1)
    assert computed == [] and second.reference.path == first.reference.path
    torch.testing.assert_close(second.reference.logps, first.reference.logps)

    write_pairs(pairs, N_PAIRS + 1)
    third, _, _ = fit(tiny_model, adapter, pairs, 1)
    assert computed == [1] and third.reference.path != first.reference.path
    assert third.reference.logps.shape[0] == N_PAIRS + 1


def test_resume_without_its_reference_cache_refuses_to_recompute_it(tiny_model, adapter, tmp_path):
    folder = tmp_path / "dpo_lora"
    module, _, _ = fit(
        tiny_model,
        adapter,
        write_pairs(tmp_path / "pairs.jsonl"),
        1,
        callbacks=(AdapterCheckpoint(str(folder), save_every=0),),
    )
    module.reference.path.unlink()
    with pytest.raises(FileNotFoundError, match="cannot be recomputed from trained weights"):
        fit(tiny_model, adapter, tmp_path / "pairs.jsonl", 2, ckpt_path=str(folder / "last.ckpt"))


def test_a_run_stopped_by_max_steps_extends_through_the_rest_of_its_epoch(tiny_model, adapter, tmp_path):
    """8 batches an epoch; 3 steps, then the same run told to go on to 6, against 6 steps in one go."""
    pairs, folder = write_pairs(tmp_path / "pairs.jsonl", 16), tmp_path / "dpo_lora"
    _, _, straight = fit(tiny_model, adapter, pairs, 6, val_fraction=0.0)
    fit(tiny_model, adapter, pairs, 3, val_fraction=0.0, callbacks=(AdapterCheckpoint(str(folder), save_every=0),))
    _, _, extended = fit(tiny_model, adapter, pairs, 6, val_fraction=0.0, ckpt_path=str(folder / "last.ckpt"))
    assert len(extended) == 3
    assert [r["train/loss"] for r in extended] == pytest.approx([r["train/loss"] for r in straight[3:]], abs=1e-6)


class PoisonReference(L.Callback):
    def on_train_start(self, trainer, pl_module):
        pl_module.reference.logps.fill_(float("nan"))


def test_non_finite_loss_stops_training_with_the_pairs_named(tiny_model, adapter, tmp_path):
    with pytest.raises(FloatingPointError, match=r"non-finite DPO loss .* pairs \["):
        fit(tiny_model, adapter, write_pairs(tmp_path / "pairs.jsonl"), 1, callbacks=(PoisonReference(),))


# -- DDP ---------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ddp_matches_one_process(tiny_model, adapter, tmp_path):
    """2 processes x 1 pair and 1 process x 2 pairs: the same global batches (the datamodule's sampler), averaged
    gradients, so the same loss curve up to float32 rounding (the rows are padded differently). Each run has its own
    pairs file, so the DDP run computes its reference cache in shards."""
    (tmp_path / "one").mkdir(), (tmp_path / "ddp").mkdir()
    single, _, rows = fit(tiny_model, adapter, write_pairs(tmp_path / "one/pairs.jsonl"), 5, val_fraction=0.0)
    subprocess.run(
        [
            sys.executable,
            __file__,
            "--model",
            tiny_model,
            "--adapter",
            adapter,
            "--pairs",
            str(write_pairs(tmp_path / "ddp/pairs.jsonl")),
            "--out",
            str(tmp_path / "ddp/result.json"),
        ],
        check=True,
        timeout=3600,  # a stall guard for a deadlocked process group, not a time limit (a loaded machine takes minutes)
    )
    ddp = json.loads((tmp_path / "ddp/result.json").read_text())
    losses = [row["train/loss"] for row in rows]
    assert len(losses) == 5 and losses[-1] < losses[0] - 0.02
    assert ddp["losses"] == pytest.approx(losses, abs=1e-5)
    torch.testing.assert_close(torch.tensor(ddp["reference"]), single.reference.logps, atol=1e-4, rtol=0)


def ddp_worker() -> None:
    parser = argparse.ArgumentParser()
    for name in ("--model", "--adapter", "--pairs", "--out"):
        parser.add_argument(name, required=True)
    args = parser.parse_args()
    module, trainer, rows = fit(
        args.model, args.adapter, Path(args.pairs), 5, devices=2, batch_size=1, val_fraction=0.0
    )
    if trainer.is_global_zero:
        result = {"losses": [row["train/loss"] for row in rows], "reference": module.reference.logps.tolist()}
        Path(args.out).write_text(json.dumps(result))


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_under_bf16_autocast_lora_inputs_skip_the_float32_round_trip_with_the_same_numbers(
    tiny_model, gradient_checkpointing, monkeypatch
):
    """bf16-mixed training: autocast, not PEFT, casts LoRA inputs; that must give PEFT's numbers exactly, and the
    forward recomputed by checkpointing (outside response_forward's context) must match the one it saved."""
    from peft.helpers import disable_input_dtype_casting

    import abel_lightning.models.sequences as sequences

    batch = pack([[1, 5, 7], [2, 9]], [[4, 6, 8, 10], [3, 11]], pad_id=0)

    def logprobs_and_grads():
        torch.manual_seed(0)  # the same LoRA A initialisation
        policy = attach_lora(
            load_base(tiny_model, "bfloat16"),
            LoraSettings(r=4, alpha=8),
            None,
            trainable=True,
            gradient_checkpointing=gradient_checkpointing,
        )
        randomize_lora(policy, 0.1, torch.Generator().manual_seed(0))
        policy.train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logprobs = sequence_logprobs(policy, batch)
        logprobs.sum().backward()
        return logprobs, {n: p.grad for n, p in policy.named_parameters() if p.grad is not None}

    ours, our_grads = logprobs_and_grads()
    # PEFT's own path: its input casting left on.
    monkeypatch.setattr(
        sequences, "disable_input_dtype_casting", lambda model, active: disable_input_dtype_casting(model, False)
    )
    peft, peft_grads = logprobs_and_grads()
    torch.testing.assert_close(ours, peft, rtol=0, atol=0)
    assert our_grads.keys() == peft_grads.keys() and len(our_grads) > 0
    for name in our_grads:
        torch.testing.assert_close(our_grads[name], peft_grads[name], rtol=0, atol=0)


if __name__ == "__main__":
    ddp_worker()
