"""Yes/no probabilities of standing conditions on a cached memory prefix, many in one prefill.

A condition ("a person is at the door") becomes the user turn after the memory, in the
checkpoint's chat template (prompt.py), with the exact question text

    "<condition>? Answer yes or no."

(the condition stripped of surrounding spaces and trailing '?'), so the whole prompt is

    <|im_start|>system\\n{system prompt}<|im_end|>\\n<|im_start|>user\\n<|vision_start|>{memory}
    <|vision_end|>{condition}? Answer yes or no.<|im_end|>\\n<|im_start|>assistant\\n

(one string, wrapped here; Qwen2-VL's template: the text around the condition is the checkpoint's own)

and no token is decoded: the logits of the last prompt token give the assistant's first token.
P(yes) = sum of exp(logit) over the yes tokens / that sum over the yes and no tokens, i.e.
sigmoid(logsumexp(yes logits) - logsumexp(no logits)): the rest of the vocabulary does not count.

Yes and no tokens (yes_no_tokens): the first token of each of "yes", "Yes", "YES", " yes",
" Yes", " YES" (and the same for no) as the tokenizer encodes the word alone, which is how the
assistant's first token would start that answer. A token that starts both a yes and a no word
(e.g. a bare space, or a tokenizer that spells words letter by letter starting alike) or that
decodes to blank text is dropped. Qwen2's tokenizer has single tokens for every variant; the
tiny test tokenizer spells them letter by letter, so its yes tokens are "y"/"Y" and no tokens
"n"/"N".

Several conditions share one forward on top of the prefix: their prompts are packed into one
sequence and each attends the prefix and its own tokens only (FastDecoder.packed_logits on CUDA:
FlashAttention varlen over the shared static prefix cache; eager transformers with a block mask
otherwise), so each probability equals that of the condition's prompt alone.

Evidence (scores(evidence=True)): the same forward records the query of each prompt's last token
in the evidence layers, and each condition gets its attention per memory block exactly as an
answer's first token would (evidence.py; one row, over the keys that row saw: the prefix and its
own prompt). Both paths record it: FastDecoder (SDPA or FlashAttention; on CUDA the packed forward
runs eagerly, outside any graph) and the eager transformers forward (recording SDPA).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Sequence

import torch
from transformers import DynamicCache

from .evidence import BlockAttention, MemoryLayout, QueryRecorder, block_attention
from .fast_decode import _layer_cache_kw, block_mask

QUESTION_SUFFIX = "? Answer yes or no."
_YES = ("yes", "Yes", "YES", " yes", " Yes", " YES")
_NO = ("no", "No", "NO", " no", " No", " NO")


def condition_question(condition: str) -> str:
    """The user text asked for a condition: '<condition>? Answer yes or no.'"""
    text = condition.strip().rstrip("?").rstrip()
    if not text:
        raise ValueError("condition is empty")
    return text + QUESTION_SUFFIX


@dataclass(frozen=True)
class YesNoTokens:
    yes: tuple[int, ...]
    no: tuple[int, ...]


def yes_no_tokens(tokenizer) -> YesNoTokens:
    """The token ids that begin a yes / a no answer (module docstring). Raises ValueError if the
    tokenizer leaves either side empty."""

    def first_tokens(words: Sequence[str]) -> set[int]:
        ids = set()
        for word in words:
            encoded = tokenizer(word, add_special_tokens=False).input_ids
            if encoded and tokenizer.decode(encoded[:1]).strip():
                ids.add(int(encoded[0]))
        return ids

    yes, no = first_tokens(_YES), first_tokens(_NO)
    shared = yes & no
    yes, no = yes - shared, no - shared
    if not yes or not no:
        raise ValueError(
            f"the tokenizer has no token that starts only a yes answer ({sorted(yes)}) or only a no "
            f"answer ({sorted(no)})"
        )
    return YesNoTokens(tuple(sorted(yes)), tuple(sorted(no)))


def yes_probability(logits: torch.Tensor, tokens: YesNoTokens) -> torch.Tensor:
    """logits [n, vocab] -> P(yes) [n] normalised over the yes and no tokens (float32)."""
    logits = logits.float()
    yes = torch.logsumexp(logits[:, list(tokens.yes)], dim=-1)
    no = torch.logsumexp(logits[:, list(tokens.no)], dim=-1)
    return torch.sigmoid(yes - no)


@torch.inference_mode()
def eager_packed_logits(
    llm,
    lm_head,
    prefix_kv,
    embeds,
    positions,
    lengths,
    evidence: MemoryLayout | None = None,
    layers: Sequence[int] = (),
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """FastDecoder.packed_logits through the plain transformers forward: a DynamicCache copy of the
    prefix and a 4-D additive block mask (block_mask). (Float32 logits [n, vocab], block mass
    [n, num_blocks] on the CPU or None.)

    evidence: as FastDecoder.packed_logits, with the queries of the tails' last tokens recorded in
    `layers` by the recording SDPA attention (evidence.QueryRecorder) during this same forward."""
    cache = DynamicCache(config=llm.config)
    for layer, (keys, values) in enumerate(prefix_kv):
        cache.update(keys, values, layer)
    prefix_len = prefix_kv[0][0].shape[2]
    allowed = block_mask(prefix_len, lengths, embeds.device)
    mask = torch.zeros(allowed.shape, dtype=embeds.dtype, device=embeds.device)
    mask = mask.masked_fill(~allowed, torch.finfo(embeds.dtype).min)[None, None]
    ends = torch.tensor(list(lengths), device=embeds.device).cumsum(0) - 1
    recording = (
        QueryRecorder(layers, rows=ends.tolist()).recording()
        if evidence is not None
        else contextlib.nullcontext()
    )
    with recording as recorder:
        hidden = llm(
            inputs_embeds=embeds,
            position_ids=positions,
            attention_mask=mask,
            use_cache=True,
            **{_layer_cache_kw(llm): cache},
        ).last_hidden_state
    logits = lm_head(hidden[0, ends]).float()
    if evidence is None:
        return logits, None
    mass = block_attention(
        recorder.queries(),
        [cache.layers[i].keys[0].transpose(0, 1) for i in sorted(layers)],
        evidence,
        llm.layers[layers[0]].self_attn.scaling,
        visible=allowed.index_select(0, ends),
    )
    return logits, mass.cpu()


@dataclass(frozen=True)
class ConditionScores:
    """One packed evaluation of conditions on a prefix."""

    probabilities: list[float]  # P(yes) per condition
    # evidence=True: per condition, the attention of its prompt's last token (the one whose logits
    # give P(yes)) per memory block, from the same forward (rows 1; seconds 0: the cost is part of
    # the evaluation's, benchmarks/bench_gpu.py --sections watch measures it apart); () otherwise
    attention: tuple[BlockAttention, ...] = ()


class ConditionScorer:
    """P(yes) of conditions on a VideoLM's MemoryPrefix (VideoLM.score_conditions)."""

    def __init__(self, lm):
        self.lm = lm
        self.tokens = yes_no_tokens(lm.tokenizer)

    @torch.inference_mode()
    def scores(self, prefix, conditions: Sequence[str], evidence: bool = False) -> ConditionScores:
        """One packed forward of every condition's prompt on `prefix` -> P(yes) per condition, and
        with evidence each one's attention per memory block (needs prefix.layout)."""
        if not conditions:
            return ConditionScores([])
        lm = self.lm
        layout = prefix.layout if evidence else None
        if evidence and layout is None:
            raise ValueError("evidence needs a prefix with its memory layout")
        tails = [lm._tail_inputs(condition_question(c), "", prefix.next_position) for c in conditions]
        lengths = [t[0].shape[1] for t in tails]
        embeds = torch.cat([t[0] for t in tails], dim=1)
        positions = torch.cat([t[1] for t in tails], dim=2)
        if lm.fast is not None:
            logits, mass = lm.fast.packed_logits(
                embeds, positions, lengths, prefix_kv=prefix.kv, prefix_len=prefix.num_tokens, evidence=layout
            )
        else:
            with lm._llm_lock:
                logits, mass = eager_packed_logits(
                    lm.llm, lm.lm_head, prefix.kv, embeds, positions, lengths, layout, lm.evidence_layers
                )
        probabilities = [float(p) for p in yes_probability(logits, self.tokens)]
        attention = (
            () if mass is None else tuple(BlockAttention(m, layout, lm.evidence_layers, 1, 0.0) for m in mass)
        )
        return ConditionScores(probabilities, attention)
