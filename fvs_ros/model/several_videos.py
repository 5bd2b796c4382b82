"""A question about several cameras: one prompt with one video block per camera, each introduced
by its name.

    <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n
    {name 1}: <|vision_start|> [memory 1] <|vision_end|>
    \\n{name 2}: <|vision_start|> [memory 2] <|vision_end|>
    {question}<|im_end|>\\n<|im_start|>assistant\\n

Positions follow Qwen2-VL's rule for several videos in one prompt: each block starts at the
position where the text before it ends, and the text after a block continues from the block's
largest position under the plain rule + 1 (VideoLM.memory_inputs returns that position for
<|vision_end|>), so each video's positions continue from the previous block's. Inside a block the
memory keeps the trained Flash-VStream layout (DAM then CSM, AM-RoPE times of its own stream).

The official checkpoint was fine-tuned with one video per prompt: this layout is an extension of
what it saw (Qwen2-VL's own chat template labels several videos "Video N: " the same way, with
add_vision_id). A question about one camera keeps the trained one-video prompt (VideoLM.answer on
that camera's prefix). Checked against transformers' own eager forward on the same embeddings and
positions: test/model/test_several_videos.py.
"""

from __future__ import annotations

from typing import Generator, Sequence

import torch

from .prompt import DEFAULT_SYSTEM_PROMPT
from .video_lm import MemoryPrefix, PromptInputs, VideoLM

VISION_START = "<|vision_start|>"


@torch.inference_mode()
def videos_head_inputs(
    lm: VideoLM, videos: Sequence[tuple[str, object]], system_prompt: str = DEFAULT_SYSTEM_PROMPT
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """[system + every named video block] as (embeds [1, P, hidden], positions [3, 1, P], the
    position of the first token after it). videos: (name, MemorySnapshot) pairs, in prompt order."""
    if not videos:
        raise ValueError("a prompt of several videos needs at least one")
    head = lm.chat.head(system_prompt)
    if not head.endswith(VISION_START):
        raise ValueError(f"the chat template's video does not open with {VISION_START}")
    ids = lm._tokenize(head.removesuffix(VISION_START))
    vision_start = [lm.model.config.vision_start_token_id]
    embeds, positions, position = [lm._embed(ids)], [lm._text_positions(0, len(ids))], len(ids)
    for i, (name, snapshot) in enumerate(videos):
        label = lm._tokenize(("\n" if i else "") + f"{name}: ") + vision_start
        embeds.append(lm._embed(label))
        positions.append(lm._text_positions(position, len(label)))
        memory, memory_pos, end = lm.memory_inputs(snapshot, position + len(label))
        embeds += [memory, lm._embed([lm.vision_end_id])]
        positions += [memory_pos, lm._text_positions(end, 1)]
        position = end + 1
    return torch.cat(embeds)[None], torch.cat(positions, dim=1)[:, None], position


def prefill_videos(
    lm: VideoLM,
    videos: Sequence[tuple[str, object]],
    system_prompt: str = DEFAULT_SYSTEM_PROMPT,
    chunk_tokens: int | None = None,
) -> Generator[None, None, MemoryPrefix]:
    """The MemoryPrefix of videos_head_inputs (a generator like VideoLM.prefill_steps); VideoLM.answer
    answers from it. No evidence layout: several memories are not one MemoryLayout."""
    embeds, positions, next_position = videos_head_inputs(lm, videos, system_prompt)
    kv = yield from lm.prefill_embeds(embeds, positions, chunk_tokens)
    frames = sum(int(snapshot.frames_seen) for _, snapshot in videos)
    return MemoryPrefix(kv, int(embeds.shape[1]), next_position, -1, frames, None)


@torch.inference_mode()
def videos_prompt_inputs(
    lm: VideoLM,
    videos: Sequence[tuple[str, object]],
    question: str,
    system_prompt: str = DEFAULT_SYSTEM_PROMPT,
) -> PromptInputs:
    """The whole prompt [several video blocks + question tail] as one LLM input (reference checks)."""
    head, head_pos, next_position = videos_head_inputs(lm, videos, system_prompt)
    tail, tail_pos = lm._tail_inputs(question, "", next_position)
    return PromptInputs(
        torch.cat([head, tail], dim=1), torch.cat([head_pos, tail_pos], dim=2), next_position + tail.shape[1]
    )
