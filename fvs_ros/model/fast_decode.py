"""Fast greedy decoding for the Qwen2-VL language model: static KV cache + CUDA graphs.

Eager transformers decoding on a 7B model is launch / Python bound (benchmarks/gpu_notes.md:
80-120 ms per decoded token on an H100, against a ~5.5 ms weight-read floor). This module runs
the *same* transformers modules (embedding, rotary embedding, decoder layers, final norm,
lm_head) over a preallocated KV cache, and on CUDA replays captured CUDA graphs for

- the question prefill, padded up to a few length buckets (8, 16, 32, 64, 128, 256 tokens),
- one decode step (embed -> 28 layers -> norm -> lm_head -> argmax, which also advances the
  position and cache slot on the device, so consecutive steps need no host writes).

Cache layout: one static buffer per layer, keys and values ``[capacity, kv_heads, head_dim]``.
Slots ``[0, P)`` hold the memory prefix (copied once from a ``MemoryPrefix``'s KV, which is
never touched); an answer writes its question and generated tokens into ``[P, ...)`` and the
next answer overwrites them. Attention sees only valid slots:

- ``attention="flash"`` (CUDA, bf16/fp16): PyTorch's FlashAttention-2 varlen kernel
  (``aten._flash_attention_forward``), key ranges taken from device tensors (cu_seqlens_k),
  grouped-query heads handled by the kernel; graph-safe, reads only the valid part of the
  cache. For questions (1 < q <= the largest bucket) the prefix is split into ``splits``
  chunks that run as separate varlen sequences (flash-decoding: one sequence per chunk keeps
  the GPU busy, where one 10.8k-key sequence per head keeps 28 SMs busy), plus one causal
  sequence over the new tokens; the partial results are merged with their log-sum-exp
  (H100: question prefill 17.9 -> 12.4 ms). Decode steps (q = 1) use the plain kernel, which
  already packs the query heads of a KV head. A self-check of the split against the plain
  kernel runs once on construction; on failure the plain kernel is used.
- ``attention="sdpa"`` (CPU, or where the flash op is missing): ``scaled_dot_product_attention``
  with a boolean mask ``slot <= query's slot``; query heads are grouped by KV head so K/V are
  never repeated.

Prefix builds (``prefill_steps``) run outside the graphs, with ``prefill_attention``: "sdpa"
(``scaled_dot_product_attention`` over the keys written so far; PyTorch picks the kernel),
"flash" (the varlen kernel above), or "auto" (the default): SDPA for a chunk that starts the
prefix (causal, no mask: on an H100 PyTorch's kernel takes half the time of our varlen call) and,
where the flash op runs, the varlen kernel for later chunks (SDPA with a mask there was no
faster and held the GPU longer; benchmarks/gpu_notes.md runs 13-14).

The layers run through transformers' forwards, or (``fused``, the default "auto" on CUDA with
Triton) through a loop of our own that calls the same attention and linear modules and fuses the
memory-bound steps between them: RMSNorm, residual add + the next RMSNorm, SiLU-and-multiply
(fused_ops.py; docs/model.md "Fused small kernels").

Positions are given by the caller as 3-row (t, h, w) multimodal position ids (the model never
computes them); generated tokens take the next text position on all three axes.

Use (one thread at a time; the engine's LLM worker):

    fast = FastDecoder(llm, lm_head)                 # llm: Qwen2VLTextModel, lm_head: nn.Linear
    fast.reserve(prefix_tokens=10_900)               # optional: size the cache, capture graphs now
    out = fast.generate(tail_embeds, tail_positions, next_position, max_new_tokens, stop_ids,
                        prefix_kv=prefix.kv, prefix_len=prefix.num_tokens, on_token=callback)
    out.tokens, out.ttft_s

In VideoLM.answer (prefix cache):   embeds, positions = self._tail_inputs(question, answer_prefix,
prefix.next_position); fast.generate(embeds, positions, prefix.next_position + T, max_new_tokens,
self.stop_ids, prefix_kv=prefix.kv, prefix_len=prefix.num_tokens, on_token=token_id_callback).
In answer_uncached: fast.generate(inputs.embeds, inputs.position_ids, inputs.next_position, ...)
with no prefix (long prompts run eagerly through the static cache; decode still uses the graph).
benchmarks/bench_gpu.py (attach_fast) shows both, with text streaming.

The output must equal eager greedy decoding (``eager_generate`` below, the same loop as
``VideoLM.answer``): test/test_fast_decode.py checks it on CPU (float32, exact), and
benchmarks/bench_gpu.py on the GPU (float32 exact; bf16 within eager-vs-eager noise).
Measured on an H100 (benchmarks/gpu_notes.md): 30-token question on a 10.8k prefix 12.8 ms
TTFT (eager 50 ms), decode 116 tok/s (eager 6.5-12.5).
"""

from __future__ import annotations

import contextlib
import inspect
import threading
import time
from dataclasses import dataclass
from typing import Callable, Generator, Sequence

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, DynamicCache

from fvs_ros.common.cuda_graph import capture

from .evidence import MemoryLayout, block_attention
from .fused_ops import select_ops

ATTN_NAME = "fvs_static_cache"
DEFAULT_BUCKETS = (8, 16, 32, 64, 128, 256)
CAPACITY_ALIGN = 512

_local = threading.local()  # .ctx: the _AttnContext of the forward running on this thread


@dataclass
class FastGeneration:
    tokens: list[int]
    ttft_s: float  # call -> first token known (prefix copy and question prefill included)
    total_s: float
    prompt_tokens: int  # tokens prefilled by this call
    graphed: bool  # prefill ran as a captured graph
    logits: list[torch.Tensor] | None = None  # collect_logits=True: float32 [vocab] per returned token
    block_mass: torch.Tensor | None = None  # evidence=layout: attention mass per memory block (evidence.py)
    rows: int = 0  # forward passes whose output chose a token (the prefill's last row, then decode steps)
    evidence_s: float = 0.0  # time spent computing block_mass, after the last token


@dataclass
class _AttnContext:
    """What the attention function needs besides q/k/v, built once per forward (inside a graph if
    captured)."""

    flash: bool
    mask: torch.Tensor | None = None  # sdpa: [1, 1, groups * q, capacity] bool, True = attend
    # prefix builds with SDPA: keys [0, key_len) only, query heads grouped by the kernel (enable_gqa);
    # mask None: causal (q == key_len), else [1, 1, q, key_len] bool
    key_len: int = 0
    cu_q: torch.Tensor | None = None  # flash: [0, q] int32
    cu_k: torch.Tensor | None = (
        None  # flash, unsplit: [0, valid key length]; split: [P, valid key length] (new keys)
    )
    max_k: int = 0
    flash_kwargs: dict | None = None
    splits: int = 0  # flash: prefix chunks (0: one causal sequence over all keys)
    cu_q_pre: torch.Tensor | None = None  # [splits + 1] int32: the query rows repeated once per chunk
    cu_k_pre: torch.Tensor | None = None  # [splits + 1] int32: chunk bounds over [0, P)
    max_k_pre: int = 0
    # packed_logits: the new rows are independent tails of these lengths, each causal over its own keys
    tails: tuple[int, ...] = ()
    record: dict | None = None  # layer index -> [rows, H, D] buffer of recorded queries (evidence)
    record_src: torch.Tensor | None = None  # [r] long: the rows of this forward whose query is kept
    record_dst: torch.Tensor | None = None  # [r] long: where they go in the buffer


def flash_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, kwargs=None):
    """FlashAttention-2 over packed sequences: q [Lq, H, D], k/v [Lk, Hkv, D], bounds cu_q/cu_k (int32)
    -> (out [Lq, H, D], log-sum-exp)."""
    kwargs = kwargs or {}
    out = torch.ops.aten._flash_attention_forward(
        q, k, v, cu_q, cu_k, max_q, max_k, 0.0, causal, False, scale=scale, **kwargs
    )
    return out[0], out[1]


def _lse_rows(lse: torch.Tensor, n_seq: int, q_len: int, heads: int) -> torch.Tensor:
    """Flash varlen log-sum-exp ([H, total_q], or [n_seq, H, max_q] in older layouts) -> [n_seq, q, H]."""
    if lse.dim() == 2:
        return lse.view(heads, n_seq, q_len).permute(1, 2, 0)
    return lse[:, :, :q_len].permute(0, 2, 1)


def _chunk_mask(start: int, end: int, device=None) -> torch.Tensor:
    """bool [1, 1, end - start, end] (True = attend): rows for tokens [start, end) of a causal
    sequence, over keys [0, end) (causal aligned to the bottom right)."""
    rows = torch.arange(start, end, device=device)
    return (torch.arange(end, device=device)[None, :] <= rows[:, None])[None, None]


def block_mask(prefix_len: int, lengths: Sequence[int], device=None) -> torch.Tensor:
    """bool [N, P + N] (True = attend) for tails of `lengths` packed after a P-token prefix: a row of
    tail i sees every prefix key and tail i's keys up to itself."""
    lengths = torch.tensor(list(lengths), device=device)
    total = int(lengths.sum())
    tail = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths)
    first = (torch.cumsum(lengths, 0) - lengths)[tail]  # each row's tail start, in packed order
    keys = torch.arange(total, device=device)
    own = (keys[None, :] >= first[:, None]) & (keys[None, :] <= keys[:, None])
    return torch.cat([torch.ones(total, prefix_len, dtype=torch.bool, device=device), own], dim=1)


def _lse_packed(lse: torch.Tensor, tails: tuple[int, ...], heads: int) -> torch.Tensor:
    """Log-sum-exp of packed sequences of lengths `tails` -> [1, sum(tails), H], rows in packed order."""
    if lse.dim() == 2:
        return lse.view(heads, 1, sum(tails)).permute(1, 2, 0)
    return torch.cat([lse[i, :, :n] for i, n in enumerate(tails)], dim=1).T[None]


def _split_flash(q, k, v, ctx: _AttnContext, scale):
    """q [q, H, D] over prefix chunks (non-causal) + new keys (causal), merged by log-sum-exp -> [q, H, D]."""
    q_len, heads, dim = q.shape
    s = ctx.splits
    o_pre, lse_pre = flash_varlen(
        q.repeat(s, 1, 1),
        k,
        v,
        ctx.cu_q_pre,
        ctx.cu_k_pre,
        q_len,
        ctx.max_k_pre,
        False,
        scale,
        ctx.flash_kwargs,
    )
    if ctx.tails:  # independent tails: each sequence causal over its own keys
        max_new = max(ctx.tails)
        o_new, lse_new = flash_varlen(
            q, k, v, ctx.cu_q, ctx.cu_k, max_new, max_new, True, scale, ctx.flash_kwargs
        )
        lse_new = _lse_packed(lse_new, ctx.tails, heads)
    else:
        o_new, lse_new = flash_varlen(
            q, k, v, ctx.cu_q, ctx.cu_k, q_len, ctx.max_k, q_len > 1, scale, ctx.flash_kwargs
        )
        lse_new = _lse_rows(lse_new, 1, q_len, heads)
    o = torch.cat([o_pre.view(s, q_len, heads, dim), o_new.view(1, q_len, heads, dim)]).float()
    lse = torch.cat([_lse_rows(lse_pre, s, q_len, heads), lse_new])
    lse = lse.masked_fill(lse == float("inf"), float("-inf"))  # FlashAttention marks empty chunks with +inf
    w = torch.exp(lse - lse.max(0, keepdim=True).values)  # [s + 1, q, H]
    out = (o * w.unsqueeze(-1)).sum(0) / w.sum(0).unsqueeze(-1)
    return out.to(q.dtype)


def _static_attention(module, query, key, value, attention_mask=None, dropout=0.0, scaling=None, **kwargs):
    """Attention over the static cache; registered with transformers' AttentionInterface as ATTN_NAME.

    query [1, H, q, D]; key/value [1, Hkv, capacity, D] (views of the static buffers). Returns [1, q, H, D].
    """
    ctx: _AttnContext = _local.ctx
    _, heads, q_len, dim = query.shape
    if ctx.record is not None and module.layer_idx in ctx.record:
        row = query[0].index_select(1, ctx.record_src).transpose(0, 1)  # [r, H, D]
        ctx.record[module.layer_idx].index_copy_(0, ctx.record_dst, row)
    kv_heads = key.shape[1]
    if ctx.flash:
        q = query[0].transpose(0, 1).contiguous()  # [q, H, D]
        k = key[0].transpose(0, 1)  # [capacity, Hkv, D], contiguous (the buffer itself)
        v = value[0].transpose(0, 1)
        if ctx.splits:
            return _split_flash(q, k, v, ctx, scaling).unsqueeze(0), None
        out, _ = flash_varlen(
            q, k, v, ctx.cu_q, ctx.cu_k, q_len, ctx.max_k, q_len > 1, scaling, ctx.flash_kwargs
        )
        return out.unsqueeze(0), None
    if ctx.key_len:  # a prefix build: keys [0, key_len) of a buffer of its own
        out = F.scaled_dot_product_attention(
            query,
            key[:, :, : ctx.key_len],
            value[:, :, : ctx.key_len],
            attn_mask=ctx.mask,
            is_causal=ctx.mask is None,
            scale=scaling,
            enable_gqa=True,
        )
        return out.transpose(1, 2), None
    groups = heads // kv_heads
    # query heads kv*groups + j share KV head kv (transformers' repeat_kv order): fold j into the rows
    q = query.reshape(1, kv_heads, groups * q_len, dim)
    out = F.scaled_dot_product_attention(q, key, value, attn_mask=ctx.mask, scale=scaling)
    return out.reshape(1, heads, q_len, dim).transpose(1, 2), None


AttentionInterface.register(ATTN_NAME, _static_attention)


class _StaticKV:
    """Duck-typed transformers Cache for the decoder layers: writes new K/V at `slots`, returns whole
    buffers."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor]):
        self.keys, self.values = keys, values
        self.slots: torch.Tensor | None = None  # [q] long, set per forward

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        k, v = self.keys[layer_idx], self.values[layer_idx]
        k.index_copy_(0, self.slots, key_states[0].transpose(0, 1))
        v.index_copy_(0, self.slots, value_states[0].transpose(0, 1))
        return k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0)


def _cache_arg(forward) -> str:
    """The name a transformers forward takes its KV cache by (renamed across transformers 5.x)."""
    params = inspect.signature(forward).parameters
    return next((n for n in ("cache", "past_key_values", "past_key_value") if n in params), "past_key_values")


def flash_available(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> bool:
    """PyTorch's FlashAttention varlen op can run here (CUDA sm80+, bf16/fp16)."""
    if device.type != "cuda" or not hasattr(torch.ops.aten, "_flash_attention_forward"):
        return False
    if dtype not in (torch.bfloat16, torch.float16):
        return False
    major, _ = torch.cuda.get_device_capability(device)
    return major >= 8


def _flash_schema_args() -> set[str]:
    try:
        return {a.name for a in torch.ops.aten._flash_attention_forward.default._schema.arguments}
    except Exception:
        return set()


class _Graph:
    """One captured forward with its static inputs/outputs."""

    def __init__(self, graph, inputs: dict, outputs: dict):
        self.graph, self.inputs, self.outputs = graph, inputs, outputs


class FastDecoder:
    """Greedy generation on a static KV cache (+ CUDA graphs on CUDA) for a Qwen2-VL text model."""

    def __init__(
        self,
        llm,
        lm_head,
        *,
        graphs: bool | None = None,
        attention: str = "auto",
        buckets: Sequence[int] = DEFAULT_BUCKETS,
        max_new_tokens: int = 1024,
        splits: int = 8,
        flash_splits: int | None = None,
        record_layers: Sequence[int] = (),
        prefill_attention: str = "auto",
        fused: str = "auto",
    ):
        self.llm, self.lm_head = llm, lm_head
        self.config = llm.config
        self.device = lm_head.weight.device
        self.dtype = lm_head.weight.dtype
        self.layers = list(llm.layers)
        self.kv_heads = self.config.num_key_value_heads
        self.heads = self.config.num_attention_heads
        self.head_dim = getattr(self.config, "head_dim", None) or self.config.hidden_size // self.heads
        if attention == "auto":
            attention = "flash" if flash_available(self.device, self.dtype) else "sdpa"
        if attention not in ("flash", "sdpa"):
            raise ValueError(f"attention must be 'auto', 'flash' or 'sdpa', got {attention!r}")
        if attention == "flash" and not flash_available(self.device, self.dtype):
            raise ValueError(
                "attention='flash' needs a CUDA sm80+ device, bf16/fp16 weights and "
                "aten._flash_attention_forward"
            )
        self.attention = attention
        if prefill_attention not in ("auto", "flash", "sdpa") or (
            prefill_attention == "flash" and attention != "flash"
        ):
            raise ValueError(
                f"prefill_attention must be 'auto', 'sdpa' or (with attention 'flash') 'flash', "
                f"got {prefill_attention!r}"
            )
        self.prefill_attention = prefill_attention
        self.graphs = (self.device.type == "cuda") if graphs is None else bool(graphs)
        if self.graphs and self.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self.buckets = tuple(sorted(set(int(b) for b in buckets)))
        self.max_new_tokens = int(max_new_tokens)
        schema = _flash_schema_args()
        self._flash_kwargs = {}
        if flash_splits is not None and "num_splits" in schema:
            self._flash_kwargs["num_splits"] = int(flash_splits)
        self._cache_kw = _cache_arg(type(self.layers[0]).forward)
        self._attn_configs = list(
            {id(layer.self_attn.config): layer.self_attn.config for layer in self.layers}.values()
        )
        self._attn_cache_kw = _cache_arg(type(self.layers[0].self_attn).forward)  # the fused loop's call
        self._graphs: dict[int, _Graph] = {}  # bucket -> prefill graph; 1 -> decode graph under key 0
        self.capacity = 0
        self._kv: _StaticKV | None = None
        # Evidence: each forward keeps the query of its token-choosing row for these layers, in
        # buffers of max_new_tokens + 1 rows (row 0: the prompt's last token; row i: answer token
        # i - 1 fed back), written inside the captured graphs at row slot - _qbase.
        self.record_layers = tuple(sorted({int(i) for i in record_layers}))
        self._queries: dict[int, torch.Tensor] = {}
        self._qbase: torch.Tensor | None = None  # [1] long: cache slot of the prompt's last token
        self.decode_replays = 0  # decode steps run by replaying the decode graph (all time)
        self._pool = None
        self._prefix_ref = None  # the prefix KV now in slots [0, P) (strong ref: identity stays unique)
        self._prefix_len = 0
        self._lock = threading.Lock()
        self.module_lock = threading.RLock()  # eager forwards of the layers: see _static_attention
        self.set_fused(fused)
        self.splits = int(splits) if attention == "flash" else 0
        self.split_check_error = None
        if self.splits:
            err = self._check_split()
            if not err < 2e-2:
                self.splits = 0  # keep the plain kernel; the benchmark reports split_check_error
            self.split_check_error = err

    # ------------------------------------------------------------------ setup

    def set_fused(self, mode: str) -> None:
        """Choose the layer loop (fused_ops.select_ops: "auto", "triton", "reference", "off"); the
        graphs captured with the other one are dropped (captured again on the next use)."""
        with self._lock:
            self.fused_ops, self.fused_reason = select_ops(mode, self.device, self.dtype, self.layers)
            if self.fused_ops is not None and self.fused_ops.name == "triton":
                self._compile_fused()
            self._graphs.clear()
            self._pool = None

    @torch.inference_mode()
    def _compile_fused(self) -> None:
        """Compile the Triton kernels now (the first call compiles: never inside a capture, nor on two
        threads at once)."""
        ops, layer = self.fused_ops, self.layers[0]
        x = torch.randn(2, self.config.hidden_size, device=self.device, dtype=self.dtype)
        w, eps = layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon
        ops.rms_norm(x, w, eps)
        ops.add_rms_norm(x, x, w, eps)
        g = torch.randn(2, layer.mlp.gate_proj.out_features, device=self.device, dtype=self.dtype)
        ops.silu_mul(g, g)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def _check_split(self) -> float:
        """Largest relative error of split-prefix attention vs the plain causal kernel on random data."""
        g = torch.Generator(device=self.device).manual_seed(0)
        worst = 0.0
        for prefix, q_len in ((1000, 1), (1000, 7), (3, 5), (0, 4)):
            n = prefix + q_len
            k = torch.randn(
                n + 64, self.kv_heads, self.head_dim, device=self.device, dtype=self.dtype, generator=g
            )
            v = torch.randn_like(k)
            q = torch.randn(
                q_len, self.heads, self.head_dim, device=self.device, dtype=self.dtype, generator=g
            )
            scale = self.head_dim**-0.5
            i32 = dict(dtype=torch.int32, device=self.device)
            ref, _ = flash_varlen(
                q,
                k,
                v,
                torch.tensor([0, q_len], **i32),
                torch.tensor([0, n], **i32),
                q_len,
                n,
                q_len > 1,
                scale,
                self._flash_kwargs,
            )
            ctx = self._split_context(
                torch.tensor([prefix], device=self.device),
                torch.tensor([n], device=self.device),
                q_len,
                k.shape[0],
            )
            got = _split_flash(q, k, v, ctx, scale)
            err = float((got.float() - ref.float()).norm() / ref.float().norm())
            worst = max(worst, err if err == err else float("inf"))
        return worst

    def _split_context(
        self, plen: torch.Tensor, kvlen: torch.Tensor, q_len: int, capacity: int, splits: int | None = None
    ) -> _AttnContext:
        """Flash context for q_len new rows after a P-token prefix (plen [1]); keys valid up to kvlen [1]."""
        s = splits or self.splits
        chunk = (plen + (s - 1)) // s
        bounds = torch.minimum(torch.arange(s + 1, device=self.device) * chunk, plen)
        return _AttnContext(
            flash=True,
            cu_q=torch.arange(0, 2 * q_len, q_len, dtype=torch.int32, device=self.device),
            cu_k=torch.cat([plen, kvlen]).to(torch.int32),
            max_k=capacity,
            flash_kwargs=self._flash_kwargs,
            splits=s,
            cu_q_pre=torch.arange(0, (s + 1) * q_len, q_len, dtype=torch.int32, device=self.device),
            cu_k_pre=bounds.to(torch.int32),
            max_k_pre=-(-capacity // s),
        )

    def reserve(self, prefix_tokens: int, max_new_tokens: int | None = None) -> None:
        """Size the cache for prefixes up to `prefix_tokens` and capture the graphs now (not on a
        question)."""
        with self._lock, torch.inference_mode():
            if max_new_tokens is not None:
                self.max_new_tokens = max(self.max_new_tokens, int(max_new_tokens))
            self._ensure_capacity(prefix_tokens + self._tail_room())
            if self.graphs:
                self._capture_all()

    def _tail_room(self) -> int:
        return max(self.buckets) + self.max_new_tokens + 1

    def _ensure_capacity(self, needed: int) -> None:
        """Room for `needed` cache slots and max_new_tokens recorded rows (reallocating drops the graphs)."""
        rows_ok = all(q.shape[0] >= self.max_new_tokens + 1 for q in self._queries.values())
        if needed <= self.capacity and rows_ok:
            return
        capacity = self.capacity
        if needed > capacity:
            capacity = -(-int(needed * (1.25 if capacity else 1.0)) // CAPACITY_ALIGN) * CAPACITY_ALIGN
        self._graphs.clear()
        self._pool = None
        self._kv = None
        self._prefix_ref, self._prefix_len = None, 0
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        shape = (capacity, self.kv_heads, self.head_dim)
        keys = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        values = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        self._kv = _StaticKV(keys, values)
        self.capacity = capacity
        rows = (self.max_new_tokens + 1, self.heads, self.head_dim)
        self._queries = {
            i: torch.zeros(rows, dtype=self.dtype, device=self.device) for i in self.record_layers
        }
        self._qbase = torch.zeros(1, dtype=torch.long, device=self.device)

    @property
    def cache_bytes(self) -> int:
        """Bytes of the static KV cache and the evidence query buffers."""
        if self._kv is None:
            return 0
        tensors = self._kv.keys + self._kv.values + list(self._queries.values())
        return sum(t.numel() * t.element_size() for t in tensors)

    # ------------------------------------------------------------------ core forward

    @contextlib.contextmanager
    def _static_attention(self):
        """Route the decoder layers' attention to the static cache while a forward runs eagerly or
        is captured. The switch is on the shared config, so module_lock keeps every other eager
        forward of these layers (VideoLM's prefix prefill on another thread) out meanwhile."""
        with self.module_lock:
            yield from self._switched_attention()

    def _switched_attention(self):
        old = [c._attn_implementation for c in self._attn_configs]
        for c in self._attn_configs:
            c._attn_implementation = ATTN_NAME
        try:
            yield
        finally:
            for c, name in zip(self._attn_configs, old, strict=True):
                c._attn_implementation = name
            _local.ctx = None

    def _forward(
        self,
        embeds: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        last: torch.Tensor | None,
        plen: torch.Tensor | None,
        kv: _StaticKV | None = None,
    ) -> torch.Tensor | None:
        """[1, q, hidden] embeds at position ids [3, 1, q] written to cache `slots` [q]
        -> logits [vocab] of row `last`.

        plen [1]: prefix length P (slots [0, P) hold the prefix; the new rows attend all of it).
        kv: another static cache than the answers' (a prefix build); last None: no logits (returns None).
        Only device ops: safe to capture. Call inside _static_attention().
        """
        q_len = embeds.shape[1]
        kv = kv or self._kv
        capacity = kv.keys[0].shape[0]
        kv.slots = slots
        if self.attention == "flash" and self.splits and plen is not None and 1 < q_len <= max(self.buckets):
            ctx = self._split_context(plen, slots[-1:] + 1, q_len, capacity)
        elif self.attention == "flash":
            zero = torch.zeros(1, dtype=torch.int32, device=self.device)
            ctx = _AttnContext(
                flash=True,
                cu_q=torch.arange(0, 2 * q_len, q_len, dtype=torch.int32, device=self.device),  # [0, q]
                cu_k=torch.cat([zero, (slots[-1:] + 1).to(torch.int32)]),
                max_k=capacity,
                flash_kwargs=self._flash_kwargs,
            )
        else:
            keys = torch.arange(capacity, device=self.device)
            mask = keys[None, :] <= slots[:, None]  # [q, capacity]
            groups = self.heads // self.kv_heads
            ctx = _AttnContext(flash=False, mask=mask.repeat(groups, 1)[None, None])
        if self._queries and last is not None:  # answers only, not prefix builds
            rows = next(iter(self._queries.values())).shape[0]
            ctx.record, ctx.record_src = self._queries, last
            ctx.record_dst = (slots.index_select(0, last) - self._qbase).clamp_(0, rows - 1)
        logits = self._run_layers(embeds, positions, ctx, kv, last)
        return None if logits is None else logits[0]

    def _run_layers(
        self,
        embeds: torch.Tensor,
        positions: torch.Tensor,
        ctx: _AttnContext,
        kv: _StaticKV,
        rows: torch.Tensor | None,
    ) -> torch.Tensor | None:
        """The decoder layers over [1, q, hidden] with attention context `ctx` (K/V written at
        kv.slots) -> logits [len(rows), vocab] of the given rows (rows None: no logits, None)."""
        _local.ctx = ctx
        hidden = embeds
        position_embeddings = self.llm.rotary_emb(hidden, positions)
        if self.fused_ops is not None:
            return self._run_fused(hidden, position_embeddings, kv, rows)
        cache_kw = {self._cache_kw: kv}
        for layer in self.layers:
            hidden = layer(
                hidden,
                attention_mask=None,
                position_ids=None,
                position_embeddings=position_embeddings,
                use_cache=True,
                **cache_kw,
            )
            if isinstance(hidden, tuple):
                hidden = hidden[0]
        if rows is None:
            return None
        hidden = self.llm.norm(hidden.index_select(1, rows))
        return self.lm_head(hidden)[0]

    def _run_fused(self, hidden, position_embeddings, kv: _StaticKV, rows) -> torch.Tensor | None:
        """_run_layers' math with fused small kernels: each residual add runs inside the next RMSNorm
        (the next layer's input norm, or the final norm on the chosen rows only), and the MLP's
        SiLU and multiply are one kernel. A prefix build (rows None) needs only the K/V the layers
        write, so the last layer's MLP and residual add are skipped."""
        ops = self.fused_ops
        attn_kw = {self._attn_cache_kw: kv}
        residual = None
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            norm = layer.input_layernorm
            if residual is None:
                x, residual = ops.rms_norm(hidden, norm.weight, norm.variance_epsilon), hidden
            else:
                x, residual = ops.add_rms_norm(hidden, residual, norm.weight, norm.variance_epsilon)
            hidden = layer.self_attn(
                hidden_states=x, attention_mask=None, position_embeddings=position_embeddings, **attn_kw
            )[0]
            if rows is None and i == last:
                return None
            norm = layer.post_attention_layernorm
            x, residual = ops.add_rms_norm(hidden, residual, norm.weight, norm.variance_epsilon)
            mlp = layer.mlp
            hidden = mlp.down_proj(ops.silu_mul(mlp.gate_proj(x), mlp.up_proj(x)))
        if rows is None:
            return None
        norm = self.llm.norm
        x, _ = ops.add_rms_norm(
            hidden.index_select(1, rows), residual.index_select(1, rows), norm.weight, norm.variance_epsilon
        )
        return self.lm_head(x)[0]

    # ------------------------------------------------------------------ graphs

    def _capture(
        self, fn: Callable[[], dict], reset: Callable[[], None] = lambda: None
    ) -> tuple[torch.cuda.CUDAGraph, dict]:
        """Capture fn into this decoder's shared graph pool (cuda_graph.capture)."""
        graph, outputs = capture(fn, self.device, self._pool, reset=reset)
        if self._pool is None:
            self._pool = graph.pool()
        return graph, outputs

    def _capture_prefill(self, bucket: int) -> _Graph:
        hidden = self.config.hidden_size
        base = self.capacity - bucket  # warm-up / capture write at the end of the cache, never into a prefix
        inputs = {
            "embeds": torch.zeros(1, bucket, hidden, dtype=self.dtype, device=self.device),
            "positions": torch.arange(bucket, device=self.device).expand(3, 1, bucket).contiguous(),
            "slots": torch.arange(base, base + bucket, device=self.device),
            "last": torch.zeros(1, dtype=torch.long, device=self.device),
            "plen": torch.full((1,), base, dtype=torch.long, device=self.device),
        }

        def fn():
            logits = self._forward(
                inputs["embeds"], inputs["positions"], inputs["slots"], inputs["last"], inputs["plen"]
            )
            return {"logits": logits, "token": logits.argmax().view(1, 1)}

        with self._static_attention():
            graph, outputs = self._capture(fn)
        return _Graph(graph, inputs, outputs)

    def _capture_decode(self) -> _Graph:
        base = self.capacity - 1
        inputs = {
            "token": torch.zeros(1, 1, dtype=torch.long, device=self.device),
            "position": torch.zeros(1, dtype=torch.long, device=self.device),
            "slot": torch.full((1,), base, dtype=torch.long, device=self.device),
            "last": torch.zeros(1, dtype=torch.long, device=self.device),
            "plen": torch.full((1,), base, dtype=torch.long, device=self.device),
        }

        def fn():
            embeds = self.llm.embed_tokens(inputs["token"])
            positions = inputs["position"].view(1, 1, 1).expand(3, 1, 1)
            logits = self._forward(embeds, positions, inputs["slot"].clone(), inputs["last"], inputs["plen"])
            inputs["token"].copy_(logits.argmax().view(1, 1))  # next step's input
            inputs["position"].add_(1)
            inputs["slot"].add_(1)
            return {"logits": logits}

        def reset():  # fn advances token/position/slot: rewind before every warm-up run and the capture
            inputs["token"].zero_()
            inputs["position"].zero_()
            inputs["slot"].fill_(base)
            inputs["plen"].fill_(base)

        with self._static_attention():
            graph, outputs = self._capture(fn, reset)
        reset()
        return _Graph(graph, inputs, outputs)

    def _capture_all(self) -> None:
        for bucket in self.buckets:
            if bucket not in self._graphs:
                self._graphs[bucket] = self._capture_prefill(bucket)
        if 0 not in self._graphs:
            self._graphs[0] = self._capture_decode()

    # ------------------------------------------------------------------ prefix

    def _load_prefix(self, prefix_kv, prefix_len: int) -> None:
        """Copy a prefix's KV (per layer (keys, values) [1, Hkv, P, D]) into slots [0, P), once per prefix."""
        if prefix_kv is self._prefix_ref and prefix_len == self._prefix_len:
            return
        self._prefix_ref, self._prefix_len = None, 0
        if len(prefix_kv) != len(self.layers):
            raise ValueError(f"prefix has {len(prefix_kv)} layers, the model {len(self.layers)}")
        for (keys, values), k_buf, v_buf in zip(prefix_kv, self._kv.keys, self._kv.values, strict=True):
            if keys.shape[2] != prefix_len:
                raise ValueError(f"prefix KV holds {keys.shape[2]} tokens, prefix_len says {prefix_len}")
            k_buf[:prefix_len].copy_(keys[0].transpose(0, 1))
            v_buf[:prefix_len].copy_(values[0].transpose(0, 1))
        self._prefix_ref, self._prefix_len = prefix_kv, prefix_len

    # ------------------------------------------------------------------ prefix prefill

    def prefill_steps(
        self, embeds: torch.Tensor, positions: torch.Tensor, chunk_tokens: int | None = None
    ) -> Generator[None, None, tuple[tuple[torch.Tensor, torch.Tensor], ...]]:
        """A memory prefix [1, P, hidden] at positions [3, 1, P] through a static cache of its own.

        Each chunk runs the decoder layers, attending causally over the chunk and all before it,
        with `prefill_attention` (see the module docstring: SDPA or FlashAttention-2 varlen), into fresh
        zeroed [P, kv_heads, head_dim] buffers (masked slots must not hold NaN garbage): the
        answers' cache is never touched and a prefix in service stays valid. A generator like
        VideoLM.prefill_steps: each next() queues one chunk; the return value is the KV as
        MemoryPrefix.kv (per layer (keys, values) [1, kv_heads, P, head_dim], views of the
        buffers). Safe beside generate() on another thread: eager forwards take module_lock.
        """
        total = int(embeds.shape[1])
        shape = (total, self.kv_heads, self.head_dim)
        with torch.inference_mode():
            kv = _StaticKV(
                [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers],
                [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers],
            )
        step = chunk_tokens or total
        for start in range(0, total, step):
            end = min(start + step, total)
            with torch.inference_mode(), self._static_attention():
                slots = torch.arange(start, end, device=self.device)
                if self._prefill_flash(start):
                    self._forward(
                        embeds[:, start:end].to(self.dtype), positions[:, :, start:end], slots, None, None, kv
                    )
                else:
                    kv.slots = slots
                    mask = None if start == 0 else _chunk_mask(start, end, self.device)
                    ctx = _AttnContext(flash=False, mask=mask, key_len=end)
                    self._run_layers(
                        embeds[:, start:end].to(self.dtype), positions[:, :, start:end], ctx, kv, None
                    )
            if end < total:
                yield
        return tuple(
            (k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0))
            for k, v in zip(kv.keys, kv.values, strict=True)
        )

    def _prefill_flash(self, start: int) -> bool:
        """A prefix-build chunk starting at token `start` runs the FlashAttention varlen kernel
        (else SDPA)."""
        if self.prefill_attention == "auto":
            return self.attention == "flash" and start > 0
        return self.prefill_attention == "flash"

    # ------------------------------------------------------------------ packed tails

    def packed_logits(
        self,
        embeds: torch.Tensor,
        positions: torch.Tensor,
        lengths: Sequence[int],
        *,
        prefix_kv,
        prefix_len: int,
        evidence: MemoryLayout | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(float32 logits [n, vocab] at the last token of each of n independent tails, block mass),
        in one forward.

        embeds [1, N, hidden] / positions [3, 1, N] hold the tails one after another (lengths sum to
        N); tail i attends the whole prefix and its own tokens (causal), never another tail, so its
        logits are those of [prefix + tail i] alone. The tails are written into the answers' slots
        after the prefix (the next answer overwrites them); the prefix is read, never written.
        FlashAttention: the N rows over the prefix chunks as one non-causal sequence per chunk, plus
        one causal varlen sequence per tail over its own keys, merged by log-sum-exp; SDPA: a block
        mask. Eager (no graph): the tails' count and lengths change from call to call.

        evidence: the layout of the memory blocks in the prefix; the query of each tail's last token
        is recorded in record_layers during this forward, and its attention mass per block (over the
        keys it saw: the prefix and its own tail) comes back as block mass [n, num_blocks] (float32,
        CPU; evidence.block_attention). None: not computed (block mass None).
        """
        lengths = tuple(int(n) for n in lengths)
        total = sum(lengths)
        if not lengths or min(lengths) < 1 or total != embeds.shape[1]:
            raise ValueError(f"tail lengths {lengths} do not split {embeds.shape[1]} packed tokens")
        if evidence is not None and not self.record_layers:
            raise ValueError("evidence needs a FastDecoder built with record_layers")
        prefix_len = int(prefix_len)
        with self._lock, torch.inference_mode():
            if prefix_len + total > self.capacity:
                self._ensure_capacity(prefix_len + max(total, self._tail_room()))
            self._load_prefix(prefix_kv, prefix_len)
            slots = torch.arange(prefix_len, prefix_len + total, device=self.device)
            ends = torch.tensor(lengths, device=self.device).cumsum(0) - 1
            with self._static_attention():
                self._kv.slots = slots
                ctx = self._packed_context(prefix_len, lengths)
                if evidence is not None:  # buffers of this call: the answers' stay untouched
                    shape = (len(lengths), self.heads, self.head_dim)
                    ctx.record = {
                        i: torch.empty(shape, dtype=self.dtype, device=self.device)
                        for i in self.record_layers
                    }
                    ctx.record_src, ctx.record_dst = ends, torch.arange(len(lengths), device=self.device)
                logits = self._run_layers(
                    embeds.to(self.device, self.dtype), positions.to(self.device), ctx, self._kv, ends
                )
            mass = None
            if evidence is not None:
                mass = block_attention(
                    [ctx.record[i] for i in self.record_layers],
                    [self._kv.keys[i] for i in self.record_layers],
                    evidence,
                    self.layers[self.record_layers[0]].self_attn.scaling,
                    visible=block_mask(prefix_len, lengths, self.device).index_select(0, ends),
                ).cpu()
            return logits.float(), mass

    def _packed_context(self, prefix_len: int, lengths: tuple[int, ...]) -> _AttnContext:
        total = sum(lengths)
        offsets = torch.tensor((0, *lengths), device=self.device).cumsum(0)
        if self.attention == "flash":
            plen = torch.tensor([prefix_len], device=self.device)
            ctx = self._split_context(plen, plen + total, total, self.capacity, splits=max(self.splits, 1))
            ctx.cu_q = offsets.to(torch.int32)
            ctx.cu_k = (offsets + prefix_len).to(torch.int32)
            ctx.tails = lengths
            return ctx
        mask = F.pad(block_mask(prefix_len, lengths, self.device), (0, self.capacity - prefix_len - total))
        groups = self.heads // self.kv_heads
        return _AttnContext(flash=False, mask=mask.repeat(groups, 1)[None, None])

    # ------------------------------------------------------------------ generation

    def generate(
        self,
        tail_embeds: torch.Tensor,
        tail_positions: torch.Tensor,
        next_position: int,
        max_new_tokens: int,
        stop_ids=(),
        *,
        prefix_kv=None,
        prefix_len: int = 0,
        on_token: Callable[[int], None] | None = None,
        force_tokens: Sequence[int] | None = None,
        collect_logits: bool = False,
        evidence: MemoryLayout | None = None,
    ) -> FastGeneration:
        """Greedy tokens after [prefix + tail].

        tail_embeds [1, T, hidden] and tail_positions [3, 1, T] are the new tokens (question tail, or
        the whole prompt when there is no prefix); next_position is the text position of the first
        generated token. prefix_kv is a MemoryPrefix.kv (per layer (keys, values) [1, Hkv, P, D]),
        read, never written. Stop tokens end generation and are not returned. on_token(token_id) is
        called for every returned token as soon as it is known; an exception raised there stops
        generation and propagates.

        force_tokens (teacher forcing, for checks): decode len(force_tokens) steps feeding
        force_tokens[i] after step i whatever was predicted; returns the predictions (token i is the
        greedy choice after force_tokens[:i]); stop tokens do not end it. collect_logits keeps each
        step's float32 logits (checks only: one device copy of the vocabulary per token).

        evidence: the layout of the memory blocks in the prefix; after the last token, the attention
        mass of the token-choosing rows on each block (evidence.block_attention over record_layers)
        is returned as block_mass. Needs record_layers.
        """
        start = time.perf_counter()
        tail_len = int(tail_embeds.shape[1])
        if tail_len < 1:
            raise ValueError("generate needs at least one new token to prefill")
        if force_tokens is not None:
            max_new_tokens = len(force_tokens)
        if max_new_tokens < 1:
            return FastGeneration([], 0.0, 0.0, tail_len, False)
        prefix_len = int(prefix_len) if prefix_kv is not None else 0
        stop = frozenset(int(s) for s in stop_ids)
        with self._lock, torch.inference_mode():
            self.max_new_tokens = max(self.max_new_tokens, int(max_new_tokens))
            bucket = next((b for b in self.buckets if b >= tail_len), None)
            needed = prefix_len + max(tail_len, bucket or 0) + self.max_new_tokens + 1
            if needed > self.capacity:
                needed = max(needed, prefix_len + self._tail_room())
            self._ensure_capacity(needed)
            if prefix_kv is not None:
                self._load_prefix(prefix_kv, prefix_len)
            else:
                self._prefix_ref, self._prefix_len = None, 0
            if self._qbase is not None:
                self._qbase.fill_(prefix_len + tail_len - 1)
            if self.graphs and bucket is not None:
                self._capture_all()
                token, logits = self._prefill_graph(bucket, tail_embeds, tail_positions, prefix_len, tail_len)
            else:
                logits = self._prefill_eager(tail_embeds, tail_positions, prefix_len)
                token = logits.argmax()
            graphed = self.graphs and bucket is not None
            kept = [logits.float().clone()] if collect_logits else None
            first = int(token)
            ttft = time.perf_counter() - start
            tokens, rows = self._decode(
                first,
                next_position,
                prefix_len,
                prefix_len + tail_len,
                max_new_tokens,
                stop,
                on_token,
                force_tokens,
                kept,
            )
            total = time.perf_counter() - start
            mass = None
            if evidence is not None:
                mass = self._block_mass(evidence, prefix_len + tail_len - 1, rows)
        if kept is not None:
            kept = kept[: len(tokens)]
        evidence_s = time.perf_counter() - start - total
        return FastGeneration(tokens, ttft, total, tail_len, graphed, kept, mass, rows, evidence_s)

    def _block_mass(self, layout: MemoryLayout, first_row: int, rows: int) -> torch.Tensor:
        """Attention mass per memory block of the recorded rows (float32, CPU)."""
        if not self.record_layers:
            raise ValueError("evidence needs a FastDecoder built with record_layers")
        queries = [self._queries[i][:rows] for i in self.record_layers]
        keys = [self._kv.keys[i] for i in self.record_layers]
        scale = self.layers[self.record_layers[0]].self_attn.scaling
        return block_attention(queries, keys, layout, scale, first_row=first_row).mean(0).cpu()

    def _prefill_graph(self, bucket, embeds, positions, prefix_len, tail_len) -> torch.Tensor:
        g = self._graphs[bucket]
        inp = g.inputs
        inp["embeds"][:, :tail_len].copy_(embeds, non_blocking=True)
        inp["embeds"][:, tail_len:].zero_()
        pos = inp["positions"]
        pos[:, :, :tail_len].copy_(positions, non_blocking=True)
        if tail_len < bucket:  # padding rows: any valid positions (their outputs are never used)
            pos[:, :, tail_len:].copy_(
                pos[:, :, tail_len - 1 : tail_len]
                + torch.arange(1, bucket - tail_len + 1, device=self.device)
            )
        inp["slots"].copy_(torch.arange(prefix_len, prefix_len + bucket, device=self.device))
        inp["last"].fill_(tail_len - 1)
        inp["plen"].fill_(prefix_len)
        g.graph.replay()
        return g.outputs["token"].view(()), g.outputs["logits"]

    def _prefill_eager(self, embeds, positions, prefix_len) -> torch.Tensor:
        tail_len = embeds.shape[1]
        slots = torch.arange(prefix_len, prefix_len + tail_len, device=self.device)
        last = torch.full((1,), tail_len - 1, dtype=torch.long, device=self.device)
        plen = torch.full((1,), prefix_len, dtype=torch.long, device=self.device)
        with self._static_attention():
            return self._forward(embeds.to(self.dtype), positions.to(self.device), slots, last, plen)

    def _decode(
        self,
        token: int,
        position: int,
        prefix_len: int,
        slot: int,
        max_new_tokens: int,
        stop: frozenset,
        on_token,
        force: Sequence[int] | None = None,
        kept: list | None = None,
    ) -> tuple[list[int], int]:
        """Greedy tokens from the first one, and the number of forward passes that chose a token
        (the prefill's, and one per decode step run)."""
        tokens: list[int] = []
        rows = 1
        g = self._graphs.get(0) if self.graphs else None
        if g is not None:
            g.inputs["token"].fill_(token)
            g.inputs["position"].fill_(position)
            g.inputs["slot"].fill_(slot)
            g.inputs["plen"].fill_(prefix_len)
        for step in range(max_new_tokens):
            if force is None and token in stop:
                break
            tokens.append(token)
            if on_token is not None:
                on_token(token)
            if step + 1 == max_new_tokens:
                break
            feed = token if force is None else int(force[step])
            if g is not None:
                if force is not None:
                    g.inputs["token"].fill_(feed)
                g.graph.replay()
                self.decode_replays += 1
                token = int(g.inputs["token"])
                logits = g.outputs["logits"]
            else:
                logits = self._decode_eager(feed, position, prefix_len, slot)
                token = int(logits.argmax())
            rows += 1
            if kept is not None:
                kept.append(logits.float().clone())
            position += 1
            slot += 1
        return tokens, rows

    def _decode_eager(self, token: int, position: int, prefix_len: int, slot: int) -> torch.Tensor:
        ids = torch.full((1, 1), token, dtype=torch.long, device=self.device)
        positions = torch.full((3, 1, 1), position, dtype=torch.long, device=self.device)
        slots = torch.full((1,), slot, dtype=torch.long, device=self.device)
        last = torch.zeros(1, dtype=torch.long, device=self.device)
        plen = torch.full((1,), prefix_len, dtype=torch.long, device=self.device)
        with self._static_attention():
            return self._forward(self.llm.embed_tokens(ids), positions, slots, last, plen)


# ---------------------------------------------------------------------- eager reference


def _layer_cache_kw(llm) -> str:
    return _cache_arg(type(llm).forward)


@torch.inference_mode()
def eager_prefill(llm, embeds: torch.Tensor, positions: torch.Tensor):
    """Eager transformers prefill (as VideoLM.prefill_memory): -> per layer (keys, values) [1, Hkv, P, D]."""
    cache = DynamicCache(config=llm.config)
    llm(inputs_embeds=embeds, position_ids=positions, use_cache=True, **{_layer_cache_kw(llm): cache})
    return tuple((layer.keys, layer.values) for layer in cache.layers)


@torch.inference_mode()
def eager_generate(
    llm,
    lm_head,
    tail_embeds,
    tail_positions,
    next_position: int,
    max_new_tokens: int,
    stop_ids=(),
    prefix_kv=None,
    *,
    force_tokens: Sequence[int] | None = None,
    on_logits: Callable[[torch.Tensor], None] | None = None,
) -> list[int]:
    """Reference greedy loop, the eager transformers path of VideoLM.answer (DynamicCache copy of the prefix).

    on_logits(logits) sees each step's float32 logits [vocab] before its token is chosen;
    force_tokens (teacher forcing, for checks) feeds force_tokens[i] after step i instead of the
    greedy token, and stop tokens do not end it.
    """
    cache = DynamicCache(config=llm.config)
    if prefix_kv is not None:
        for layer, (keys, values) in enumerate(prefix_kv):
            cache.update(keys, values, layer)
    kw = _layer_cache_kw(llm)
    device = lm_head.weight.device

    def step(embeds, positions):
        hidden = llm(
            inputs_embeds=embeds, position_ids=positions, use_cache=True, **{kw: cache}
        ).last_hidden_state
        return lm_head(hidden[0, -1]).float()

    logits = step(tail_embeds, tail_positions)
    tokens, position = [], next_position
    stop = frozenset(int(s) for s in stop_ids) if force_tokens is None else frozenset()
    for i in range(max_new_tokens):
        if on_logits is not None:
            on_logits(logits)
        token = int(logits.argmax())
        if token in stop:
            break
        tokens.append(token)
        if i + 1 < max_new_tokens:
            feed = token if force_tokens is None else int(force_tokens[i])
            ids = torch.tensor([[feed]], device=device)
            logits = step(
                llm.embed_tokens(ids), torch.full((3, 1, 1), position, dtype=torch.long, device=device)
            )
            position += 1
    return tokens
