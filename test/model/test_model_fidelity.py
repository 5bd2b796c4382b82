"""Checkpoint fidelity: fvs_ros.model feeds the LLM exactly what the official offline path fed it.

Reference: test/data/official_reference (the official Flash-VStream-Qwen code on a tiny random
checkpoint, transformers 4.45, float32). 16 frames -> 8 slots (two frames per slot) -> one memory
update of an empty memory with 4 CSM slots and 2 DAM frames -> prompt -> 5 greedy tokens.
"""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fvs_ros.memory import FlashMemory, MemoryConfig
from fvs_ros.model import PromptInputs, load_model
from fvs_ros.model.preprocess import slot_patches

REF_DIR = Path(__file__).parents[1] / "data" / "official_reference"
ANSWER_PREFIX = "Best option: ("
# The reference's clusters (csm_weights [4, 2, 1, 1], csm_timestamps [1.5, 4.5, 6, 7]) and DAM slots.
REF_CLUSTERS = [[0, 1, 2, 3], [4, 5], [6], [7]]
REF_DAM_SLOTS = [0, 5]


@pytest.fixture(scope="module")
def ref():
    return dict(np.load(REF_DIR / "offline_reference.npz"))


@pytest.fixture(scope="module")
def question():
    """The question part of the reference prompt: between <|vision_end|> and <|im_end|>."""
    prompt = json.loads((REF_DIR / "offline_reference.json").read_text())["prompt_text"]
    return prompt.split("<|vision_end|>")[1].split("<|im_end|>")[0]


@pytest.fixture(scope="module")
def lm():
    return load_model(REF_DIR / "tiny_ckpt")


@pytest.fixture(scope="module")
def feats(lm, ref):
    return lm.encode_frames(ref["frames"], frames_per_slot=2)


def reference_snapshot(feats):
    """The memory state the official code reached, built from its cluster memberships."""
    return SimpleNamespace(
        csm_features=torch.stack([feats.low[g].float().mean(0) for g in REF_CLUSTERS]),
        csm_weights=torch.tensor([float(len(g)) for g in REF_CLUSTERS]),
        csm_times=torch.tensor([float(np.mean(g)) for g in REF_CLUSTERS]),
        dam_features=feats.full[REF_DAM_SLOTS],
        dam_slots=torch.tensor(REF_DAM_SLOTS),
        frames_seen=8,
        version=1,
        full_hw=feats.full_hw,
    )


def official_low_res(pixel_values, t, h, w):
    """The official FlashMemory.temporal_pool, restated: 2x2 pixel average inside each merge window."""
    x = pixel_values.reshape(t, h // 2, w // 2, 2, 2, 3, 2, 14, 14).permute(0, 1, 2, 5, 6, 3, 7, 4, 8)
    x = F.avg_pool2d(x.reshape(-1, 6, 28, 28), 2).reshape(t, h // 4, 2, w // 4, 2, 3, 2, 14, 14)
    return x.permute(0, 1, 3, 2, 4, 5, 6, 7, 8).reshape(-1, 3 * 2 * 14 * 14)


def test_pixel_values_match_official_processor(ref):
    patches = slot_patches(torch.from_numpy(ref["frames"]), frames_per_slot=2)
    t, h, w = ref["video_grid_thw"][0].tolist()
    assert (patches.full_hw, patches.low_hw) == ((h, w), (h // 2, w // 2))
    assert torch.equal(patches.full, torch.from_numpy(ref["pixel_values"]))
    expected_low = official_low_res(torch.from_numpy(ref["pixel_values"]), t, h, w)
    torch.testing.assert_close(patches.low, expected_low, rtol=0, atol=1e-6)


def test_memory_reaches_reference_state_and_answer(lm, feats, ref, question):
    """fvs_ros.memory on the 8 slots, then the model: the official memory state, prompt and tokens."""
    mem = FlashMemory(MemoryConfig(**lm.memory_defaults))
    snap = mem.update(feats.low, feats.full, torch.arange(8, dtype=torch.float64), feats.full_hw)
    assert lm.memory_defaults == {"csm_slots": 4, "dam_frames": 2}
    assert snap.csm_weights.tolist() == ref["csm_weights"].tolist() == [4, 2, 1, 1]
    assert snap.csm_times.tolist() == ref["csm_timestamps"].tolist() == [1.5, 4.5, 6, 7]
    assert snap.dam_slots.tolist() == ref["dam_positions"].tolist() == REF_DAM_SLOTS
    expected = reference_snapshot(feats)
    torch.testing.assert_close(snap.csm_features.float(), expected.csm_features, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(snap.dam_features.float(), expected.dam_features.float())
    inputs = lm.prompt_inputs(snap, question, answer_prefix=ANSWER_PREFIX)
    assert torch.equal(inputs.position_ids.cpu(), torch.from_numpy(ref["position_ids"]))
    torch.testing.assert_close(inputs.embeds, torch.from_numpy(ref["inputs_embeds"]), rtol=1e-5, atol=1e-5)
    gen = lm.answer(lm.prefill_memory(snap), question, max_new_tokens=5, answer_prefix=ANSWER_PREFIX)
    assert gen.token_ids == ref["generated_ids"].tolist()


def test_prompt_embeddings_and_positions(lm, feats, ref, question):
    inputs = lm.prompt_inputs(reference_snapshot(feats), question, answer_prefix=ANSWER_PREFIX)
    assert torch.equal(inputs.position_ids.cpu(), torch.from_numpy(ref["position_ids"]))
    decode = torch.arange(inputs.next_position, inputs.next_position + 4).expand(3, 1, 4)
    assert torch.equal(decode, torch.from_numpy(ref["position_ids_decode"]))
    video = slice(33, 33 + 96)  # 33 tokens up to <|vision_start|>, then 2 x 32 DAM + 4 x 8 CSM tokens
    torch.testing.assert_close(
        inputs.embeds[0, video], torch.from_numpy(ref["video_embeds"]), rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(inputs.embeds, torch.from_numpy(ref["inputs_embeds"]), rtol=1e-5, atol=1e-5)


def test_logits_match_teacher_forced(lm, feats, ref, question):
    """Prefill logits and the 4 decode steps' logits, with the generated tokens fed back at decode
    positions."""
    inputs = lm.prompt_inputs(reference_snapshot(feats), question, answer_prefix=ANSWER_PREFIX)
    generated = torch.from_numpy(ref["generated_ids"][:4])
    decode_positions = torch.from_numpy(ref["position_ids_decode"])
    forced = PromptInputs(
        torch.cat([inputs.embeds, lm.llm.embed_tokens(generated)[None]], dim=1),
        torch.cat([inputs.position_ids, decode_positions], dim=2),
        inputs.next_position + 4,
    )
    logits = lm.logits(forced)[-5:]
    expected = torch.from_numpy(ref["logits_steps"])
    assert torch.equal(expected[0], torch.from_numpy(ref["logits_last"]))
    scale = expected.abs().max()
    assert (logits - expected).abs().max() / scale < 1e-5


def test_generated_tokens_cached_and_uncached(lm, feats, ref, question):
    snap = reference_snapshot(feats)
    expected = ref["generated_ids"].tolist()
    uncached = lm.answer_uncached(snap, question, max_new_tokens=5, answer_prefix=ANSWER_PREFIX)
    cached = lm.answer(lm.prefill_memory(snap), question, max_new_tokens=5, answer_prefix=ANSWER_PREFIX)
    assert uncached.token_ids == expected == [251, 379, 33, 66, 142]
    assert cached.token_ids == expected
    assert uncached.prompt_tokens == 260 and cached.prompt_tokens == 260 - 130
