"""One prompt about several cameras (fvs_ros/model/several_videos.py): positions by Qwen2-VL's rule
for several videos, and the prefix-cached answer equal to transformers' own eager forward on the
same embeddings and positions."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fvs_ros.common.steps import drain
from fvs_ros.model import load_model
from fvs_ros.model.positions import memory_positions, time_to_position
from fvs_ros.model.several_videos import prefill_videos, videos_head_inputs, videos_prompt_inputs
from fvs_ros.model.tiny import write_tiny_checkpoint

Q = "What changed between the cameras?"


@pytest.fixture(scope="module", params=[False, True], ids=["eager", "fast_decode"])
def lm(request, tmp_path_factory):
    ckpt = write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", "flash_vstream", seed=2)
    return load_model(ckpt, fast_decode=request.param)


def snapshot(lm, seed, slots, dam):
    """A memory of `slots` random one-frame slots, all in CSM, the slots `dam` in DAM."""
    frames = np.random.default_rng(seed).integers(0, 256, (slots, 112, 224, 3), dtype=np.uint8)
    feats = lm.encode_frames(frames)
    return SimpleNamespace(
        csm_features=feats.low.float(),
        csm_weights=torch.ones(slots),
        csm_times=torch.arange(slots, dtype=torch.float64),
        dam_features=feats.full[list(dam)],
        dam_slots=torch.tensor(dam),
        frames_seen=slots,
        version=1,
        full_hw=feats.full_hw,
    )


@pytest.fixture(scope="module")
def videos(lm):
    return [("front", snapshot(lm, 0, 4, (1, 3))), ("wrist", snapshot(lm, 1, 3, (0,)))]


def test_each_block_continues_from_the_previous(lm, videos):
    embeds, positions, next_position = videos_head_inputs(lm, videos)
    ids = lm.tokenizer(lm.chat.head("You are a helpful assistant.").removesuffix("<|vision_start|>"))
    start = len(ids.input_ids)
    pos = positions[:, 0]
    offset, position = start, start
    for i, (name, snap) in enumerate(videos):
        label = len(lm._tokenize(("\n" if i else "") + f"{name}: ")) + 1  # + <|vision_start|>
        # the label's text positions continue from where the previous block's text ended
        assert pos[:, offset].tolist() == [position] * 3
        offset, position = offset + label, position + label
        h, w = snap.full_hw
        dam_t = time_to_position(snap.dam_slots, snap.frames_seen, lm.trained_slots)
        csm_t = time_to_position(snap.csm_times, snap.frames_seen, lm.trained_slots)
        expected, end = memory_positions(position, dam_t, csm_t, (h // 2, w // 2))
        n = expected.shape[1]
        assert torch.equal(pos[:, offset : offset + n].cpu(), expected)  # the trained layout in the block
        assert pos[:, offset + n].tolist() == [end] * 3  # <|vision_end|>
        offset, position = offset + n + 1, end + 1
    assert offset == embeds.shape[1] and position == next_position


def eager_greedy(lm, embeds, positions, next_position, n):
    """Greedy tokens from transformers' own Qwen2-VL language model and lm_head, no cache: the whole
    sequence is run again for every token."""
    tokens = []
    for _ in range(n):
        with torch.inference_mode():
            hidden = lm.model.model.language_model(inputs_embeds=embeds, position_ids=positions)
            token = int(lm.model.lm_head(hidden.last_hidden_state[0, -1]).argmax())
        if token in lm.stop_ids:
            break
        tokens.append(token)
        embeds = torch.cat([embeds, lm._embed([token])[None]], dim=1)
        step = torch.full((3, 1, 1), next_position, dtype=positions.dtype)
        positions, next_position = torch.cat([positions, step], dim=2), next_position + 1
    return tokens


def test_cached_answer_equals_transformers_eager_forward(lm, videos):
    prefix = drain(prefill_videos(lm, videos, chunk_tokens=16))
    got = lm.answer(prefix, Q, max_new_tokens=12)
    inputs = videos_prompt_inputs(lm, videos, Q)
    assert prefix.num_tokens + got.prompt_tokens == inputs.embeds.shape[1]
    assert prefix.frames_seen == 7
    want = eager_greedy(lm, inputs.embeds, inputs.position_ids, inputs.next_position, 12)
    assert len(want) > 1 and got.token_ids == want


def test_the_order_of_the_cameras_is_the_prompt_order(lm, videos):
    """Swapping the cameras changes the prompt (each block's name and positions travel with it)."""
    a = videos_prompt_inputs(lm, videos, Q)
    b = videos_prompt_inputs(lm, videos[::-1], Q)
    assert a.embeds.shape != b.embeds.shape or not torch.equal(a.embeds, b.embeds)


def test_no_video_is_refused(lm):
    with pytest.raises(ValueError, match="at least one"):
        videos_head_inputs(lm, [])
