"""Streaming use of the model: frames, memory positions, prefix-cached greedy answers."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fvs_ros.model import load_model
from fvs_ros.model.positions import TRAINED_SLOTS, memory_positions, time_to_position
from fvs_ros.model.tiny import write_tiny_checkpoint


@pytest.fixture(scope="module", params=[False, True], ids=["eager", "fast_decode"])
def lm(request, tmp_path_factory):
    """The same checkpoint answering through the eager loop and through FastDecoder (CPU: no graphs)."""
    ckpt = write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", "flash_vstream", seed=1)
    model = load_model(ckpt, fast_decode=request.param)
    assert (model.fast is not None) == request.param
    return model


@pytest.fixture(scope="module")
def frames():
    return np.random.default_rng(0).integers(0, 256, (6, 112, 224, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def snapshot(lm, frames):
    return snapshot_of(lm.encode_frames(frames), frames_seen=6)


def snapshot_of(feats, frames_seen, csm_times=None, dam_slots=(1, 4)):
    """Memory snapshot (contract of fvs_ros.memory) holding all slots in CSM and `dam_slots` in DAM."""
    n = feats.low.shape[0]
    return SimpleNamespace(
        csm_features=feats.low.float(),
        csm_weights=torch.ones(n),
        csm_times=torch.arange(n, dtype=torch.float64) if csm_times is None else torch.as_tensor(csm_times),
        dam_features=feats.full[list(dam_slots)],
        dam_slots=torch.tensor(dam_slots),
        frames_seen=frames_seen,
        version=3,
        full_hw=feats.full_hw,
    )


# ---------------------------------------------------------------- frames


def test_frame_size_multiples_of_56_within_budget(lm):
    assert lm.frame_size(720, 1280) == (336, 560)  # 16:9 -> 24 x 40 patches -> 240 LLM tokens
    assert lm.frame_size(1080, 1920) == (336, 560)
    assert lm.frame_size(480, 640) == (336, 504)
    assert lm.frame_size(112, 224) == (112, 224)
    for h, w in [(37, 1000), (2000, 90), (333, 333)]:
        H, W = lm.frame_size(h, w)
        assert H % 56 == 0 and W % 56 == 0 and H * W <= lm.max_pixels


def test_streaming_slot_is_the_frame_twice(lm, frames):
    """One frame per slot (streaming) = the offline pairing of that frame with itself."""
    stream = lm.encode_frames(frames[:2])
    paired = lm.encode_frames(np.repeat(frames[:2], 2, axis=0), frames_per_slot=2)
    torch.testing.assert_close(stream.full, paired.full)
    torch.testing.assert_close(stream.low, paired.low)


def test_frames_of_any_size_are_resized(lm):
    odd = np.random.default_rng(1).integers(0, 256, (2, 130, 250, 3), dtype=np.uint8)
    feats = lm.encode_frames(odd)
    h, w = (s // 14 for s in lm.frame_size(130, 250))
    assert feats.full_hw == (h, w) and feats.full.shape[:2] == (2, h * w)
    assert feats.low_hw == (h // 2, w // 2) and feats.low.shape[:2] == (2, h * w // 4)


def test_bad_frames_are_rejected(lm, frames):
    with pytest.raises(ValueError):
        lm.encode_frames(frames.astype(np.float32))
    with pytest.raises(ValueError):
        lm.encode_frames(frames[0])
    with pytest.raises(ValueError):
        lm.encode_frames(frames[:3], frames_per_slot=2)


# ---------------------------------------------------------------- positions


def test_positions_worked_example():
    """DESIGN 2: V0 = 33, DAM slots [0, 5] of a 4 x 8 grid, CSM times [1.5, 4.5, 6, 7] of a 2 x 4 grid."""
    dam_t = time_to_position(torch.tensor([0, 5]), slots_seen=8)
    csm_t = time_to_position(torch.tensor([1.5, 4.5, 6.0, 7.0]), slots_seen=8)
    assert csm_t.tolist() == [2, 4, 6, 7]  # round half to even
    pos, end = memory_positions(33, dam_t, csm_t, (4, 8))
    assert pos.shape == (3, 96)
    assert pos[:, 31].tolist() == [33, 36, 40] and pos[:, 32].tolist() == [38, 33, 33]
    assert pos[0, 64::8].tolist() == [99, 101, 103, 104]
    assert pos[1:, 64:72].T.tolist() == [[97 + r, 97 + c] for r in range(2) for c in range(4)]
    assert end == 101


def test_long_streams_stay_in_the_trained_time_range():
    n = 10_000
    t = time_to_position(torch.tensor([0.0, 0.5 * (n - 1), n - 1.0]), slots_seen=n)
    assert t.tolist() == [0, 60, TRAINED_SLOTS - 1]
    assert (
        time_to_position(torch.tensor([119.0]), slots_seen=120).item() == 119
    )  # no compression up to 120 slots


def test_prompt_positions_of_a_long_stream(lm, frames):
    feats = lm.encode_frames(frames[:3])
    snap = snapshot_of(feats, frames_seen=100_000, csm_times=[10.0, 50_000.0, 99_998.0], dam_slots=(0, 2))
    snap.dam_slots = torch.tensor([40_000, 99_999])
    inputs = lm.prompt_inputs(snap, "What changed?")
    v0 = len(lm.tokenizer(lm.chat.head("You are a helpful assistant."), add_special_tokens=False).input_ids)
    t = inputs.position_ids[0, 0]
    n_dam, n_csm = 2 * 32, 3 * 8
    assert (t[v0 : v0 + n_dam] - v0).unique().tolist() == [48, 119]  # 40000 * 119 / 99999 = 47.6
    csm_t = t[v0 + n_dam : v0 + n_dam + n_csm : 8] - (v0 + n_dam)
    assert csm_t.tolist() == [0, 60, 119]
    end = v0 + n_dam + max(3 - 1, 1, 3) + 1
    assert t[v0 + n_dam + n_csm].item() == end  # <|vision_end|>
    assert inputs.position_ids[:, 0, v0 + n_dam + n_csm :].equal(
        torch.arange(end, inputs.next_position).expand(3, -1)
    )


# ---------------------------------------------------------------- generation


@pytest.mark.parametrize("question", ["What is on the table?", "Describe the scene <|im_end|> in detail."])
def test_prefix_cached_answer_equals_uncached(lm, snapshot, question):
    prefix = lm.prefill_memory(snapshot, "You watch a robot's camera.")
    cached = lm.answer(prefix, question, max_new_tokens=24)
    uncached = lm.answer_uncached(snapshot, question, 24, "You watch a robot's camera.")
    assert len(cached.token_ids) > 1
    assert cached.token_ids == uncached.token_ids and cached.text == uncached.text
    assert prefix.num_tokens + cached.prompt_tokens == uncached.prompt_tokens


def test_answer_does_not_mutate_the_prefix(lm, snapshot):
    prefix = lm.prefill_memory(snapshot)
    before = [(k.clone(), v.clone()) for k, v in prefix.kv]
    first = lm.answer(prefix, "What is on the table?", max_new_tokens=12)
    lm.answer(prefix, "Something else entirely, much longer than the first question?", max_new_tokens=12)
    again = lm.answer(prefix, "What is on the table?", max_new_tokens=12)
    assert again.token_ids == first.token_ids
    assert all(k.equal(k0) and v.equal(v0) for (k, v), (k0, v0) in zip(prefix.kv, before, strict=True))
    assert all(k.shape[-2] == prefix.num_tokens for k, _ in prefix.kv)
    assert (prefix.snapshot_version, prefix.frames_seen) == (3, 6)


def test_streamed_pieces_make_the_text(lm, snapshot):
    pieces = []
    gen = lm.answer(lm.prefill_memory(snapshot), "Tell me more.", max_new_tokens=16, on_token=pieces.append)
    assert "".join(pieces) == gen.text
    assert len(gen.token_ids) == 16 and gen.ttft_s <= gen.total_s


def test_stops_at_end_of_turn(lm, snapshot, monkeypatch):
    prefix = lm.prefill_memory(snapshot)
    free = lm.answer(prefix, "Tell me more.", max_new_tokens=8)
    monkeypatch.setattr(lm, "stop_ids", lm.stop_ids | {free.token_ids[2]})
    stopped = lm.answer(prefix, "Tell me more.", max_new_tokens=8)
    assert stopped.token_ids == free.token_ids[:2]
    assert {322, 320} <= lm.stop_ids  # <|im_end|>, <|endoftext|>


def test_bfloat16_model_answers_from_float32_memory(tmp_path, frames):
    lm16 = load_model(write_tiny_checkpoint(tmp_path / "ckpt", "qwen2_5_vl"), dtype=torch.bfloat16)
    feats = lm16.encode_frames(frames[:2])
    assert feats.full.dtype == torch.bfloat16
    snap = snapshot_of(feats, frames_seen=2, dam_slots=(1,))
    snap.csm_features = snap.csm_features.float()
    prefix = lm16.prefill_memory(snap)
    assert prefix.kv[0][0].dtype == torch.bfloat16
    assert len(lm16.answer(prefix, "What is it?", max_new_tokens=3).token_ids) >= 1


def test_warm_up_sizes_the_fast_decoder_for_a_full_memory_and_changes_no_result(lm, snapshot, frames):
    """warm_up pays start-up costs only: the same features and answers after it, and with a
    FastDecoder a cache already sized for a full memory of 720x1280 frames."""
    prefix = lm.prefill_memory(snapshot)
    before = lm.answer(prefix, "What is it?", max_new_tokens=6)
    feats = lm.encode_frames(frames[:2])
    lm.warm_up(csm_slots=4, dam_frames=2, max_new_tokens=32)  # a 720x1280 frame: 240 DAM, 60 CSM tokens
    if lm.fast is not None:
        assert lm.fast.capacity >= 2 * 240 + 4 * 60 + 32
    after = lm.answer(prefix, "What is it?", max_new_tokens=6)
    assert after.token_ids == before.token_ids and len(before.token_ids) >= 1
    assert torch.equal(lm.encode_frames(frames[:2]).full, feats.full)
