"""Answer evidence (fvs_ros/model/evidence.py): the attention an answer paid to each memory block
equals the same quantity read from transformers' eager attention weights (output_attentions) on a
full forward of [prompt + answer], on the eager path, through FastDecoder, cached and uncached."""

import numpy as np
import pytest
import torch
from support.attention import QUESTION, reference_mass

from fvs_ros.memory import FlashMemory, MemoryConfig
from fvs_ros.model import load_model
from fvs_ros.model.evidence import evidence_layers
from fvs_ros.model.fast_decode import FastDecoder
from fvs_ros.model.tiny import write_tiny_checkpoint


@pytest.fixture(
    scope="module",
    params=[("flash_vstream", False), ("flash_vstream", True), ("qwen2_5_vl", True)],
    ids=["eager", "fast_decode", "qwen2_5_vl"],
)
def lm(request, tmp_path_factory):
    fmt, fast = request.param
    ckpt = write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", fmt, seed=1)
    return load_model(ckpt, fast_decode=fast)


@pytest.fixture(scope="module")
def snapshot(lm):
    """A real memory of 10 frames of three scenes, of the checkpoint's size (official: 4 centroids,
    2 DAM frames; Qwen2.5-VL: room for all 10)."""
    rng = np.random.default_rng(0)
    scenes = rng.integers(0, 256, (3, 112, 224, 3))
    frames = np.stack([scenes[i * 3 // 10] for i in range(10)])
    frames = np.clip(frames + rng.normal(0, 8, frames.shape), 0, 255).astype(np.uint8)
    memory = FlashMemory(MemoryConfig(**lm.memory_defaults))
    feats = lm.encode_frames(frames)
    snap = memory.update(feats.low, feats.full, 100.0 + np.arange(10) * 0.5, feats.full_hw)
    cfg = MemoryConfig(**lm.memory_defaults)
    assert len(snap.dam_slots) == min(10, cfg.dam_frames) and len(snap.csm_weights) == min(10, cfg.csm_slots)
    return snap


def check(lm, snapshot, gen):
    att = gen.attention
    assert att.rows in (len(gen.token_ids), len(gen.token_ids) + 1)
    assert att.layers == lm.evidence_layers
    ref, layout = reference_mass(lm, snapshot, gen.token_ids, att.rows, att.layers)
    assert att.layout == layout
    assert att.mass.shape == (layout.dam_blocks + layout.csm_blocks,)
    torch.testing.assert_close(att.mass, ref, atol=1e-5, rtol=1e-4)
    assert 0 < att.memory_fraction < 1
    assert float(att.shares().sum()) == pytest.approx(1.0)
    assert att.mass.max() > 1.05 * att.mass.min()  # blocks differ: a constant would not pass


def test_cached_answer_evidence_equals_eager_attention_weights(lm, snapshot):
    prefix = lm.prefill_memory(snapshot)
    gen = lm.answer(prefix, QUESTION, max_new_tokens=6, evidence=True)
    assert len(gen.token_ids) >= 2
    check(lm, snapshot, gen)
    assert lm.answer(prefix, QUESTION, max_new_tokens=6).attention is None  # only when asked


def test_uncached_answer_evidence_equals_eager_attention_weights(lm, snapshot):
    gen = lm.answer_uncached(snapshot, QUESTION, max_new_tokens=6, evidence=True)
    check(lm, snapshot, gen)
    cached = lm.answer(lm.prefill_memory(snapshot), QUESTION, max_new_tokens=6, evidence=True)
    torch.testing.assert_close(gen.attention.mass, cached.attention.mass, atol=1e-5, rtol=1e-4)


def test_evidence_over_several_layers(lm, snapshot, monkeypatch):
    layers = (0, 1)
    monkeypatch.setattr(lm, "evidence_layers", layers)
    if lm.fast is not None:
        monkeypatch.setattr(lm, "fast", FastDecoder(lm.llm, lm.lm_head, record_layers=layers))
    gen = lm.answer(lm.prefill_memory(snapshot), QUESTION, max_new_tokens=5, evidence=True)
    check(lm, snapshot, gen)


def test_evidence_layers_are_the_third_quarter():
    assert evidence_layers(28) == tuple(range(14, 21))
    assert evidence_layers(2) == (1,)
    assert evidence_layers(1) == (0,)
