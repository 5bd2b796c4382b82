"""Chat prompt around the memory, from the checkpoint's chat template (Qwen2-VL ChatML otherwise).

The prompt of one question with the video is split at the video placeholder so the part
before the question can be cached:

    head  = "<|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n<|vision_start|>"
    [memory tokens] <|vision_end|>
    tail  = "{question}<|im_end|>\\n<|im_start|>assistant\\n{answer_prefix}"

Every cut lies at a special token, so tokenizing the pieces apart gives the same ids as
tokenizing the whole prompt.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

# Python lines a chat template's render may execute (render_bounded); real ones take a few thousand.
RENDER_STEP_BUDGET = 5_000_000
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."  # the one default (config/fvs.yaml repeats it)
VIDEO_PAD = "<|video_pad|>"
VISION_END = "<|vision_end|>"
_SYSTEM = "FVS_SYSTEM_SENTINEL"
_QUESTION = "FVS_QUESTION_SENTINEL"

QWEN2_VL_CHAT = (
    "<|im_start|>system\n"
    + _SYSTEM
    + "<|im_end|>\n<|im_start|>user\n<|vision_start|>"
    + VIDEO_PAD
    + VISION_END
    + _QUESTION
    + "<|im_end|>\n<|im_start|>assistant\n"
)


@dataclass(frozen=True)
class ChatFormat:
    """The text pieces of a one-turn video question."""

    before_system: str
    before_memory: str  # after the system prompt, up to and including <|vision_start|>
    before_question: str  # after <|vision_end|>
    after_question: str  # ends with the assistant turn's opening

    def head(self, system_prompt: str) -> str:
        return self.before_system + system_prompt + self.before_memory


def chat_format(ckpt_dir: Path, tokenizer) -> ChatFormat:
    """Split the checkpoint's chat template, rendered for [system, user(video, question)], at its
    placeholders."""
    template = load_chat_template(ckpt_dir, tokenizer)
    if template is None:
        rendered = QWEN2_VL_CHAT
    else:
        messages = [
            {"role": "system", "content": _SYSTEM},
            {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": _QUESTION}]},
        ]
        rendered = render_bounded(
            lambda: tokenizer.apply_chat_template(
                messages, chat_template=template, tokenize=False, add_generation_prompt=True
            )
        )
    before_system, rest = _split_once(rendered, _SYSTEM)
    before_memory, rest = _split_once(rest, VIDEO_PAD)
    if not rest.startswith(VISION_END):
        raise ValueError(f"chat template does not close the video with {VISION_END}")
    before_question, after_question = _split_once(rest.removeprefix(VISION_END), _QUESTION)
    return ChatFormat(before_system, before_memory, before_question, after_question)


class TemplateTooLong(RuntimeError):
    """A chat template did not finish rendering within its step budget."""


def render_bounded(render: Callable[[], str], budget: int = RENDER_STEP_BUDGET) -> str:
    """render() with at most `budget` Python lines executed while it runs, on the calling thread.

    A checkpoint's chat template is code: jinja's sandbox caps each range() but not nesting, so
    two nested loops can run 1e10 times and hang the loader. Each line counts (sys.settrace, which
    is per thread: this works on the node's configure thread, where signals cannot interrupt
    anything); past the budget, TemplateTooLong ends the render. A real template takes a few
    thousand lines."""
    steps = 0
    over = False

    def trace(frame, event, arg):
        nonlocal steps, over
        if over:
            return None
        if event == "line":
            steps += 1
            if steps > budget:
                over = True
                raise TemplateTooLong(
                    f"rendering did not finish within {budget} steps (a loop that never ends?)"
                )
        return trace

    previous = sys.gettrace()
    sys.settrace(trace)
    try:
        return render()
    finally:
        sys.settrace(previous)


def load_chat_template(ckpt_dir: Path, tokenizer) -> str | None:
    """The checkpoint's template: the tokenizer's, else chat_template.jinja / chat_template.json."""
    if tokenizer.chat_template:
        return tokenizer.chat_template
    jinja = ckpt_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    json_file = ckpt_dir / "chat_template.json"
    if json_file.is_file():
        return json.loads(json_file.read_text())["chat_template"]
    return None


def _split_once(text: str, marker: str) -> tuple[str, str]:
    parts = text.split(marker)
    if len(parts) != 2:
        raise ValueError(f"chat template renders {marker!r} {len(parts) - 1} times, expected once")
    return parts[0], parts[1]
