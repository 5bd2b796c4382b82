"""VideoLM: frames -> ViT features for the memory; memory -> LLM prompt; greedy answers with a cached prefix.

The transformers 5.x Qwen2-VL / Qwen2.5-VL modules do the math (ViT blocks, merger, decoder
layers, rotary embeddings, attention); this class only decides what goes in:

    encode_frames:  frames -> pixel patches (full + 2x2-pooled low resolution) -> one ViT call
                    with the two resolutions as two sequences -> pre-merger features [B, N, C]
    prefill_memory: [head text, merger(DAM features), merger(CSM features), <|vision_end|>]
                    with the official (t, h, w) positions (positions.py) -> KV cache
    answer:         [question tail] on a copy of that cache, then greedy decoding; text
                    positions continue from the cached prefix's next position on all 3 axes.
                    On CUDA the same math runs through fast_decode.FastDecoder (static KV
                    cache + CUDA graphs); answer_uncached stays eager, the reference path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Generator, Sequence

import numpy as np
import torch
from transformers import AutoTokenizer, DynamicCache
from transformers.vision_utils import get_vision_window_index

from fvs_ros.common.steps import drain
from fvs_ros.memory import MemoryConfig

from . import budget, evidence, quant
from .budget import BudgetCheck, MemoryBudget
from .checkpoint import QWEN2_5_VL, CheckpointConfig, ModelLoadError, build_model, read_config, resolve_source
from .conditions import ConditionScorer, ConditionScores
from .evidence import BlockAttention, MemoryLayout, QueryRecorder, block_attention, memory_layout
from .fast_decode import FastDecoder
from .fast_vision import FastVision
from .positions import TRAINED_SLOTS, memory_positions, time_to_position
from .preprocess import MAX_PIXELS, MIN_PIXELS, SlotPatches, frame_size, resize_frames, slot_patches
from .prompt import DEFAULT_SYSTEM_PROMPT, ChatFormat, chat_format

DEFAULT_MAX_NEW_TOKENS = 128

TokenCallback = Callable[[str], None]


@dataclass(frozen=True)
class FrameFeatures:
    """Pre-merger ViT features of B slots, in the ViT's token order (2x2 merge windows contiguous)."""

    full: torch.Tensor  # [B, Nf, C], Nf = h * w
    low: torch.Tensor  # [B, Nl, C], Nl = h/2 * w/2
    full_hw: tuple[int, int]  # (h, w) ViT patch grid of a full-resolution slot
    low_hw: tuple[int, int]  # (h/2, w/2)


@dataclass(frozen=True)
class MemoryPrefix:
    """KV cache of [system prompt + <|vision_start|> + memory + <|vision_end|>]; never mutated."""

    kv: tuple[tuple[torch.Tensor, torch.Tensor], ...]  # per layer (keys, values): [1, kv_heads, P, head_dim]
    num_tokens: int  # P
    next_position: int  # position id of the first token after <|vision_end|>
    snapshot_version: int
    frames_seen: int
    layout: MemoryLayout | None = None  # where each memory block's tokens lie (evidence)


@dataclass(frozen=True)
class PromptInputs:
    """A whole prompt as LLM input."""

    embeds: torch.Tensor  # [1, L, hidden]
    position_ids: torch.Tensor  # [3, 1, L] (t, h, w)
    next_position: int  # position id of the first generated token
    layout: MemoryLayout | None = None  # where each memory block's tokens lie (evidence)


@dataclass(frozen=True)
class Generation:
    text: str
    token_ids: list[int]
    ttft_s: float  # call -> first token known (includes the question prefill)
    total_s: float
    prompt_tokens: int  # tokens prefilled by this call
    attention: BlockAttention | None = None  # evidence=True: the answer's attention per memory block


class VideoLM:
    """A Qwen2-VL-family checkpoint driven for Flash Memory streaming. Build it with load_model()."""

    def __init__(
        self,
        model,
        tokenizer,
        chat: ChatFormat,
        checkpoint: CheckpointConfig,
        ckpt_dir: Path,
        min_pixels: int,
        max_pixels: int,
        fast_decode: bool = False,
        fast_vision: bool = False,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.chat = chat
        self.model_type = checkpoint.model_type
        self._memory_defaults = dict(checkpoint.memory_defaults)
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self.trained_slots = TRAINED_SLOTS
        self.visual = model.model.visual
        self.llm = model.model.language_model
        self.lm_head = model.lm_head
        self.device = self.lm_head.weight.device
        self.dtype = self.lm_head.weight.dtype
        # 8-bit linear layers (quant.py): "bf16" when there are none
        self.weights = next((m.mode for m in model.modules() if isinstance(m, quant.QuantLinear)), "bf16")
        self.quantize_s = 0.0  # load_model: seconds spent quantizing while reading the checkpoint
        self.budget: MemoryBudget | None = None  # load_model(budget=): the estimate checked at load
        vision = model.config.vision_config
        self.feature_dim = vision.hidden_size if self.model_type == QWEN2_5_VL else vision.embed_dim
        self.vision_end_id = model.config.vision_end_token_id
        self.stop_ids = stop_token_ids(model.config, tokenizer, ckpt_dir)
        self._tokenizer_lock = threading.Lock()  # HF fast tokenizers are not safe to share across threads
        self.merge = model.config.vision_config.spatial_merge_size
        # Evidence: the layers whose attention answers report (evidence.py); eager forwards record
        # their queries through the recording SDPA function, the FastDecoder in its graphs.
        self.evidence_layers = evidence.evidence_layers(len(self.llm.layers))
        evidence.install(self.llm)
        # Static-cache / CUDA-graph decoding for answer(); None = the eager loop below.
        self.fast = (
            FastDecoder(self.llm, self.lm_head, record_layers=self.evidence_layers) if fast_decode else None
        )
        self.static_prefill = True  # prefix prefills through self.fast (False: eager, the reference)
        # transformers 5.17 names the LLM's cache argument past_key_values, later 5.x cache
        self._cache_kw = (
            "cache" if "cache" in inspect.signature(type(self.llm).forward).parameters else "past_key_values"
        )
        # Eager LLM forwards that may run beside a FastDecoder answer on another thread take this
        # lock: the FastDecoder switches the layers' attention while it runs eagerly or captures.
        self._llm_lock = self.fast.module_lock if self.fast is not None else contextlib.nullcontext()
        # Packed-attention / CUDA-graph ViT for streamed frames (Qwen2-VL); None = transformers' forward.
        self.fast_vision = FastVision(self.visual) if fast_vision and self.model_type != QWEN2_5_VL else None
        self._conditions: ConditionScorer | None = None  # built on first use (yes/no token ids)

    @property
    def memory_defaults(self) -> dict:
        """MemoryConfig keyword arguments from the checkpoint (csm_slots, dam_frames)."""
        return dict(self._memory_defaults)

    # ------------------------------------------------------------------ frames -> features

    def frame_size(self, height: int, width: int) -> tuple[int, int]:
        """Resize target (H, W) of a height x width frame: multiples of 56 within the pixel budget."""
        return frame_size(height, width, self.min_pixels, self.max_pixels)

    @torch.inference_mode()
    def encode_frames(self, frames: np.ndarray, frames_per_slot: int = 1) -> FrameFeatures:
        """[B, H, W, 3] uint8 RGB -> features of B / frames_per_slot slots.

        frames_per_slot=2 pairs consecutive frames in one temporal patch, as the checkpoint was
        trained (offline and the engine's default); 1 puts each frame in both halves. Frames not
        at frame_size(H, W) are resized (PIL bicubic, as the official processor).
        """
        frames = np.asarray(frames)
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or not len(frames):
            raise ValueError(f"expected [B, H, W, 3] uint8 frames, got {frames.dtype} {frames.shape}")
        frames = torch.from_numpy(resize_frames(frames, self.frame_size(*frames.shape[1:3]))).to(self.device)
        if self.fast_vision is not None:
            return FrameFeatures(*self.fast_vision.encode(frames, frames_per_slot))
        return self.vit(slot_patches(frames, frames_per_slot))

    @torch.inference_mode()
    def vit(self, patches: SlotPatches) -> FrameFeatures:
        """Both resolutions through the ViT in one call (two sequences); features before the merger."""
        (h, w), (hl, wl) = patches.full_hw, patches.low_hw
        slots = patches.full.shape[0] // (h * w)
        grid = torch.tensor([[slots, h, w], [slots, hl, wl]], device=self.device)
        pixels = torch.cat([patches.full, patches.low]).to(self.device, self.dtype)
        hidden = self.visual(pixels, grid_thw=grid).last_hidden_state  # [S * (Nf + Nl), C]
        if self.model_type == QWEN2_5_VL:
            hidden = self._undo_window_order(hidden, grid)
        full, low = hidden.split([slots * h * w, slots * hl * wl])
        return FrameFeatures(full.view(slots, h * w, -1), low.view(slots, hl * wl, -1), (h, w), (hl, wl))

    def _undo_window_order(self, hidden: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        """Qwen2.5-VL returns pre-merger tokens grouped by attention window; restore the Qwen2-VL order."""
        cfg = self.visual.config
        window_index, _ = get_vision_window_index(
            grid, cfg.spatial_merge_size, cfg.window_size, cfg.patch_size
        )
        unit = cfg.spatial_merge_size**2
        order = torch.argsort(window_index.to(hidden.device))
        return hidden.view(-1, unit, hidden.shape[-1])[order].view(-1, hidden.shape[-1])

    # ------------------------------------------------------------------ memory -> LLM input

    @torch.inference_mode()
    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Merger (projector): [n, N, C] pre-merger features -> [n * N / 4, hidden] LLM tokens, row-major."""
        x = features.reshape(-1, features.shape[-1]).to(self.device, self.dtype)
        return self.visual.merger(x)

    @torch.inference_mode()
    def memory_inputs(self, snapshot, start: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Memory tokens at positions from `start`: (embeds [M, hidden], position ids [3, M], <|vision_end|>
        position)."""
        if getattr(snapshot, "full_hw", None) is None:
            raise ValueError(
                "memory snapshot without full_hw (the slots' ViT patch grid, docs/architecture.md)"
            )
        h, w = snapshot.full_hw
        dam_t = time_to_position(snapshot.dam_slots, snapshot.frames_seen, self.trained_slots)
        csm_t = time_to_position(snapshot.csm_times, snapshot.frames_seen, self.trained_slots)
        positions, end = memory_positions(start, dam_t.cpu(), csm_t.cpu(), (h // 2, w // 2))
        embeds = torch.cat([self.project(snapshot.dam_features), self.project(snapshot.csm_features)])
        return embeds, positions.to(self.device), end

    def context_budget(self, system_prompt: str, csm_slots: int, dam_frames: int) -> tuple[int, int]:
        """(prompt tokens before the question with a full memory of the largest frames the pixel
        budget allows, the LLM's context length): what a configuration can be checked against."""
        vision = self.model.config.vision_config
        full = self.max_pixels // (vision.patch_size * vision.spatial_merge_size) ** 2  # per DAM frame
        head = len(self._tokenize(self.chat.head(system_prompt))) + 1  # + <|vision_end|>
        text = getattr(self.model.config, "text_config", None) or self.model.config
        return head + dam_frames * full + csm_slots * (full // 4), int(text.max_position_embeddings)

    @torch.inference_mode()
    def prompt_inputs(
        self, snapshot, question: str, system_prompt: str = DEFAULT_SYSTEM_PROMPT, answer_prefix: str = ""
    ) -> PromptInputs:
        """The whole prompt [head + memory + <|vision_end|> + question tail] as one LLM input."""
        head, head_pos, next_position = self._head_inputs(snapshot, system_prompt)
        tail, tail_pos = self._tail_inputs(question, answer_prefix, next_position)
        return PromptInputs(
            torch.cat([head, tail], dim=1),
            torch.cat([head_pos, tail_pos], dim=2),
            next_position + tail.shape[1],
            memory_layout(snapshot, head.shape[1] - 1, self.merge),
        )

    def _head_inputs(self, snapshot, system_prompt: str) -> tuple[torch.Tensor, torch.Tensor, int]:
        ids = self._tokenize(self.chat.head(system_prompt))
        memory, memory_pos, end = self.memory_inputs(snapshot, len(ids))
        embeds = torch.cat([self._embed(ids), memory, self._embed([self.vision_end_id])])
        positions = torch.cat(
            [self._text_positions(0, len(ids)), memory_pos, self._text_positions(end, 1)], dim=1
        )
        return embeds[None], positions[:, None], end + 1

    def _tail_inputs(
        self, question: str, answer_prefix: str, start: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ids = (
            self._tokenize(self.chat.before_question)
            + self._tokenize(question, split_special_tokens=True)  # a question cannot inject control tokens
            + self._tokenize(self.chat.after_question + answer_prefix)
        )
        return self._embed(ids)[None], self._text_positions(start, len(ids))[:, None]

    def _text_positions(self, start: int, n: int) -> torch.Tensor:
        """Text tokens advance all three axes together: [3, n]."""
        return torch.arange(start, start + n, device=self.device).expand(3, n)

    def _embed(self, ids: list[int]) -> torch.Tensor:
        return self.llm.embed_tokens(torch.tensor(ids, dtype=torch.long, device=self.device))

    def _tokenize(self, text: str, split_special_tokens: bool = False) -> list[int]:
        if not text:
            return []
        with self._tokenizer_lock:
            return self.tokenizer(
                text, add_special_tokens=False, split_special_tokens=split_special_tokens
            ).input_ids

    def warm_up(
        self,
        csm_slots: int,
        dam_frames: int,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        frame_hw: tuple[int, int] = (720, 1280),
        frames_per_slot: int = 1,
    ) -> None:
        """Pay start-up costs before the first frame and question: one ViT pass on a blank slot
        (kernel selection, allocator); with FastVision, its graphs for slots of that size and layout
        captured; with FastDecoder, its cache sized for a full memory of such frames and its CUDA
        graphs captured (otherwise the first answer pays ~1 s on a 7B)."""
        feats = self.encode_frames(np.zeros((frames_per_slot, *frame_hw, 3), np.uint8), frames_per_slot)
        if self.fast_vision is not None:
            self.fast_vision.prepare(*self.frame_size(*frame_hw), frames_per_slot)
        if self.fast is not None:
            (h, w), merge = feats.full_hw, self.model.config.vision_config.spatial_merge_size
            memory_tokens = dam_frames * h * w // merge**2 + csm_slots * feats.low.shape[1] // merge**2
            self.fast.reserve(memory_tokens + 64, max_new_tokens)

    # ------------------------------------------------------------------ generation

    def prefill_memory(self, snapshot, system_prompt: str = DEFAULT_SYSTEM_PROMPT) -> MemoryPrefix:
        """Run the LLM once over [system prompt + <|vision_start|> + memory + <|vision_end|>]."""
        return drain(self.prefill_steps(snapshot, system_prompt))

    def prefill_steps(
        self, snapshot, system_prompt: str = DEFAULT_SYSTEM_PROMPT, chunk_tokens: int | None = None
    ) -> Generator[None, None, MemoryPrefix]:
        """prefill_memory in chunks of `chunk_tokens` prompt tokens (None: one pass), pausing between them.

        A generator: each next() queues one more chunk and returns (the GPU may still be running
        it); the MemoryPrefix is the StopIteration value. The KV equals one pass up to float
        rounding. The engine answers questions between chunks from its previous prefix, so a
        question waits for at most one chunk of a rebuild instead of the whole ~0.3 s (7B, H100).

        With a FastDecoder and static_prefill (the default) the chunks run through its static
        cache and attention (FlashAttention varlen on CUDA, no mask); otherwise through the eager
        transformers forward (SDPA with a mask, DynamicCache), the reference path.
        """
        with torch.inference_mode():
            embeds, positions, next_position = self._head_inputs(snapshot, system_prompt)
        layout = memory_layout(snapshot, embeds.shape[1] - 1, self.merge)  # memory ends before <|vision_end|>
        kv = yield from self.prefill_embeds(embeds, positions, chunk_tokens)
        return MemoryPrefix(
            kv, embeds.shape[1], next_position, int(snapshot.version), int(snapshot.frames_seen), layout
        )

    def prefill_embeds(
        self, embeds: torch.Tensor, positions: torch.Tensor, chunk_tokens: int | None = None
    ) -> Generator[None, None, tuple[tuple[torch.Tensor, torch.Tensor], ...]]:
        """The KV (MemoryPrefix.kv) of a prompt head [1, P, hidden] at positions [3, 1, P], in chunks as
        prefill_steps: through the FastDecoder's static cache, or the eager forward (the reference)."""
        if self.fast is not None and self.static_prefill:
            return (yield from self.fast.prefill_steps(embeds, positions, chunk_tokens))
        total = embeds.shape[1]
        cache, step = self._new_cache(), chunk_tokens or total
        for start in range(0, total, step):
            with torch.inference_mode(), self._llm_lock:
                self.llm(
                    inputs_embeds=embeds[:, start : start + step],
                    position_ids=positions[:, :, start : start + step],
                    **{self._cache_kw: cache},
                    use_cache=True,
                )
            if start + step < total:
                yield
        return tuple((layer.keys, layer.values) for layer in cache.layers)

    @torch.inference_mode()
    def answer(
        self,
        prefix: MemoryPrefix,
        question: str,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        on_token: TokenCallback | None = None,
        answer_prefix: str = "",
        evidence: bool = False,
    ) -> Generation:
        """Greedy answer from a cached prefix: prefill only the question tail on a copy of the cache.

        evidence: also measure the answer's attention to each memory block (Generation.attention;
        evidence.py), computed after the last token."""
        start = time.perf_counter()
        layout = prefix.layout if evidence else None
        if self.fast is not None:
            return self._answer_fast(prefix, question, max_new_tokens, on_token, answer_prefix, start, layout)
        cache = self._new_cache()
        for layer, (keys, values) in enumerate(prefix.kv):
            cache.update(keys, values, layer)  # concatenation copies: the prefix stays untouched
        embeds, positions = self._tail_inputs(question, answer_prefix, prefix.next_position)
        with self._recording(layout) as recorder:
            logits = self._step(embeds, positions, cache)
            next_position = prefix.next_position + embeds.shape[1]
            gen = self._decode(cache, logits, next_position, max_new_tokens, on_token, start, embeds.shape[1])
        return self._with_attention(gen, recorder, cache, prefix.num_tokens + embeds.shape[1] - 1, layout)

    def _answer_fast(
        self,
        prefix: MemoryPrefix,
        question: str,
        max_new_tokens: int,
        on_token: TokenCallback | None,
        answer_prefix: str,
        start: float,
        layout: MemoryLayout | None,
    ) -> Generation:
        """answer() through the FastDecoder: the prefix KV is read into its static cache, never written."""
        embeds, positions = self._tail_inputs(question, answer_prefix, prefix.next_position)
        tokens, sent = [], [""]

        def stream(token: int) -> None:
            tokens.append(token)
            sent[0] = self._stream_text(tokens, sent[0], on_token)

        generate_start = time.perf_counter()
        out = self.fast.generate(
            embeds,
            positions,
            prefix.next_position + embeds.shape[1],
            max_new_tokens,
            self.stop_ids,
            prefix_kv=prefix.kv,
            prefix_len=prefix.num_tokens,
            on_token=stream,
            evidence=layout,
        )
        final = self._detokenize(out.tokens)
        if on_token is not None and len(final) > len(sent[0]):
            on_token(final[len(sent[0]) :])
        ttft = generate_start - start + out.ttft_s
        attention = None
        if out.block_mass is not None:  # (none when nothing was generated)
            attention = BlockAttention(out.block_mass, layout, self.evidence_layers, out.rows, out.evidence_s)
        total = time.perf_counter() - start - out.evidence_s  # call -> answer done (evidence apart)
        return Generation(final, out.tokens, ttft, total, embeds.shape[1], attention)

    def score_conditions(
        self, prefix: MemoryPrefix, conditions: Sequence[str], evidence: bool = False
    ) -> ConditionScores:
        """P(yes) of each condition on the memory of `prefix`, all in one packed prefill
        (conditions.py documents the prompt and the yes/no tokens); evidence: also each condition's
        attention per memory block, from that same forward (ConditionScores.attention)."""
        if self._conditions is None:
            self._conditions = ConditionScorer(self)
        return self._conditions.scores(prefix, conditions, evidence)

    @torch.inference_mode()
    def answer_uncached(
        self,
        snapshot,
        question: str,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        system_prompt: str = DEFAULT_SYSTEM_PROMPT,
        on_token: TokenCallback | None = None,
        answer_prefix: str = "",
        evidence: bool = False,
    ) -> Generation:
        """The same answer as prefill_memory + answer, from one full prefill (reference path)."""
        start = time.perf_counter()
        inputs = self.prompt_inputs(snapshot, question, system_prompt, answer_prefix)
        layout = inputs.layout if evidence else None
        cache = self._new_cache()
        prompt_tokens = inputs.embeds.shape[1]
        with self._recording(layout) as recorder:
            logits = self._step(inputs.embeds, inputs.position_ids, cache)
            gen = self._decode(
                cache, logits, inputs.next_position, max_new_tokens, on_token, start, prompt_tokens
            )
        return self._with_attention(gen, recorder, cache, prompt_tokens - 1, layout)

    def _recording(self, layout: MemoryLayout | None):
        """Records the eager forwards' queries on this thread while evidence is wanted."""
        if layout is None:
            return contextlib.nullcontext()
        return QueryRecorder(self.evidence_layers).recording()

    def _with_attention(
        self,
        gen: Generation,
        recorder: QueryRecorder | None,
        cache: DynamicCache,
        first_row: int,
        layout: MemoryLayout | None,
    ) -> Generation:
        """gen with its attention per memory block, from the recorded queries and the cached keys."""
        if recorder is None:
            return gen
        t0 = time.perf_counter()
        queries = recorder.queries()
        keys = [cache.layers[i].keys[0].transpose(0, 1) for i in self.evidence_layers]
        scale = self.llm.layers[self.evidence_layers[0]].self_attn.scaling
        mass = block_attention(queries, keys, layout, scale, first_row=first_row).mean(0).cpu()
        rows = queries[0].shape[0]
        attention = BlockAttention(mass, layout, self.evidence_layers, rows, time.perf_counter() - t0)
        return dataclasses.replace(gen, attention=attention)

    @torch.inference_mode()
    def logits(self, inputs: PromptInputs) -> torch.Tensor:
        """Float32 logits [L, vocab] of every prompt position (teacher forcing; for tests and evaluation)."""
        hidden = self.llm(inputs_embeds=inputs.embeds, position_ids=inputs.position_ids).last_hidden_state
        return self.lm_head(hidden[0]).float()

    def _new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.llm.config)

    def _step(self, embeds: torch.Tensor, positions: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
        """Run [1, L] new tokens through the LLM on `cache` (extended in place); float32 logits [vocab] of
        the last."""
        with self._llm_lock:
            hidden = self.llm(
                inputs_embeds=embeds, position_ids=positions, use_cache=True, **{self._cache_kw: cache}
            ).last_hidden_state
        return self.lm_head(hidden[0, -1]).float()

    def _decode(
        self,
        cache: DynamicCache,
        logits: torch.Tensor,
        position: int,
        max_new_tokens: int,
        on_token: TokenCallback | None,
        start: float,
        prompt_tokens: int,
    ) -> Generation:
        """Greedy decoding until a stop token or max_new_tokens; each new token takes the next text
        position."""
        tokens, text, ttft = [], "", None
        for step in range(max_new_tokens):
            token = int(logits.argmax())
            ttft = ttft if ttft is not None else time.perf_counter() - start
            if token in self.stop_ids:
                break
            tokens.append(token)
            text = self._stream_text(tokens, text, on_token)
            if step + 1 < max_new_tokens:
                logits = self._step(
                    self._embed([token])[None], self._text_positions(position, 1)[:, None], cache
                )
                position += 1
        total = time.perf_counter() - start
        final = self._detokenize(tokens)
        if on_token is not None and len(final) > len(text):
            on_token(final[len(text) :])
        return Generation(final, tokens, total if ttft is None else ttft, total, prompt_tokens)

    def _stream_text(self, tokens: list[int], sent: str, on_token: TokenCallback | None) -> str:
        """Send the newly decoded text; hold it back while it ends in an incomplete UTF-8 sequence."""
        text = self._detokenize(tokens)
        if on_token is None or text.endswith("\ufffd") or len(text) <= len(sent):
            return sent
        on_token(text[len(sent) :])
        return text

    def _detokenize(self, tokens: list[int]) -> str:
        with self._tokenizer_lock:
            return self.tokenizer.decode(tokens, skip_special_tokens=True)


def stop_token_ids(config, tokenizer, ckpt_dir: Path) -> frozenset[int]:
    """<|im_end|>, <|endoftext|> and every eos id of the config and generation_config.json."""
    ids = set(tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"]))
    sources = [config.get_text_config().eos_token_id]
    generation_config = ckpt_dir / "generation_config.json"
    if generation_config.is_file():
        sources.append(json.loads(generation_config.read_text()).get("eos_token_id"))
    for eos in sources:
        ids.update(eos if isinstance(eos, list) else [eos])
    ids.discard(None)
    ids.discard(tokenizer.unk_token_id)
    return frozenset(ids)


DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")


def resolve_device_dtype(
    device: str | torch.device = "auto", dtype: str | torch.dtype = "auto"
) -> tuple[torch.device, torch.dtype]:
    """'auto' device: CUDA when available, else CPU; 'auto' dtype: bfloat16 on CUDA, float32 on CPU.

    Also takes devices and dtypes by name ('cuda:1', 'float16'); raises ModelLoadError for others
    and for a CUDA device this machine does not have (naming the devices it has).
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ModelLoadError(f"unknown device {device!r}: {err}") from None
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        why = "this torch was built without CUDA" if torch.version.cuda is None else "no such CUDA device"
        available = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        raise ModelLoadError(
            f"device {str(device)!r} is not available ({why}); available: {', '.join(available)}"
        )
    if dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    elif isinstance(dtype, str):
        if dtype not in DTYPE_NAMES:
            raise ModelLoadError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPE_NAMES)}")
        dtype = getattr(torch, dtype)
    return device, dtype


def load_model(
    source: str | Path,
    dtype: str | torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    *,
    min_pixels: int = MIN_PIXELS,
    max_pixels: int = MAX_PIXELS,
    fast_decode: bool | None = None,
    fast_vision: bool | None = None,
    weights: str = "bf16",
    budget: BudgetCheck | None = None,
) -> VideoLM:
    """Load a Flash-VStream-Qwen2-VL, Qwen2-VL or Qwen2.5-VL checkpoint (hub id or local directory).

    device and dtype: objects, names or 'auto' (resolve_device_dtype).
    weights: "bf16" (the checkpoint's numerics, in `dtype`), "fp8" or "int8": the LLM's linear
    layers quantized while the checkpoint is read (quant.py); lm.quantize_s says how long that took.
    budget: before any weight is read, estimate the device memory of that configuration
    (budget.py), print it to budget.log, and refuse with BudgetExceeded (a ModelLoadError) when it
    does not fit;
    lm.budget keeps the estimate.
    fast_decode: answer() through FastDecoder (static KV cache, CUDA graphs); None = on CUDA only.
    fast_vision: streamed frames through FastVision (packed attention, CUDA graphs); None = on CUDA only.

    Raises ModelLoadError (one-line message) for a missing source, an unsupported config, weights
    that do not match the config, or weights that do not fit the device.
    """
    if "cache" not in inspect.signature(_text_model_forward()).parameters:
        raise ModelLoadError(
            "this transformers version is too old: fvs_ros.model needs the 5.x `cache=` LLM API"
        )
    device, dtype = resolve_device_dtype(device, dtype)
    try:
        quant.check_mode(weights, device, dtype)
    except quant.QuantizationUnsupported as err:
        raise ModelLoadError(str(err)) from None
    ckpt_dir = resolve_source(source)
    checkpoint = read_config(ckpt_dir)
    estimate = None
    if budget is not None:
        estimate = check_budget(ckpt_dir, checkpoint, device, dtype, weights, max_pixels, budget)
    try:
        tokenizer = AutoTokenizer.from_pretrained(ckpt_dir, config=checkpoint.hf_config)
    except Exception as err:
        raise ModelLoadError(f"{ckpt_dir}: cannot load the tokenizer: {type(err).__name__}: {err}") from None
    try:
        chat = chat_format(ckpt_dir, tokenizer)
    except Exception as err:  # template syntax or layout: either way the prompt cannot be built
        raise ModelLoadError(f"{ckpt_dir}: unusable chat template: {err}") from None
    model, quantize_s = build_model(checkpoint, ckpt_dir, dtype, device, weights)
    on_cuda = device.type == "cuda"
    fast_decode = on_cuda if fast_decode is None else fast_decode
    fast_vision = on_cuda if fast_vision is None else fast_vision
    lm = VideoLM(
        model, tokenizer, chat, checkpoint, ckpt_dir, min_pixels, max_pixels, fast_decode, fast_vision
    )
    lm.quantize_s, lm.budget = quantize_s, estimate
    if budget is not None and budget.log is not None and weights != "bf16":
        budget.log(
            f"weights {weights}: {quant.quantized_layers(model)} linear layers quantized in "
            f"{quantize_s:.2f} s"
        )
    return lm


def check_budget(
    ckpt_dir: Path,
    checkpoint: CheckpointConfig,
    device: torch.device,
    dtype: torch.dtype,
    weights: str,
    max_pixels: int,
    request: BudgetCheck,
) -> MemoryBudget:
    """The configuration's memory budget, printed to request.log; ModelLoadError when it does not fit."""
    memory = request.memory
    if not isinstance(memory, MemoryConfig):
        memory = MemoryConfig(**{**checkpoint.memory_defaults, **dict(memory or {})})
    try:
        estimate = budget.estimate(
            budget.checkpoint_shapes(ckpt_dir),
            checkpoint,
            dtype,
            weights,
            memory,
            max_pixels=max_pixels,
            max_new_tokens=request.max_new_tokens,
            system_prompt=request.system_prompt,
            chunk_tokens=request.chunk_tokens,
            vit_batch=request.vit_batch,
            fast_decode=device.type == "cuda",
        )
    except ValueError as err:  # an unbounded bank has no size
        raise ModelLoadError(f"memory budget: {err}") from None
    log = request.log or (lambda line: None)
    log(f"memory budget on {device}: {estimate.describe()}")
    log(f"checked against {budget.check(estimate, device, request.max_gib)}: fits")
    return estimate


def _text_model_forward():
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLTextModel

    return Qwen2VLTextModel.forward
