"""The static decode engine against Hugging Face's ``model.generate``, on tiny random models. On the CPU the engine
runs its decode step eagerly; where a GPU is present the device tests run there too, replaying CUDA graphs. The tests
parametrized by ``kernels`` run the decode step with PyTorch's ops and with the Triton kernels (on the CPU in
Triton's interpreter, which ``conftest.py`` switches on where there is no GPU)."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel

from abel_lightning.models.decode_engine import decode_engine, sample_tokens
from abel_lightning.models.decode_kernels import triton
from abel_lightning.models.generation import SamplingSettings, generate
from abel_lightning.models.loading import LoraSettings, load_base
from abel_lightning.models.tiny import build_random_model, build_tokenizer, random_model, randomize_lora

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
KERNELS = ["torch"] + (["triton"] if triton is not None else [])
PROMPTS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many in May.",
    "A",
    "Weng earns $12 an hour for babysitting.",
    "Question: what is 2 + 2?",
]


@pytest.fixture(scope="module")
def tokenizer():
    tokenizer = build_tokenizer(PROMPTS * 20, vocab_size=300)
    tokenizer.padding_side = "left"
    return tokenizer


def eos_prone(model, tokenizer, prompts: list[str], steps: int = 12):
    """``model`` with the EOS row of the LM head set to 1.05 x the row of a token greedy decoding emits often, so
    that EOS replaces that token where its logit is positive: rows then end at different steps."""
    with torch.no_grad():
        settings = SamplingSettings(temperature=0.0, max_new_tokens=steps, engine="hf")
        greedy = generate(model, tokenizer, prompts, settings)
        emitted = torch.tensor([t for group in greedy for t in group[0].response_ids])
        frequent = int(emitted.bincount().argmax())
        model.lm_head.weight[tokenizer.eos_token_id] = 1.05 * model.lm_head.weight[frequent]
    return model


def stepping_with(model, kernels: str):
    """``model``, its decode engine set to run its steps with ``kernels``."""
    if kernels == "triton" and next(model.parameters()).device.type == "cpu" and torch.cuda.is_available():
        pytest.skip("on a machine with a GPU Triton compiles for it, and CPU tensors need its interpreter")
    decode_engine(model).kernels = kernels
    return model


def assert_same_completions(ours, theirs):
    assert [[vars(c) for c in group] for group in ours] == [[vars(c) for c in group] for group in theirs]


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("preset, seed", [("tiny-llama", 0), ("tiny-mistral", 1)])
def test_greedy_decoding_equals_hf_generate_with_variable_prompts_and_eos(tokenizer, preset, seed, device, kernels):
    model = eos_prone(random_model(preset, tokenizer, seed=seed, device=device).eval(), tokenizer, PROMPTS)
    stepping_with(model, kernels)
    greedy = SamplingSettings(temperature=0.0, max_new_tokens=24)
    ours = generate(model, tokenizer, PROMPTS, SamplingSettings(**{**vars(greedy), "engine": "static"}))
    theirs = generate(model, tokenizer, PROMPTS, SamplingSettings(**{**vars(greedy), "engine": "hf"}))
    assert_same_completions(ours, theirs)
    # Chunks of 3 and 1 prompts: the engine decodes them in views of the workspace the 4 prompts made.
    ours = generate(model, tokenizer, PROMPTS, SamplingSettings(**{**vars(greedy), "engine": "static"}), 1, 3)
    theirs = generate(model, tokenizer, PROMPTS, SamplingSettings(**{**vars(greedy), "engine": "hf"}), 1, 3)
    assert_same_completions(ours, theirs)

    finished = [group[0].finished for group in ours]
    assert any(finished) and not all(finished), "the test needs rows that end on EOS and rows that run to the limit"
    assert len({len(group[0].response_ids) for group in ours}) > 1


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("device", DEVICES)
def test_generate_equals_hf_with_stop_strings_and_a_peft_adapter_unmerged(tokenizer, device, kernels):
    base = stepping_with(random_model("tiny-llama", tokenizer, seed=2, device=device), kernels)
    model = randomize_lora(get_peft_model(base, LoraSettings(r=4).to_peft()).eval(), 0.5)
    plain = generate(model, tokenizer, PROMPTS, SamplingSettings(temperature=0.0, max_new_tokens=16, engine="hf"))
    # A stop string from the middle of one row's text (random tokens decode to stray bytes too: keep to ASCII).
    text = plain[0][0].text
    stop = next(text[i : i + 3] for i in range(3, len(text) - 3) if text[i : i + 3].isascii())
    settings = {"temperature": 0.0, "max_new_tokens": 16, "stop_strings": [stop]}
    ours = generate(model, tokenizer, PROMPTS, SamplingSettings(**settings, engine="static"))
    theirs = generate(model, tokenizer, PROMPTS, SamplingSettings(**settings, engine="hf"))

    assert_same_completions(ours, theirs)
    assert len(ours[0][0].response_ids) < 16 and stop in ours[0][0].text
    # With the adapter switched off the engine decodes the base alone, as generate does.
    with model.disable_adapter():
        base = generate(model, tokenizer, PROMPTS, SamplingSettings(**settings, engine="static"))
        base_hf = generate(model, tokenizer, PROMPTS, SamplingSettings(**settings, engine="hf"))
    assert_same_completions(base, base_hf)
    assert [g[0].response_ids for g in base] != [g[0].response_ids for g in ours]


@pytest.mark.parametrize("device", DEVICES)
def test_rows_that_emit_eos_get_only_padding_and_the_others_run_on_unchanged(tokenizer, device):
    model = random_model("tiny-llama", tokenizer, seed=3, device=device).eval()
    engine = decode_engine(model)
    encoded = tokenizer(PROMPTS, return_tensors="pt", padding=True).to(device)
    settings = SamplingSettings(temperature=0.0, max_new_tokens=20)
    pad = tokenizer.pad_token_id

    def decode(eos: int) -> torch.Tensor:
        return engine.decode(encoded["input_ids"], encoded["attention_mask"], settings, 1, [eos], pad)

    never = len(tokenizer) - 1
    free = decode(never)
    assert free.shape == (len(PROMPTS), 20) and not (free == never).any(), "no row may stop in the reference run"
    eos = int(free[0, 4])  # row 0 emits it at step 4
    assert any(eos not in row for row in free.tolist()), "the test needs a row that never emits it"
    stopped = decode(eos)
    assert stopped.shape[1] == 20
    for row, tokens in zip(free.tolist(), stopped.tolist()):
        end = row.index(eos) + 1 if eos in row else len(row)
        assert tokens[:end] == row[:end]
        assert tokens[end:] == [pad] * (len(tokens) - end)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bitsandbytes' 4-bit layers decode on a GPU only")
def test_a_4bit_base_with_lora_decodes_in_cuda_graphs_as_generate_does(tokenizer, tmp_path):
    """QLoRA sampling: the 4-bit base's decode step is captured (issue 17's goal 3), the LoRA beside it unmerged.
    Computed in float32, so that greedy decoding is comparable with `generate` token for token."""
    folder = build_random_model("tiny-llama", tmp_path, tokenizer=tokenizer, seed=6)
    base = load_base(str(folder), "float32", quantization="4bit", device="cuda")
    model = randomize_lora(get_peft_model(base, LoraSettings(r=4).to_peft()).eval(), 0.5)
    settings = {"temperature": 0.0, "max_new_tokens": 20}
    engine = decode_engine(model)
    captured = engine.capture_seconds
    graphs = generate(model, tokenizer, PROMPTS, SamplingSettings(**settings, engine="static"))
    assert engine.capture_seconds > captured, "the 4-bit decode step was not captured"
    eager = generate(model, tokenizer, PROMPTS, SamplingSettings(**settings, engine="static", cuda_graphs=False))
    theirs = generate(model, tokenizer, PROMPTS, SamplingSettings(**settings, engine="hf"))
    assert_same_completions(graphs, eager)
    assert_same_completions(graphs, theirs)


def test_min_new_tokens_keeps_eos_out_until_then(tokenizer):
    model = eos_prone(random_model("tiny-llama", tokenizer, seed=0).eval(), tokenizer, PROMPTS)
    settings = {"temperature": 0.0, "max_new_tokens": 24, "min_new_tokens": 24}
    ours = generate(model, tokenizer, PROMPTS, SamplingSettings(**settings, engine="static"))
    assert all(len(g[0].response_ids) == 24 and not g[0].finished for g in ours)
    assert_same_completions(ours, generate(model, tokenizer, PROMPTS, SamplingSettings(**settings, engine="hf")))


def expected_distribution(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """softmax(logits / T) restricted to the smallest set of top tokens with mass >= top_p, renormalised."""
    probs = torch.softmax(logits / temperature, -1)
    ordered, order = probs.sort(descending=True)
    keep = (ordered.cumsum(-1) - ordered) < top_p
    kept = torch.zeros_like(probs).scatter(-1, order, ordered * keep)
    return kept / kept.sum(-1, keepdim=True)


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.5, 1.0), (1.3, 0.8)])
def test_sampled_frequencies_match_the_tempered_nucleus(temperature, top_p):
    torch.manual_seed(0)
    logits = torch.tensor([2.0, 1.5, 1.0, 0.3, -0.5, -2.0])
    rows = 200_000
    tokens = sample_tokens(
        logits.expand(rows, -1), False, torch.tensor([temperature]), torch.tensor([top_p]) if top_p < 1 else None
    )
    frequencies = tokens.bincount(minlength=len(logits)).double() / rows
    expected = expected_distribution(logits.double(), temperature, top_p)
    # One standard deviation of a frequency is at most sqrt(0.25 / rows) = 0.0011; 0.006 is over 5 of them.
    assert (frequencies - expected).abs().max() < 0.006
    assert (frequencies[expected == 0] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_engine_samples_each_step_from_the_models_tempered_nucleus(tokenizer, device):
    model = random_model("tiny-llama", tokenizer, seed=4, device=device).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(40)  # a peaked distribution: a few likely tokens, a nucleus smaller than the vocab
    prompt = ["Weng earns $12 an hour"]
    encoded = tokenizer(prompt, return_tensors="pt").to(device)
    settings = SamplingSettings(temperature=0.8, top_p=0.9, max_new_tokens=2)
    torch.manual_seed(0)
    rows = 6000
    never = len(tokenizer) - 1
    tokens = decode_engine(model).decode(
        encoded["input_ids"], encoded["attention_mask"], settings, rows, [never], tokenizer.pad_token_id
    )

    with torch.no_grad():
        first_logits = model(**encoded).logits[0, -1]
        first = int(tokens[:, 0].mode().values)
        assert first != never
        context = torch.cat([encoded["input_ids"], torch.tensor([[first]], device=device)], 1)
        second_logits = model(input_ids=context).logits[0, -1]
    # The first token comes from the prefill; the second, for rows that drew `first`, from a decode step.
    for drawn, logits in [(tokens[:, 0], first_logits), (tokens[tokens[:, 0] == first, 1], second_logits)]:
        expected = expected_distribution(logits.double().cpu(), 0.8, 0.9)
        frequencies = drawn.cpu().bincount(minlength=len(expected)).double() / len(drawn)
        assert len(drawn) > 1000 and (expected == 0).sum() > len(expected) // 2
        assert (frequencies[expected == 0] == 0).all()
        assert (frequencies - expected).abs().max() < 0.05  # sd <= sqrt(0.25 / 1000) = 0.016


def test_refuses_what_it_cannot_decode_exactly(tokenizer):
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=len(tokenizer)))
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        decode_engine(gpt2)

    mistral = random_model("tiny-mistral", tokenizer)
    mistral.config.sliding_window = 16
    with pytest.raises(ValueError, match="sliding window of 16"):
        generate(mistral, tokenizer, PROMPTS[:1], SamplingSettings(max_new_tokens=20, engine="static"))

    llama = random_model("tiny-llama", tokenizer)
    llama.generation_config.repetition_penalty = 1.2
    with pytest.raises(ValueError, match="repetition_penalty"):
        decode_engine(llama)


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("device", DEVICES)
def test_rows_of_different_lengths_and_stop_strings_decode_in_one_batch_as_each_alone(tokenizer, device, kernels):
    model = eos_prone(random_model("tiny-llama", tokenizer, seed=5, device=device).eval(), tokenizer, PROMPTS)
    stepping_with(model, kernels)
    alone = generate(model, tokenizer, PROMPTS, SamplingSettings(temperature=0.0, max_new_tokens=16, engine="hf"))
    longest = max(range(len(PROMPTS)), key=lambda i: len(alone[i][0].text))
    text = alone[longest][0].text
    stop = next(text[i : i + 2] for i in range(2, len(text) - 2) if text[i : i + 2].isascii())
    per_prompt = [SamplingSettings(temperature=0.0, max_new_tokens=n) for n in (16, 5, 16, 9)]
    per_prompt[longest] = SamplingSettings(temperature=0.0, max_new_tokens=16, stop_strings=[stop])
    per_prompt[(longest + 1) % 4].stop_strings = ["\n\n"]
    expected = [
        generate(model, tokenizer, [p], SamplingSettings(**{**vars(s), "engine": "hf"}))[0]
        for p, s in zip(PROMPTS, per_prompt)
    ]
    for engine in ("static", "hf"):
        together = generate(
            model, tokenizer, PROMPTS, [SamplingSettings(**{**vars(s), "engine": engine}) for s in per_prompt]
        )
        assert [[c.response_ids for c in g] for g in together] == [[c.response_ids for c in g] for g in expected]
    assert stop in together[longest][0].text and len(together[longest][0].response_ids) < 16
    assert all(len(g[0].response_ids) <= s.max_new_tokens for g, s in zip(together, per_prompt))
    assert len({len(g[0].response_ids) for g in together}) > 1


@pytest.mark.parametrize("device", DEVICES)
def test_each_row_samples_from_its_own_temperature_and_greedy_rows_stay_greedy(tokenizer, device):
    model = random_model("tiny-llama", tokenizer, seed=4, device=device).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(40)
    prompts = ["Weng earns $12 an hour"] * 3
    per_prompt = [
        SamplingSettings(temperature=0.0, max_new_tokens=1),
        SamplingSettings(temperature=0.5, max_new_tokens=1),
        SamplingSettings(temperature=1.3, top_p=0.9, max_new_tokens=1),
    ]
    encoded = tokenizer(prompts, return_tensors="pt").to(device)
    rows = 4000
    never = len(tokenizer) - 1
    torch.manual_seed(0)
    tokens = (
        decode_engine(model)
        .decode(encoded["input_ids"], encoded["attention_mask"], per_prompt, rows, [never], tokenizer.pad_token_id)[
            :, 0
        ]
        .view(3, rows)
        .cpu()
    )
    with torch.no_grad():
        logits = model(**tokenizer(prompts[:1], return_tensors="pt").to(device)).logits[0, -1].double().cpu()
    assert (tokens[0] == logits.argmax()).all()
    for drawn, (temperature, top_p) in zip(tokens[1:], [(0.5, 1.0), (1.3, 0.9)]):
        expected = expected_distribution(logits, temperature, top_p)
        frequencies = drawn.bincount(minlength=len(expected)).double() / rows
        assert (frequencies - expected).abs().max() < 0.04  # sd <= sqrt(0.25 / 4000) = 0.008
    # The two settings' distributions differ by far more than the tolerance: one setting for all rows would fail.
    assert (expected_distribution(logits, 0.5, 1.0) - expected_distribution(logits, 1.3, 0.9)).abs().max() > 0.1


def test_hf_path_samples_each_row_from_its_own_temperature(tokenizer):
    model = random_model("tiny-llama", tokenizer, seed=4).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(40)
    prompt = "Weng earns $12 an hour"
    per_prompt = [SamplingSettings(temperature=t, max_new_tokens=1, engine="hf") for t in (0.0, 0.5, 1.3)]
    torch.manual_seed(0)
    groups = generate(model, tokenizer, [prompt] * 3, per_prompt, samples_per_question=1500)
    with torch.no_grad():
        logits = model(**tokenizer([prompt], return_tensors="pt")).logits[0, -1].double()
    first = [torch.tensor([c.response_ids[0] for c in group]) for group in groups]
    assert (first[0] == logits.argmax()).all()
    for drawn, temperature in zip(first[1:], (0.5, 1.3)):
        expected = expected_distribution(logits, temperature, 1.0)
        frequencies = drawn.bincount(minlength=len(expected)).double() / len(drawn)
        assert (frequencies - expected).abs().max() < 0.06  # sd <= sqrt(0.25 / 1500) = 0.013
    assert (expected_distribution(logits, 0.5, 1.0) - expected_distribution(logits, 1.3, 1.0)).abs().max() > 0.12
