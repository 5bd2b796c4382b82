"""VideoLM's GPU paths (pytest -m cuda) against eager transformers on the same weights: FastVision's
CUDA graphs vs transformers' ViT forward, packed conditions through FastDecoder (FlashAttention)
vs each condition alone, and answer evidence recorded in the graphs vs eager attention weights.

A random flash_vstream checkpoint wider than the CPU tests' (LLM head_dim 128 as the 7B's, ViT
head_dim 64 as Qwen2-VL's ViT; bf16), loaded three times: bf16 with the fast paths, bf16 eager
and float32 eager (the truth of support/precision.py's tolerance rule).
"""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from support.attention import QUESTION, reference_mass
from support.precision import assert_as_accurate_as_eager, no_tf32, rel_err

from fvs_ros.model import load_model
from fvs_ros.model.conditions import condition_question, yes_no_tokens, yes_probability
from fvs_ros.model.fast_vision import FastVision
from fvs_ros.model.preprocess import slot_patches
from fvs_ros.model.tiny import write_tiny_checkpoint

pytestmark = pytest.mark.cuda

TEXT = {
    "hidden_size": 512,
    "intermediate_size": 1024,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_window_layers": 4,
    "initializer_range": 0.02,  # as real checkpoints: the tiny shape's 0.1 makes bf16 attention chaotic
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},  # head_dim 128
}
VISION = {"embed_dim": 128, "num_heads": 2, "hidden_size": 512}  # ViT head_dim 64
CONDITIONS = [
    "a person is at the door",
    "Is the red toolbox on the table?",
    "smoke is visible",
    "the robot's gripper holds a cup — or a mug",
    "dark",
]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_checkpoint(
        tmp_path_factory.mktemp("wide") / "ckpt", "flash_vstream", seed=5, text=TEXT, vision=VISION
    )


@pytest.fixture(scope="module")
def models(ckpt):
    """(bf16 with FastDecoder, bf16 eager, float32 eager) on the GPU."""
    no_tf32()
    fast = load_model(ckpt, dtype=torch.bfloat16, device="cuda", fast_decode=True, fast_vision=False)
    eager = load_model(ckpt, dtype=torch.bfloat16, device="cuda", fast_decode=False, fast_vision=False)
    truth = load_model(ckpt, dtype=torch.float32, device="cuda", fast_decode=False, fast_vision=False)
    assert fast.fast is not None and fast.fast.attention == "flash"
    return fast, eager, truth


def frames(n, h=224, w=336, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)).cuda()


def test_fast_vision_graphs_track_the_transformers_vit(ckpt, models):
    """FastVision's captured graphs (padded to buckets 2 and 4, replayed) give transformers' own ViT
    forward's features, one- and two-frame slots, as accurately as eager bf16; above the largest
    bucket it runs eagerly."""
    _, eager, truth = models
    lm16 = load_model(ckpt, dtype=torch.bfloat16, device="cuda", fast_vision=False)
    graphed = FastVision(lm16.visual, graphs=True, buckets=(2, 4))
    batch = frames(6, seed=2)
    for fps, counts in ((1, (1, 3, 3)), (2, (2, 6, 6))):  # 1 slot (bucket 2), 3 slots (bucket 4), replayed
        for n in counts:
            full, low, full_hw, low_hw = graphed.encode(batch[:n], fps)
            ref16, ref32 = (m.vit(slot_patches(batch[:n], fps)) for m in (eager, truth))
            assert (full_hw, low_hw) == (ref16.full_hw, ref16.low_hw) and full.dtype == torch.bfloat16
            assert_as_accurate_as_eager(full, ref16.full, ref32.full, f"full-res, {n} frames of {fps}")
            assert_as_accurate_as_eager(low, ref16.low, ref32.low, f"low-res, {n} frames of {fps}")
    assert graphed.graph_replays == 6
    before = graphed.graph_replays
    assert graphed.encode(frames(5))[0].shape[0] == 5 and graphed.graph_replays == before  # above the buckets


@pytest.fixture(scope="module")
def snapshot(models):
    """8 slots of two 224x448 frames (float32 features): 4 DAM frames and 8 centroids, 768 memory
    tokens, as every model of `models` reads it."""
    truth = models[2]
    feats = truth.encode_frames(frames(16, 224, 448, seed=7).cpu().numpy(), frames_per_slot=2)
    n = feats.low.shape[0]
    return SimpleNamespace(
        csm_features=feats.low.float(),
        csm_weights=torch.ones(n),
        csm_times=torch.arange(n, dtype=torch.float64),
        dam_features=feats.full[[0, 2, 5, 7]],
        dam_slots=torch.tensor([0, 2, 5, 7]),
        frames_seen=n,
        version=1,
        full_hw=feats.full_hw,
    )


def alone(lm, snapshot, condition: str) -> float:
    """P(yes) of one condition from one plain transformers forward over its whole prompt."""
    inputs = lm.prompt_inputs(snapshot, condition_question(condition))
    return float(yes_probability(lm.logits(inputs)[-1:], yes_no_tokens(lm.tokenizer))[0])


def test_packed_conditions_equal_each_condition_alone(models, snapshot):
    """All conditions in one packed FlashAttention forward on the prefix (built by the static-cache
    prefill) give each one's P(yes) of a transformers forward of that condition alone; so does
    each condition scored alone through the fast path."""
    fast, eager, truth = models
    prefix = fast.prefill_memory(snapshot)
    got = torch.tensor(fast.score_conditions(prefix, CONDITIONS).probabilities)
    ref16 = torch.tensor([alone(eager, snapshot, c) for c in CONDITIONS])
    ref32 = torch.tensor([alone(truth, snapshot, c) for c in CONDITIONS])
    assert_as_accurate_as_eager(got, ref16, ref32, "P(yes), packed")
    single = torch.tensor([fast.score_conditions(prefix, [c]).probabilities[0] for c in CONDITIONS])
    assert_as_accurate_as_eager(single, ref16, ref32, "P(yes), one condition at a time")
    assert len(set(ref32.tolist())) == len(CONDITIONS)  # distinct prompts, distinct answers


def test_packed_condition_evidence_equals_eager_attention(models, snapshot):
    """Each condition's attention per memory block from the packed forward equals transformers'
    eager attention weights of its prompt's last token asked alone, as accurately as eager bf16."""
    fast, eager, truth = models
    scores = fast.score_conditions(fast.prefill_memory(snapshot), CONDITIONS, evidence=True)
    for condition, att in zip(CONDITIONS, scores.attention, strict=True):
        q = condition_question(condition)
        ref16, layout = reference_mass(eager, snapshot, [], 1, fast.evidence_layers, question=q)
        ref32, _ = reference_mass(truth, snapshot, [], 1, fast.evidence_layers, question=q)
        assert att.layout == layout and att.rows == 1
        assert_as_accurate_as_eager(att.mass, ref16, ref32, f"block mass of {condition!r}")
        assert ref32.max() > 1.05 * ref32.min()


def test_answer_evidence_through_the_graphs_equals_eager_attention(models, snapshot):
    """An answer through FastDecoder (prefix built in the static cache, question prefill and decode
    graphs) reports the attention per memory block that eager attention weights give for its own
    tokens fed back, as accurately as eager bf16."""
    fast, eager, truth = models
    decode_before = fast.fast.decode_replays
    gen = fast.answer(fast.prefill_memory(snapshot), QUESTION, max_new_tokens=8, evidence=True)
    att = gen.attention
    assert len(gen.token_ids) >= 2 and fast.fast.decode_replays > decode_before
    ref16, layout = reference_mass(eager, snapshot, gen.token_ids, att.rows, att.layers)
    ref32, _ = reference_mass(truth, snapshot, gen.token_ids, att.rows, att.layers)
    assert att.layout == layout
    assert_as_accurate_as_eager(att.mass, ref16, ref32, "answer block mass")
    assert rel_err(ref16, ref32) < 0.1
