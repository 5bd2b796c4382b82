"""Reference attention for the evidence tests: transformers' eager attention weights on a full
forward of [prompt + answer], summed over each memory block."""

import contextlib

import numpy as np
import torch

from fvs_ros.model.evidence import memory_layout
from fvs_ros.model.video_lm import DEFAULT_SYSTEM_PROMPT

QUESTION = "What is happening in the video?"


@contextlib.contextmanager
def eager_attention(llm):
    """The decoder's attention as transformers' eager implementation (attention weights returned)."""
    configs = {id(c): c for c in [llm.config] + [layer.self_attn.config for layer in llm.layers]}.values()
    old = [c._attn_implementation for c in configs]
    for c in configs:
        c._attn_implementation = "eager"
    try:
        yield
    finally:
        for c, name in zip(configs, old, strict=True):
            c._attn_implementation = name


@torch.inference_mode()
def reference_mass(lm, snapshot, tokens, rows, layers, question=QUESTION):
    """Mean over layers, heads and the token-choosing rows of the eager attention weights summed
    over each memory block, from one forward of [prompt + the answer tokens fed back] (on the
    model's device; the mass comes back on the CPU)."""
    inputs = lm.prompt_inputs(snapshot, question)
    fed = torch.tensor(tokens[: rows - 1], dtype=torch.long, device=lm.device)
    embeds = torch.cat([inputs.embeds, lm.llm.embed_tokens(fed)[None]], 1)
    start = inputs.next_position
    answer_pos = torch.arange(start, start + len(fed), device=lm.device).expand(3, 1, len(fed))
    positions = torch.cat([inputs.position_ids, answer_pos], dim=2)
    with eager_attention(lm.llm):
        out = lm.llm(inputs_embeds=embeds, position_ids=positions, output_attentions=True)
    first = inputs.embeds.shape[1] - 1
    # the memory starts after the head text (which ends with <|vision_start|>); a DAM frame is its
    # merged grid (h/2 x w/2 tokens), a centroid a quarter of that
    start = len(lm.tokenizer(lm.chat.head(DEFAULT_SYSTEM_PROMPT), add_special_tokens=False).input_ids)
    h, w = snapshot.full_hw
    sizes = [h * w // 4] * len(snapshot.dam_slots) + [h * w // 16] * len(snapshot.csm_weights)
    edges = np.cumsum([start] + sizes)
    mass = torch.zeros(len(sizes))
    for layer in layers:
        weights = out.attentions[layer][0, :, first : first + rows].float()  # [H, rows, L]
        for b in range(len(sizes)):
            mass[b] += float(weights[..., edges[b] : edges[b + 1]].sum(-1).mean())
    return mass / len(layers), memory_layout(snapshot, int(edges[-1]))
