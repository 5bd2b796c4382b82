"""The streaming path feeds the LLM what the offline path (the one the checkpoint was trained with) feeds it.

Frames go one by one through StreamEngine (every frame kept, slots of two consecutive frames) and
the LLM input built from the engine's memory is compared with:
- the official reference run (test/data/official_reference: the official offline code on a tiny
  checkpoint): same inputs_embeds, position ids and greedy tokens;
- the project's offline path on the same frames (all frames paired in one ViT call, one memory
  update), on another frame size, on scenes whose weight order differs from their time order, on
  streams with more slots than CSM centroids and past the 120 trained slots;
- the official memory rule restated (below) on well-separated scenes, where any correct k-means,
  batch or incremental, finds the same clusters.

Where the incremental k-means and the official batch k-means may legitimately differ, and what is
therefore not compared: clusters that are not well separated (the official k-means starts from
random slots and may stop in another local optimum; ours grows incrementally from Ward merges);
exact ties in DAM retrieval (rounding decides the official argmin; ours takes the most recent of
the tied frames); a frame the official code retrieves twice (ours never does); frames the bounded
bank no longer holds (bank_capacity; docs/memory.md).
"""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fvs_ros.engine import EngineConfig, StreamEngine
from fvs_ros.memory import FlashMemory, MemoryConfig
from fvs_ros.model import load_model
from fvs_ros.model.tiny import write_tiny_checkpoint
from fvs_ros.model.video_lm import DEFAULT_SYSTEM_PROMPT

# Every official reference run (test/data/official_reference*/: a tiny checkpoint, its frames and
# what the official offline path fed its LLM); a further one dropped in beside is checked the same way.
REF_DIRS = sorted(Path(__file__).parents[1].glob("data/official_reference*/offline_reference.npz"))
Q = "What is happening in the video?"


@pytest.fixture(scope="module", params=[p.parent for p in REF_DIRS], ids=lambda d: d.name)
def ref(request):
    """One reference: its arrays, the question and answer prefix of its prompt, its model."""
    prompt = json.loads((request.param / "offline_reference.json").read_text())["prompt_text"]
    return SimpleNamespace(
        **dict(np.load(request.param / "offline_reference.npz")),
        question=prompt.split("<|vision_end|>")[1].split("<|im_end|>")[0],
        answer_prefix=prompt.split("<|im_start|>assistant\n")[1],
        lm=load_model(request.param / "tiny_ckpt"),
    )


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    return load_model(
        write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", "flash_vstream", seed=4)
    )


def stream(lm, frames, memory: MemoryConfig, flush_every=1, extra=None, fps=1.0, **config):
    """A started engine fed `frames` one by one at `fps` (then the frames of `extra`, not flushed)."""
    eng = StreamEngine(lm, memory, EngineConfig(sample_fps=0, **config)).start()
    for i, f in enumerate(frames):
        assert eng.add_frame(f, i / fps)
        if flush_every and (i + 1) % flush_every == 0:
            assert eng.flush(60)
    assert eng.flush(60)
    for j, f in enumerate(extra if extra is not None else []):
        eng.add_frame(f, (len(frames) + j) / fps)
    return eng


def offline_snapshot(lm, frames, memory: MemoryConfig, fps=1.0):
    """The project's offline path: every frame paired in one ViT call, one memory update."""
    feats = lm.encode_frames(frames, frames_per_slot=2)
    stamps = torch.arange(1, len(frames), 2, dtype=torch.float64) / fps  # a slot's stamp: its last frame's
    return FlashMemory(memory).update(feats.low, feats.full, stamps, feats.full_hw), feats


def assert_same_llm_input(lm, a, b, question, answer_prefix=""):
    """Two memory snapshots give the LLM the same embeddings (float32 tolerance) and positions."""
    x = lm.prompt_inputs(a, question, answer_prefix=answer_prefix)
    y = lm.prompt_inputs(b, question, answer_prefix=answer_prefix)
    assert torch.equal(x.position_ids, y.position_ids)
    torch.testing.assert_close(x.embeds, y.embeds, rtol=1e-5, atol=1e-5)
    return x


def scene_frames(sizes, h, w, seed=0):
    """Flat-coloured scenes with noise, `sizes` slots (2 frames each) per scene in time order."""
    rng = np.random.default_rng(seed)
    colours = rng.permutation(np.linspace(20, 235, len(sizes)).astype(int))
    frames = []
    for scene, n in enumerate(sizes):
        base = np.stack([np.full((h, w), colours[scene]), np.full((h, w), 255 - colours[scene])], -1)
        base = np.concatenate([base, np.full((h, w, 1), (37 * scene) % 256)], -1)
        frames += [np.clip(base + rng.integers(-6, 7, (h, w, 3)), 0, 255) for _ in range(2 * n)]
    which = np.repeat(np.arange(len(sizes)), sizes)
    return np.stack(frames).astype(np.uint8), which


def official_memory(low, which, csm_slots, dam_frames):
    """The official offline memory (kmeans_ordered + klarge_retrieve), restated for a known partition
    `which` (slot -> cluster) of well-separated slots: (weights, times, DAM slots in the LLM's order)."""
    clusters = [np.flatnonzero(which == c) for c in np.unique(which)]
    assert len(clusters) == csm_slots < len(which)
    times = torch.tensor([float(np.mean(m)) for m in clusters])
    order = torch.argsort(times)
    weights = torch.tensor([float(len(m)) for m in clusters])[order]
    flat = low.reshape(len(low), -1).float()
    centroids = torch.stack([flat[m].mean(0) for m in clusters])[order]
    heaviest = torch.argsort(weights, descending=True)[:dam_frames]
    dist = torch.cdist(centroids[heaviest], flat)
    return weights.tolist(), times[order].tolist(), torch.argmin(dist, dim=1).tolist()


# ----------------------------------------------------------------- the official reference


@pytest.mark.parametrize("flush_every", [1, 0], ids=["slot_by_slot", "batched"])
def test_reference_frames_streamed_give_the_official_llm_input(ref, flush_every):
    """The reference frames one by one (16 for the first reference) -> two-frame slots (8) -> the
    official memory, embeddings, positions and greedy tokens; one more frame waits for its pair."""
    lm, frames = ref.lm, ref.frames
    memory = MemoryConfig(**lm.memory_defaults)
    eng = stream(lm, frames, memory, flush_every, extra=frames[-1:])  # + half a slot
    try:
        snap = eng.snapshot()
        slots = len(frames) // 2
        assert (snap.frames_seen, snap.last_stamp) == (slots, 2 * slots - 1.0)
        assert snap.csm_weights.tolist() == ref.csm_weights.tolist()
        assert snap.csm_times.tolist() == ref.csm_timestamps.tolist()
        assert snap.dam_slots.tolist() == ref.dam_positions.tolist()  # the official order
        inputs = lm.prompt_inputs(snap, ref.question, answer_prefix=ref.answer_prefix)
        assert torch.equal(inputs.position_ids.cpu(), torch.from_numpy(ref.position_ids))
        torch.testing.assert_close(inputs.embeds, torch.from_numpy(ref.inputs_embeds), rtol=1e-5, atol=1e-5)
        n = len(ref.generated_ids)
        gen = lm.answer(lm.prefill_memory(snap), ref.question, n, answer_prefix=ref.answer_prefix)
        assert gen.token_ids == ref.generated_ids.tolist()
        offline, _ = offline_snapshot(lm, frames[: 2 * slots], memory)
        want = lm.answer_uncached(offline, Q, max_new_tokens=6)
        got = eng.ask(Q, max_new_tokens=6)  # the engine's own path: its cached prefix
        assert (got.text, got.num_tokens, got.frames_seen, got.frames_per_slot) == (
            want.text,
            len(want.token_ids),
            2 * slots,
            2,
        )
        assert (got.first_stamp, got.last_stamp) == (0.0, 2 * slots - 1.0)
    finally:
        eng.shutdown()


def test_first_reference_is_the_one_documented(ref):
    """Pins what the first reference holds (docs/model.md's numbers), so the test above cannot pass
    on an empty or misread file."""
    if ref.frames.shape != (16, 112, 224, 3):
        pytest.skip("another reference")
    assert ref.csm_weights.tolist() == [4, 2, 1, 1] and ref.dam_positions.tolist() == [0, 5]
    assert ref.generated_ids.tolist() == [251, 379, 33, 66, 142] and ref.answer_prefix == "Best option: ("


def test_one_frame_per_slot_is_not_what_the_checkpoint_saw(ref):
    """The layout matters: streaming each frame as its own slot gives other embeddings."""
    eng = stream(ref.lm, ref.frames, MemoryConfig(**ref.lm.memory_defaults), frames_per_slot=1)
    try:
        snap = eng.snapshot()
        assert snap.frames_seen == len(ref.frames) and eng.ask(Q, max_new_tokens=1).frames_per_slot == 1
        embeds = ref.lm.prompt_inputs(snap, ref.question, answer_prefix=ref.answer_prefix).embeds
        want = torch.from_numpy(ref.inputs_embeds)
        assert embeds.shape != want.shape or not torch.allclose(embeds, want, atol=1e-3)
    finally:
        eng.shutdown()


# ----------------------------------------------------------------- other geometry, weight order


@pytest.mark.parametrize("dam_order", ["weight", "time"])
def test_longer_than_memory_weight_order_and_other_frame_size(tiny_lm, dam_order):
    """168x112 frames (not the reference's 112x224), 13 slots into 4 centroids, scenes of 3, 1, 4, 5
    slots: the official memory puts the 5-slot scene's frame before the 4-slot scene's (weight order,
    not time order). Streamed slot by slot or in batches, the engine equals the offline path; both
    equal the official rule."""
    frames, which = scene_frames([3, 1, 4, 5], 168, 112)
    memory = MemoryConfig(csm_slots=4, dam_frames=2, dam_order=dam_order)
    offline, feats = offline_snapshot(tiny_lm, frames, memory)
    weights, times, dam_slots = official_memory(feats.low, which, 4, 2)
    assert weights == [3, 1, 4, 5] and times == [1.0, 3.0, 5.5, 10.0]
    assert which[dam_slots].tolist() == [3, 2]  # heaviest first: not the time order
    assert offline.csm_weights.tolist() == weights and offline.csm_times.tolist() == times
    assert offline.dam_slots.tolist() == (dam_slots if dam_order == "weight" else sorted(dam_slots))
    answer = tiny_lm.answer_uncached(offline, Q, max_new_tokens=6)
    for flush_every, max_batch in ((1, 16), (0, 6)):  # slot by slot; 3-slot ViT batches
        eng = stream(tiny_lm, frames, memory, flush_every, max_batch=max_batch)
        try:
            snap = eng.snapshot()
            assert snap.frames_seen == 13 and snap.dam_slots.tolist() == offline.dam_slots.tolist()
            assert snap.csm_weights.tolist() == weights and snap.csm_times.tolist() == times
            assert_same_llm_input(tiny_lm, snap, offline, Q)
            h, w = (side // 14 for side in tiny_lm.frame_size(168, 112))
            assert snap.full_hw == (h, w) != (8, 16)  # not the reference's grid
            assert snap.dam_features.shape[1] == h * w and snap.csm_features.shape[1] == h * w // 4
            got = eng.ask(Q, max_new_tokens=6)
            assert (got.text, got.num_tokens) == (answer.text, len(answer.token_ids))
        finally:
            eng.shutdown()


def test_dam_order_reaches_the_llm(tiny_lm):
    """The order is not cosmetic: positions travel with the tokens, the causal mask does not."""
    frames, _ = scene_frames([3, 1, 4, 5], 168, 112)
    by_weight, _ = offline_snapshot(tiny_lm, frames, MemoryConfig(csm_slots=4, dam_frames=2))
    by_time, _ = offline_snapshot(tiny_lm, frames, MemoryConfig(csm_slots=4, dam_frames=2, dam_order="time"))
    a, b = tiny_lm.prompt_inputs(by_weight, Q), tiny_lm.prompt_inputs(by_time, Q)
    assert sorted(by_weight.dam_slots.tolist()) == by_time.dam_slots.tolist() != by_weight.dam_slots.tolist()
    assert not torch.equal(a.position_ids, b.position_ids)
    assert not torch.allclose(tiny_lm.logits(a)[-1], tiny_lm.logits(b)[-1], atol=1e-4)


def test_streams_past_the_trained_slots_are_squeezed_into_them(tiny_lm):
    """130 two-frame slots (260 frames, more than the 120 slots the checkpoint saw): every time id in
    [0, 119], the newest slot at 119, and the engine equals the offline path."""
    frames, _ = scene_frames([20, 30, 25, 40, 15], 112, 112, seed=2)
    memory = MemoryConfig(csm_slots=6, dam_frames=3)
    offline, _ = offline_snapshot(tiny_lm, frames, memory, fps=2.0)
    eng = stream(tiny_lm, frames, memory, flush_every=16, fps=2.0)
    try:
        snap = eng.snapshot()
        assert snap.frames_seen == 130 and snap.last_stamp == 129.5
        inputs = assert_same_llm_input(tiny_lm, snap, offline, Q)
        v0 = len(
            tiny_lm.tokenizer(tiny_lm.chat.head(DEFAULT_SYSTEM_PROMPT), add_special_tokens=False).input_ids
        )
        per_frame = snap.full_hw[0] * snap.full_hw[1] // 4  # merged tokens of one DAM frame
        dam_t = inputs.position_ids[0, 0, v0 : v0 + 3 * per_frame : per_frame] - v0
        want = torch.round(snap.dam_slots.double() * 119 / 129).long()
        assert dam_t.tolist() == want.tolist() and max(want.tolist()) <= 119
        assert (
            tiny_lm.answer_uncached(snap, Q, 4).token_ids == tiny_lm.answer_uncached(offline, Q, 4).token_ids
        )
    finally:
        eng.shutdown()
