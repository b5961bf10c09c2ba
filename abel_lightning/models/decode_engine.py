"""A decode engine for Llama-, Mistral- and Qwen2-shaped causal LMs: a static KV cache, sampling on the device, and a
one-token decode step replayed as a CUDA graph.

Hugging Face's ``model.generate`` launches every kernel of every step from Python and waits on the host to sample
and to check stopping, so at rollout batch sizes a 7B model on a GPU is bound by the host, not by memory bandwidth.
Here:

- the forward is our own, over the model's modules (embeddings, each layer's norms, q/k/v/o projections and MLP, its
  rotary embedding, the final norm, the LM head), so a PEFT LoRA layer, merged or not, or a bitsandbytes Linear works
  as it is;
- keys and values go to a cache preallocated for ``rows x capacity`` slots. A decode step's attention reads only
  each row's slots in use, through :mod:`decode_kernels`' split-KV kernel on a GPU (which also fuses the rotary
  embedding with the cache write, and each residual add with the norm after it), or reads the step's bucket of
  slots through a boolean mask with SDPA (the CPU, and shapes the kernels do not take);
- one decode step (forward, sampling, stopping, advancing the positions) reads and writes only preallocated buffers,
  so on a GPU it is captured once per (rows, sampling mode) as a ``torch.cuda.CUDAGraph`` and replayed; with SDPA,
  once per KV bucket too: a bucket is a multiple of ``KV_BUCKET`` slots, and early steps attend over a shorter prefix
  of the cache;
- tokens are drawn with the exponential race ``argmax(p / E)``, ``E ~ Exp(1)`` i.i.d. per token, which samples from
  ``p`` without the host synchronisation of ``torch.multinomial``; each row's EOS and stop strings set a ``done`` flag
  on the device, and the host reads back only whether all rows are done, every ``CHECK_EVERY`` steps.

The prompt is prefilled by the same forward, once per distinct prompt, and its keys and values are copied to the
rows of its samples. On the CPU, or with ``cuda_graphs=False``, the step runs eagerly: same code, same results.

A captured graph reads every weight by address. Weights changed in place (the optimizer's step on LoRA parameters)
are read fresh at each replay; anything that moves a parameter's storage or changes how a module computes
(``merge_and_unload``, PEFT's merge, unmerge or ``disable_adapter``, train mode) changes the engine's weight signature,
and the graphs are captured again on the next call.
"""

from __future__ import annotations

import functools
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import Tensor, nn
from transformers import PreTrainedModel
from transformers.generation.stopping_criteria import StopStringCriteria

from abel_lightning.compat import (
    apply_rotary_pos_emb,
    decoder_layout_missing,
    rms_norm_eps,
    rope_type,
    stop_blank_token,
    stop_criterion_on,
    stop_window,
    tuner_layer_state,
)
from abel_lightning.models.architectures import decodable_model_types, fusable_norms
from abel_lightning.models.decode_kernels import add_rms_norm, kernels_supported, rotate_and_store, split_kv_attention

if TYPE_CHECKING:
    from abel_lightning.models.generation import SamplingSettings

# Rotary variants whose module is a pure function of the positions; "dynamic" and "longrope" rescale on the host from
# the longest position seen, which a graph cannot do and the static cache does not need.
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
# What runs a decode step's attention, rotary embedding, residual adds and norms: see DecodeEngine.
KERNEL_CHOICES = ("auto", "triton", "torch")
# Cache slots are allocated, and SDPA's graphs captured, in multiples of this; with SDPA a step attends over the
# smallest multiple that holds its context, so early steps read less cache.
KV_BUCKET = 128
# The host asks whether every row is done once per this many steps: at most this many steps are wasted at the end.
CHECK_EVERY = 16
# Eager steps before a capture: the first calls of cuBLAS and the attention kernels allocate workspaces and pick
# algorithms, which must not happen inside a capture.
WARMUP_STEPS = 2
# Logits processors that a model's generation_config can switch on in ``model.generate``, with their neutral values.
# The engine implements none of them, so it refuses a model that sets one (``generate`` then uses ``model.generate``).
NEUTRAL_PROCESSORS = {
    "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "bad_words_ids": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "sequence_bias": None,
    "typical_p": 1.0,
    "min_p": None,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "min_length": 0,
    "num_beams": 1,
    "guidance_scale": 1.0,
    "exponential_decay_length_penalty": None,
    "watermarking_config": None,
}


def nucleus_tail(logits: Tensor, top_p: Tensor) -> Tensor:
    """The tokens top-p sampling drops from ``logits`` [B, V], with ``top_p`` [1] or [B, 1]: HF's
    ``TopPLogitsWarper``, the tail whose cumulative probability is at most 1 - top_p, the top token always kept."""
    ascending, order = torch.sort(logits, descending=False)
    tail = ascending.softmax(-1).cumsum(-1) <= 1 - top_p
    tail[..., -1].fill_(False)
    return tail.scatter(-1, order, tail)


def sample_tokens(
    logits: Tensor, greedy: bool, temperature: Tensor, top_p: Tensor | None, greedy_rows: Tensor | None = None
) -> Tensor:
    """The next token of each row from ``logits`` [B, V] (float32): argmax if ``greedy``, else a sample.

    Sampling follows ``model.generate``: logits / ``temperature`` ([1], or [B, 1] for a temperature per row), then,
    with ``top_p`` ([1] or [B, 1]), keep the most likely tokens whose probability mass reaches ``top_p``
    (:func:`nucleus_tail`). The draw is ``argmax(p / E)`` with ``E ~ Exp(1)`` per token: ``P(argmax = i) = p_i``, and
    it needs no host synchronisation, unlike ``torch.multinomial``. ``greedy_rows`` [B] (bool) marks rows decoded
    greedily in a sampled batch (their temperature entry must be positive; it is not used).
    """
    if greedy:
        return logits.argmax(-1)
    best = logits.argmax(-1) if greedy_rows is not None else None
    logits = logits / temperature
    if top_p is not None:
        logits = logits.masked_fill(nucleus_tail(logits, top_p), float("-inf"))
    probs = logits.softmax(-1)
    # An exact zero from the exponential would turn 0/0 into NaN, which argmax prefers to anything.
    race = torch.empty_like(probs).exponential_().clamp_min_(torch.finfo(probs.dtype).tiny)
    drawn = (probs / race).argmax(-1)
    return drawn if best is None else torch.where(greedy_rows, best, drawn)


def _add_rms_norm(hidden: Tensor, delta: Tensor, norm: nn.Module, kernels: bool) -> tuple[Tensor, Tensor]:
    """``hidden + delta`` and ``norm`` of it: one Triton kernel with ``kernels`` (for the RMSNorms it knows), else
    PyTorch's ops."""
    if kernels and type(norm).__name__ in fusable_norms():
        return add_rms_norm(hidden, delta, norm.weight, rms_norm_eps(norm))
    hidden = hidden + delta
    return hidden, _rms_norm(norm, hidden)


def _rms_norm(norm: nn.Module, x: Tensor) -> Tensor:
    """``norm(x)`` for the RMSNorm of Llama, Mistral and Qwen2 (``weight * (x / rms(x))``, in float32 then cast back)
    in one fused kernel instead of their eight small ones: a decode step runs 65 norms, and at these sizes each kernel
    costs its launch, not its bytes."""
    if type(norm).__name__ not in fusable_norms():
        return norm(x)
    return norm.weight * F.rms_norm(x.float(), x.shape[-1:], eps=rms_norm_eps(norm)).to(x.dtype)


def _attention_bias(mask: Tensor, groups: int, dtype: torch.dtype) -> Tensor:
    """The additive bias [B, 1, groups * T, K] of a boolean ``mask`` [B, T, K] (True where a query sees a key), laid
    out for :func:`_attend`. Made once per forward: every layer shares it."""
    batch, length, width = mask.shape
    mask = mask[:, None, None].expand(-1, -1, groups, -1, -1).reshape(batch, 1, groups * length, width)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def _attend(query: Tensor, keys: Tensor, values: Tensor, bias: Tensor, scale: float) -> Tensor:
    """Grouped-query attention: ``query`` [B, H, T, D] over ``keys``/``values`` [B, G, K, D] (H a multiple of G)
    with ``bias`` from :func:`_attention_bias`. Returns [B, H, T, D].

    The H / G query heads that share a key head are folded into its query rows, so the kernel reads each cached key
    once instead of once per query head (``repeat_kv`` would copy the cache H / G times).
    """
    batch, heads, length, dim = query.shape
    query = query.reshape(batch, keys.shape[1], heads // keys.shape[1] * length, dim)
    out = F.scaled_dot_product_attention(query, keys, values, attn_mask=bias, scale=scale)
    return out.reshape(batch, heads, length, dim)


@dataclass(frozen=True)
class _Mode:
    """What a decode step's code depends on, beyond the buffers: part of the key of a captured graph."""

    greedy: bool  # every row greedy
    mixed: bool  # some rows greedy, the others sampled (per-row settings)
    nucleus: bool  # some sampled row has top_p < 1
    kernels: bool  # the step runs decode_kernels' Triton kernels (split-KV attention), else PyTorch's (SDPA)
    eos_ids: tuple[int, ...]
    pad_id: int
    # One matcher per distinct stop-string list, each applying to the rows in ``_Workspace.stop_rows(i)``; compared
    # by identity: the engine keeps one per tokenizer and strings.
    stops: tuple[StopStringCriteria, ...]


def _step_width(workspace: _Workspace, mode: _Mode, slot: int) -> int:
    """The cache width a step that writes ``slot`` attends over (SDPA), or the whole cache (split-KV attention, which
    reads only the slots in use whatever the width)."""
    return workspace.capacity if mode.kernels else (slot // KV_BUCKET + 1) * KV_BUCKET


def _groups(model: PreTrainedModel) -> int:
    """Query heads per key head."""
    return model.config.num_attention_heads // model.config.num_key_value_heads


class _Workspace:
    """The buffers every decode step reads and writes in place, for up to ``rows`` rows and ``capacity`` cache slots,
    and the graphs captured over them (a graph reads its buffers by address, so they live and die together)."""

    def __init__(self, layers: int, rows: int, capacity: int, kv_heads: int, head_dim: int, dtype, device):
        self.rows, self.capacity = rows, capacity
        # Zeros, not empty: masked slots still enter attention as 0 * value, and garbage could be NaN.
        self.keys = torch.zeros(layers, rows, kv_heads, capacity, head_dim, dtype=dtype, device=device)
        self.values = torch.zeros_like(self.keys)
        self.key_mask = torch.zeros(rows, capacity, dtype=torch.bool, device=device)
        self.first = torch.zeros(rows, dtype=torch.long, device=device)  # each row's first slot in use
        self.tokens = torch.zeros(rows, dtype=torch.long, device=device)  # the token each row feeds to the next step
        self.positions = torch.zeros(rows, dtype=torch.long, device=device)  # its position: real tokens before it
        self.done = torch.zeros(rows, dtype=torch.bool, device=device)
        self.generated = torch.zeros(rows, capacity, dtype=torch.long, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)  # the cache slot of ``tokens`` (every row's)
        self.count = torch.zeros(1, dtype=torch.long, device=device)  # tokens generated so far
        # Each row's sampling settings (rows of one batch may differ: Regime W's arms decode side by side).
        self.temperature = torch.ones(rows, 1, device=device)
        self.top_p = torch.ones(rows, 1, device=device)
        self.greedy_rows = torch.zeros(rows, dtype=torch.bool, device=device)
        self.min_new_tokens = torch.zeros(rows, dtype=torch.long, device=device)
        self.max_new_tokens = torch.zeros(rows, dtype=torch.long, device=device)
        self.eos: dict[tuple[int, ...], Tensor] = {}
        # Per stop-string window width: each row's last tokens, which StopStringCriteria reads.
        self.recent: dict[int, Tensor] = {}
        # Per stop matcher of a mode (by position): the rows it applies to.
        self.stop_masks: dict[int, Tensor] = {}
        self.graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self.pool = torch.cuda.graph_pool_handle() if self.keys.is_cuda else None

    def eos_ids(self, ids: tuple[int, ...]) -> Tensor:
        if ids not in self.eos:
            self.eos[ids] = torch.tensor(ids, dtype=torch.long, device=self.keys.device)
        return self.eos[ids]

    def window(self, width: int) -> Tensor:
        if width not in self.recent:
            self.recent[width] = torch.zeros(self.rows, width, dtype=torch.long, device=self.keys.device)
        return self.recent[width]

    def stop_rows(self, index: int) -> Tensor:
        if index not in self.stop_masks:
            self.stop_masks[index] = torch.zeros(self.rows, dtype=torch.bool, device=self.keys.device)
        return self.stop_masks[index]


def _refusal(model: PreTrainedModel) -> str | None:
    """Why the engine cannot decode ``model`` exactly as ``model.generate`` would, or None if it can."""
    config = model.config
    if config.model_type not in decodable_model_types():
        return f"model_type {config.model_type!r} is not one of {decodable_model_types()}"
    missing = decoder_layout_missing(model)
    if missing is not None:
        return missing
    if rope_type(model) not in SUPPORTED_ROPE_TYPES:
        return f"rope_type {rope_type(model)!r} is not one of {SUPPORTED_ROPE_TYPES}"
    for name, neutral in NEUTRAL_PROCESSORS.items():
        value = getattr(model.generation_config, name, None)
        if value is not None and value != neutral:
            return f"generation_config.{name} = {value!r} is a logits processor the engine does not implement"
    return None


def _capturable(model: PreTrainedModel) -> bool:
    """Whether a decode step of ``model`` can be captured as a CUDA graph: bitsandbytes' 4-bit layers dequantize and
    multiply on the device, LLM.int8's outlier decomposition picks columns on the host."""
    config = getattr(model.config, "quantization_config", None)
    if config is None:
        return True
    return bool(config.get("load_in_4bit") if isinstance(config, dict) else getattr(config, "load_in_4bit", False))


def _weights_signature(model: nn.Module) -> tuple:
    """What a captured graph depends on besides the weights' values: where each parameter lives, how each PEFT layer
    computes (merged, adapters disabled, which adapters are active), and train/eval mode."""
    return (
        tuple(p.data_ptr() for p in model.parameters()),
        tuple(tuner_layer_state(m) for m in model.modules() if isinstance(m, BaseTunerLayer)),
        model.training,
    )


class DecodeEngine:
    """Batched sampling from one model with a static KV cache; see the module docstring. Get it with
    :func:`decode_engine`, which keeps one per model. ``capture_seconds`` adds up the time spent capturing graphs.

    ``kernels`` picks what runs a decode step around the matrix products: ``"triton"``, :mod:`decode_kernels`
    (split-KV attention over each row's slots in use, the rotary embedding with the cache write, the residual adds
    with the norms); ``"torch"``, PyTorch's ops (SDPA over the step's bucket of slots); ``"auto"``, Triton on an
    Ampere or newer GPU for the head shapes it takes, else PyTorch. The benches set it to compare the two.
    """

    def __init__(self, model: PreTrainedModel):
        # A weak reference, so that the engines cache (keyed weakly by the model) lets the model and its cache go.
        self._model = weakref.ref(model)
        self._workspace: _Workspace | None = None
        self._signature: tuple | None = None
        self._stop_criteria: dict[tuple, tuple[object, StopStringCriteria]] = {}
        self.capture_seconds = 0.0
        self.kernels = "auto"

    def uses_triton(self, device: torch.device) -> bool:
        """Whether decode steps on ``device`` run :mod:`decode_kernels`' kernels (see ``kernels``)."""
        model = self._model()
        if self.kernels not in KERNEL_CHOICES:
            raise ValueError(f"kernels = {self.kernels!r}: choose one of {KERNEL_CHOICES}")
        supported = kernels_supported(model.model.layers[0].self_attn.head_dim, _groups(model))
        if self.kernels == "triton" and not supported:
            raise ValueError("kernels = 'triton' needs Triton and a power-of-two head dimension of at least 16")
        # Ampere or newer for "auto": the kernels' bfloat16 dot products need it.
        ampere = device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)
        return self.kernels == "triton" or (self.kernels == "auto" and supported and ampere)

    def check_context(self, length: int) -> None:
        """Raise ValueError if a prompt width plus new tokens of ``length`` exceeds the model's sliding window: within
        the window, sliding-window attention is full attention; beyond it, the engine would not match the model."""
        window = getattr(self._model().config, "sliding_window", None)
        if window is not None and length > window:
            raise ValueError(f"context of {length} tokens exceeds the model's sliding window of {window}")

    def release(self) -> None:
        """Free the KV cache and the captured graphs (the next call allocates and captures again)."""
        self._workspace = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # Inference mode, always: the workspace is then made of inference tensors, updated in place only in here, so a
    # workspace made under Lightning's predict or test loop (which run in inference mode) serves a fit as well.
    @torch.inference_mode()
    def decode(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        settings: SamplingSettings | Sequence[SamplingSettings],
        samples_per_question: int,
        eos_token_ids: list[int],
        pad_token_id: int,
        tokenizer=None,
        cuda_graphs: bool = True,
    ) -> Tensor:
        """Sample ``samples_per_question`` continuations of each left-padded prompt in ``input_ids`` [N, P].

        ``settings`` is one setting for all rows, or one per prompt (N): the rows of prompt ``i`` then sample with
        ``settings[i]``'s temperature, top_p, min/max_new_tokens and stop strings, side by side with the others.
        Identical prompts are prefilled once.
        Returns the new tokens [N * samples_per_question, S] (rows prompt-major, as ``num_return_sequences`` orders
        them), S <= the largest ``max_new_tokens``: a row that ends (EOS, a stop string, which needs ``tokenizer``, or
        its own ``max_new_tokens``) is padded with ``pad_token_id`` after its last token, exactly as
        ``model.generate`` pads it.
        """
        model = self._model()
        device = input_ids.device
        prompts, width = input_ids.shape
        rows = prompts * samples_per_question
        per_row = [
            s
            for s in ([settings] * prompts if not isinstance(settings, Sequence) else settings)
            for _ in range(samples_per_question)
        ]
        max_new_tokens = max(s.max_new_tokens for s in per_row)
        stop_lists = list(dict.fromkeys(tuple(s.stop_strings) for s in per_row if s.stop_strings))
        stops = tuple(self._stop_criterion(tokenizer, list(strings), device) for strings in stop_lists)
        graphs = cuda_graphs and device.type == "cuda" and _capturable(model)
        try:
            # Autocast off: the weights carry their dtypes already, and autocast's weight-cast cache must not be used
            # by a graph capture (PyTorch documents it as unsafe).
            with torch.autocast(device.type, enabled=False):
                workspace = self._prepare(model, rows, width + max_new_tokens, graphs)
                greedy = [s.greedy for s in per_row]
                nucleus = any(s.top_p < 1 and not s.greedy for s in per_row)
                mode = _Mode(
                    all(greedy),
                    any(greedy) and not all(greedy),
                    nucleus,
                    self.uses_triton(device),
                    tuple(eos_token_ids),
                    pad_token_id,
                    stops,
                )
                # Buffers a graph reads are made before any capture, so that none lives in a graph's pool.
                workspace.eos_ids(mode.eos_ids)
                for index, stop in enumerate(stops):
                    workspace.window(stop_window(stop))
                    workspace.stop_rows(index)
                # Split-KV attention finds each row's slots on the device: one graph serves every step.
                width_of = functools.partial(_step_width, workspace, mode)
                step_widths = {width_of(slot) for slot in range(width, width + max_new_tokens - 1)}
                for step_width in sorted(step_widths) if graphs else []:
                    if (rows, step_width, mode) not in workspace.graphs:
                        step = functools.partial(self._step, model, workspace, rows, step_width, mode)
                        self._capture(workspace, (rows, step_width, mode), step)
                self._set_rows(workspace, per_row, stop_lists)
                self._prefill(model, workspace, input_ids, attention_mask, samples_per_question, mode)
                steps = 1
                while steps < max_new_tokens:
                    for _ in range(min(CHECK_EVERY, max_new_tokens - steps)):
                        if graphs:
                            workspace.graphs[(rows, width_of(width + steps - 1), mode)].replay()
                        else:
                            self._step(model, workspace, rows, width_of(width + steps - 1), mode)
                        steps += 1
                    if bool(workspace.done[:rows].all()):
                        break
                return workspace.generated[:rows, :steps].clone()
        except torch.OutOfMemoryError:
            # The caller retries with fewer rows; the cache sized for these rows would stand in its way.
            self.release()
            raise

    @staticmethod
    def _set_rows(workspace: _Workspace, per_row: list[SamplingSettings], stop_lists: list[tuple[str, ...]]) -> None:
        """Each row's settings into the workspace's per-row buffers (one host-to-device copy each)."""
        rows = len(per_row)

        def put(buffer: Tensor, values: list) -> None:
            buffer[:rows].copy_(torch.tensor(values, dtype=buffer.dtype).view_as(buffer[:rows]), non_blocking=False)

        # A greedy row's temperature is never used; 1.0 keeps the division finite.
        put(workspace.temperature, [1.0 if s.greedy else s.temperature for s in per_row])
        put(workspace.top_p, [s.top_p for s in per_row])
        put(workspace.greedy_rows, [s.greedy for s in per_row])
        put(workspace.min_new_tokens, [s.min_new_tokens for s in per_row])
        put(workspace.max_new_tokens, [s.max_new_tokens for s in per_row])
        for index, strings in enumerate(stop_lists):
            put(workspace.stop_rows(index), [tuple(s.stop_strings) == strings for s in per_row])

    def _stop_criterion(self, tokenizer, stop_strings: list[str], device) -> StopStringCriteria:
        """HF's own stop-string matcher, which is pure tensor work (graph-safe), kept per tokenizer and strings so that
        its tables stay at the address a graph captured."""
        if tokenizer is None:
            raise ValueError("stop_strings need the tokenizer: pass tokenizer= to DecodeEngine.decode")
        key = (id(tokenizer), tuple(stop_strings))
        if key not in self._stop_criteria:
            criterion = stop_criterion_on(StopStringCriteria(tokenizer, stop_strings), device)
            # The tokenizer rides along so that its id cannot be reused by another while the entry lives.
            self._stop_criteria[key] = (tokenizer, criterion)
        return self._stop_criteria[key][1]

    def _prepare(self, model: PreTrainedModel, rows: int, length: int, graphs: bool) -> _Workspace:
        """A workspace for ``rows`` x ``length``: the current one if it fits, else a new one of that size; graphs are
        dropped if the weights moved.

        A workspace far larger than the call needs is replaced too: it would hold its memory through what comes next
        (in PPO, the update after a large in-fit evaluation), and a smaller one costs only a capture.
        """
        workspace = self._workspace
        capacity = -(-length // KV_BUCKET) * KV_BUCKET
        if (
            workspace is None
            or workspace.rows < rows
            or workspace.capacity < capacity
            or 4 * rows * capacity < workspace.rows * workspace.capacity
        ):
            self.release()
            body = model.model
            attention = body.layers[0].self_attn
            config = model.config
            workspace = self._workspace = _Workspace(
                len(body.layers),
                rows,
                capacity,
                config.num_key_value_heads,
                attention.head_dim,
                body.embed_tokens.weight.dtype,
                body.embed_tokens.weight.device,
            )
        if graphs:
            signature = _weights_signature(model)
            if signature != self._signature:
                workspace.graphs.clear()
                self._signature = signature
        return workspace

    def _capture(self, workspace: _Workspace, key: tuple, step: Callable[[], None]) -> None:
        """Capture ``step`` into a graph. Runs before the prefill: the warm-up steps overwrite the decoding state."""
        started = time.perf_counter()
        workspace.slot.zero_()
        workspace.count.zero_()
        workspace.positions.zero_()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # The default CUDA generator registers with the capture, so each replay draws fresh random numbers.
        with torch.cuda.graph(graph, pool=workspace.pool):
            step()
        workspace.graphs[key] = graph
        torch.cuda.synchronize()
        self.capture_seconds += time.perf_counter() - started

    def _forward(self, model: PreTrainedModel, input_ids: Tensor, positions: Tensor, attend, kernels: bool) -> Tensor:
        """Float32 logits [B, V] at the last position of ``input_ids`` [B, T].

        ``positions`` [B, T] are the RoPE positions, and ``attend(layer, query, keys, values, rotary, scale)``
        applies the rotary embedding ``rotary`` (cos, sin [B, T, D]) to ``query`` [B, H, T, D] and ``keys``
        [B, G, T, D], puts this pass's keys and values in the cache and returns the attention of the query over what
        each query sees, [B, H, T, D]. ``kernels``: residual adds and norms by :func:`add_rms_norm`.
        """
        body, config = model.model, model.config
        hidden = body.embed_tokens(input_ids)
        rotary = body.rotary_emb(hidden, positions)
        layers = body.layers[: config.num_hidden_layers]
        x = _rms_norm(layers[0].input_layernorm, hidden)
        for index, layer in enumerate(layers):
            attention = layer.self_attn
            shape = (*x.shape[:2], -1, attention.head_dim)
            query = attention.q_proj(x).view(shape).transpose(1, 2)
            keys = attention.k_proj(x).view(shape).transpose(1, 2)
            values = attention.v_proj(x).view(shape).transpose(1, 2)
            out = attend(index, query, keys, values, rotary, attention.scaling)
            out = attention.o_proj(out.transpose(1, 2).reshape(*x.shape[:2], -1))
            hidden, x = _add_rms_norm(hidden, out, layer.post_attention_layernorm, kernels)
            following = layers[index + 1].input_layernorm if index + 1 < len(layers) else body.norm
            hidden, x = _add_rms_norm(hidden, layer.mlp(x), following, kernels)
        return model.lm_head(x[:, -1:])[:, -1].float()

    def _prefill(self, model, workspace, input_ids, attention_mask, samples_per_question, mode: _Mode) -> None:
        """Run the prompts, fill the cache rows of their samples, reset the decoding state and take the first token.

        Identical prompts (Regime W's arms that share a template) run once; their keys and values go to all their rows.
        """
        prompts, width = input_ids.shape
        rows = prompts * samples_per_question
        unique, inverse = torch.unique(torch.cat([input_ids, attention_mask], 1), dim=0, return_inverse=True)
        if len(unique) < prompts:
            input_ids, attention_mask = unique[:, :width], unique[:, width:]
            prompt_of_row = inverse.repeat_interleave(samples_per_question)
        else:
            # No duplicates: the prompts stay in their order, so each row's numbers are those of the batch as given.
            prompt_of_row = torch.arange(prompts, device=input_ids.device).repeat_interleave(samples_per_question)
        valid = attention_mask.bool()
        # Positions count real tokens only, as `generate` numbers them under left padding (SequenceBatch does too).
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        causal = torch.ones(width, width, dtype=torch.bool, device=input_ids.device).tril()
        # A padding query sees itself too: with no key at all its attention would be NaN, and NaN keys and values
        # in later layers would poison every row (masked attention still multiplies them by zero).
        mask = causal & (valid[:, None, :] | torch.eye(width, dtype=torch.bool, device=input_ids.device))

        bias = _attention_bias(mask, _groups(model), workspace.keys.dtype)

        def attend(layer: int, query: Tensor, keys: Tensor, values: Tensor, rotary, scale: float) -> Tensor:
            query, keys = apply_rotary_pos_emb(query, keys, *rotary)
            workspace.keys[layer, :rows, :, :width].copy_(keys.index_select(0, prompt_of_row))
            workspace.values[layer, :rows, :, :width].copy_(values.index_select(0, prompt_of_row))
            return _attend(query, keys, values, bias, scale)

        logits = self._forward(model, input_ids, positions, attend, kernels=False).index_select(0, prompt_of_row)
        workspace.key_mask[:rows].zero_()
        workspace.key_mask[:rows, :width] = valid.index_select(0, prompt_of_row)
        workspace.first[:rows] = valid.long().argmax(-1).index_select(0, prompt_of_row)
        workspace.positions[:rows] = attention_mask.sum(-1).index_select(0, prompt_of_row)
        workspace.slot.fill_(width)
        workspace.count.zero_()
        workspace.done[:rows] = False
        for stop in mode.stops:
            recent = workspace.window(stop_window(stop))[:rows]
            # Slots before a short prompt hold an out-of-vocabulary id, which StopStringCriteria never matches.
            recent.fill_(stop_blank_token(stop))
            tail = input_ids[:, -recent.shape[1] :].index_select(0, prompt_of_row)
            recent[:, -tail.shape[1] :] = tail
        self._choose(workspace, rows, logits, mode)

    def _step(self, model, workspace: _Workspace, rows: int, width: int, mode: _Mode) -> None:
        """One token for every row, reading the cache up to ``width`` slots (split-KV: each row's slots in use): the
        body of a captured graph."""
        keys_cache, values_cache = workspace.keys[:, :rows], workspace.values[:, :rows]
        key_mask = workspace.key_mask[:rows]
        key_mask.index_fill_(1, workspace.slot, True)
        bias = None if mode.kernels else _attention_bias(key_mask[:, None, :width], _groups(model), keys_cache.dtype)

        def attend(layer: int, query: Tensor, keys: Tensor, values: Tensor, rotary, scale: float) -> Tensor:
            if mode.kernels:
                cos, sin = (t[:, 0] for t in rotary)
                keys_at, values_at = keys_cache[layer], values_cache[layer]
                query = rotate_and_store(
                    query[:, :, 0], keys[:, :, 0], values[:, :, 0], cos, sin, keys_at, values_at, workspace.slot
                )
                out = split_kv_attention(
                    query, keys_at, values_at, key_mask, workspace.first[:rows], workspace.slot, scale
                )
                return out[:, :, None]
            query, keys = apply_rotary_pos_emb(query, keys, *rotary)
            keys_cache[layer].index_copy_(2, workspace.slot, keys)
            values_cache[layer].index_copy_(2, workspace.slot, values)
            return _attend(query, keys_cache[layer, :, :, :width], values_cache[layer, :, :, :width], bias, scale)

        tokens, positions = workspace.tokens[:rows, None], workspace.positions[:rows, None]
        logits = self._forward(model, tokens, positions, attend, mode.kernels)
        workspace.positions[:rows].add_(1)
        workspace.slot.add_(1)
        self._choose(workspace, rows, logits, mode)

    def _choose(self, workspace: _Workspace, rows: int, logits: Tensor, mode: _Mode) -> None:
        """Pick each row's next token, record it, and mark the rows it ends (as `model.generate`'s criteria do)."""
        eos = workspace.eos_ids(mode.eos_ids)
        # min_new_tokens: EOS is impossible until that many tokens are out (HF's MinNewTokensLengthLogitsProcessor).
        early = (workspace.count < workspace.min_new_tokens[:rows])[:, None]
        logits.index_copy_(1, eos, logits.index_select(1, eos).masked_fill(early, float("-inf")))
        top_p = workspace.top_p[:rows] if mode.nucleus else None
        greedy_rows = workspace.greedy_rows[:rows] if mode.mixed else None
        token = sample_tokens(logits, mode.greedy, workspace.temperature[:rows], top_p, greedy_rows)
        token = token.masked_fill(workspace.done[:rows], mode.pad_id)
        workspace.generated[:rows].index_copy_(1, workspace.count, token[:, None])
        # A row ends on EOS, on a stop string of its own, or at its own max_new_tokens.
        ended = (token[:, None] == eos).any(-1) | (workspace.count + 1 >= workspace.max_new_tokens[:rows])
        for width in dict.fromkeys(stop_window(stop) for stop in mode.stops):
            recent = workspace.window(width)[:rows]
            recent.copy_(torch.cat([recent[:, 1:], token[:, None]], dim=1))
        for index, stop in enumerate(mode.stops):
            recent = workspace.window(stop_window(stop))[:rows]
            ended |= stop(recent, None) & workspace.stop_rows(index)[:rows]
        workspace.done[:rows].logical_or_(ended)
        workspace.tokens[:rows] = token
        workspace.count.add_(1)


_ENGINES: weakref.WeakKeyDictionary[PreTrainedModel, DecodeEngine] = weakref.WeakKeyDictionary()


def decode_engine(model: nn.Module) -> DecodeEngine:
    """The engine of ``model`` (a Hugging Face causal LM, or a PEFT model around one), made on first use and kept as
    long as the model lives, KV cache and graphs included. Raises ValueError, saying why, for a model it cannot
    decode exactly as ``model.generate`` would."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    reason = _refusal(base)
    if reason is not None:
        raise ValueError(f"the static decode engine cannot decode {type(base).__name__}: {reason}")
    if base not in _ENGINES:
        _ENGINES[base] = DecodeEngine(base)
    return _ENGINES[base]
