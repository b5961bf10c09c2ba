"""The other libraries' internals that abel_lightning.compat names, against the installed versions: after an upgrade,
a failure here says which one moved."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.demos.boring_classes import BoringModel, RandomDataset
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn
from torch.utils.data import DataLoader
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.generation.stopping_criteria import StopStringCriteria

from abel_lightning import compat
from abel_lightning.models.tiny import build_tokenizer, random_model

STOP = "\nQuestion:"


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(["Question: what is 2 + 2?\nAnswer: 4.\nQuestion: and 3 + 3?"] * 20, vocab_size=300)


# -- torch ------------------------------------------------------------------------------------------------------------


def test_the_fsdp_wrapper_segment_is_torchs_own():
    from torch.distributed.fsdp._common_utils import FSDP_WRAPPED_MODULE

    assert compat.FSDP_WRAPPER == FSDP_WRAPPED_MODULE
    assert compat.unwrapped_name(f"policy.layers.0.{FSDP_WRAPPED_MODULE}.mlp.weight") == "policy.layers.0.mlp.weight"


def test_shared_tensors_are_the_sources_own_and_stay_buffers():
    source = nn.BatchNorm1d(4)
    with torch.device("meta"):
        target = nn.BatchNorm1d(4)
    compat.share_tensors(target, source)
    assert target.weight is source.weight and target.running_mean is source.running_mean
    assert "running_mean" in dict(target.named_buffers()) and not any(t.is_meta for t in target.state_dict().values())


# -- transformers -----------------------------------------------------------------------------------------------------


def test_a_stop_criterion_moved_once_matches_only_after_its_string(tokenizer):
    criterion = compat.stop_criterion_on(StopStringCriteria(tokenizer, [STOP]), torch.device("cpu"))
    width = compat.stop_window(criterion)
    blank = compat.stop_blank_token(criterion)
    assert width >= 1 and 0 <= blank
    tail = tokenizer("The answer is 4." + STOP, add_special_tokens=False)["input_ids"][-width:]
    window = torch.full((2, width), blank)
    window[0, width - len(tail) :] = torch.tensor(tail)
    assert criterion(window, None).tolist() == [True, False]


def test_the_decoder_layout_the_engine_reads_is_there(tokenizer):
    llama = random_model("tiny-llama", tokenizer)
    assert compat.decoder_layout_missing(llama) is None
    assert compat.rope_type(llama) == "default"
    assert compat.rms_norm_eps(llama.model.norm) == llama.config.rms_norm_eps
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=300))
    assert "model.embed_tokens" in compat.decoder_layout_missing(gpt2)


def test_the_engines_rotary_embedding_is_each_familys_own():
    from transformers.models.mistral import modeling_mistral
    from transformers.models.qwen2 import modeling_qwen2

    query, keys = torch.randn(2, 4, 3, 8), torch.randn(2, 2, 3, 8)
    cos, sin = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    ours = compat.apply_rotary_pos_emb(query, keys, cos, sin)
    for family in (modeling_mistral, modeling_qwen2):
        for mine, theirs in zip(ours, family.apply_rotary_pos_emb(query, keys, cos, sin)):
            torch.testing.assert_close(mine, theirs, rtol=0, atol=0)


# -- peft -------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_lora_layer_state_and_deltas(tokenizer):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"])
    model = get_peft_model(random_model("tiny-llama", tokenizer), config)
    layer = next(m for m in model.modules() if isinstance(m, LoraLayer))
    layer.lora_B["default"].weight.normal_()
    assert compat.tuner_layer_state(layer) == (False, False, ("default",))
    with model.disable_adapter():
        assert compat.tuner_layer_state(layer)[1] is True
    (delta,) = compat.lora_deltas(layer)
    expected = layer.lora_B["default"].weight @ layer.lora_A["default"].weight * layer.scaling["default"]
    torch.testing.assert_close(delta, expected)
    before = layer.get_base_layer().weight.clone()
    model.merge_adapter()
    assert compat.tuner_layer_state(layer)[0] is True
    torch.testing.assert_close(layer.get_base_layer().weight, before + delta)
    assert not compat.lora_uses_dora(layer)
    dora = get_peft_model(
        random_model("tiny-llama", tokenizer), LoraConfig(r=4, target_modules=["q_proj"], use_dora=True)
    )
    assert compat.lora_uses_dora(next(m for m in dora.modules() if isinstance(m, LoraLayer)))


# -- lightning --------------------------------------------------------------------------------------------------------


def trainer(tmp_path, **kwargs) -> L.Trainer:
    return L.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        **kwargs,
    )


class Recorder(L.Callback):
    def __init__(self):
        self.indices, self.attached, self.shown = [], [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.indices.append(compat.fit_batch_index(trainer))
        self.attached.append(compat.attached_trainer(pl_module) is trainer)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.shown.append(compat.show_on_progress_bar(trainer, "predict", "7 questions/s"))


def test_fit_batch_index_counts_over_epochs_and_the_module_finds_its_trainer(tmp_path):
    module, recorder = BoringModel(), Recorder()
    assert compat.attached_trainer(module) is None
    trainer(
        tmp_path,
        max_epochs=2,
        limit_train_batches=3,
        limit_val_batches=0,
        callbacks=[recorder],
        enable_progress_bar=False,
    ).fit(module)
    assert recorder.indices == [0, 1, 2, 3, 4, 5] and all(recorder.attached)


def test_a_metric_set_after_the_loop_is_what_callback_metrics_reads(tmp_path):
    run = trainer(tmp_path)
    compat.set_callback_metric(run, "platinum_accuracy", torch.tensor(0.5))
    assert run.callback_metrics["platinum_accuracy"].item() == 0.5


@pytest.mark.parametrize("bar", [TQDMProgressBar, RichProgressBar])
def test_rates_go_on_the_predict_bar(tmp_path, bar):
    recorder = Recorder()
    run = trainer(tmp_path, callbacks=[recorder, bar()])
    run.predict(BoringModel(), DataLoader(RandomDataset(32, 4), batch_size=2))
    assert recorder.shown == [True, True]
    no_bar = Recorder()
    trainer(tmp_path, callbacks=[no_bar], enable_progress_bar=False).predict(
        BoringModel(), DataLoader(RandomDataset(32, 4), batch_size=2)
    )
    assert no_bar.shown == [False, False]
