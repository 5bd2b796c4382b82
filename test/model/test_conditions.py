"""Yes/no probabilities of conditions on a cached prefix (fvs_ros/model/conditions.py).

The batched path (all conditions packed into one prefill on the prefix) must give, for every
condition, the probability of a plain transformers forward over [prefix tokens + that condition's
prompt] alone, and (evidence) the attention per memory block that transformers' eager attention
weights give the last token of that prompt alone. CPU, float32: the eager path (block mask
through transformers) and FastDecoder (static cache, SDPA with the block mask); FlashAttention
on CUDA: test_video_lm_cuda.py (pytest -m cuda).
"""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from support.attention import reference_mass

from fvs_ros.model import load_model
from fvs_ros.model.conditions import condition_question, yes_no_tokens, yes_probability
from fvs_ros.model.fast_decode import FastDecoder, block_mask
from fvs_ros.model.tiny import write_tiny_checkpoint

CONDITIONS = [
    "a person is at the door",
    "Is the red toolbox on the table?",
    "smoke is visible",
    "the robot's gripper holds a cup — or a mug",
    "dark",
]


@pytest.fixture(scope="module", params=[False, True], ids=["eager", "fast_decode"])
def lm(request, tmp_path_factory):
    ckpt = write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", "flash_vstream", seed=3)
    return load_model(ckpt, fast_decode=request.param)


@pytest.fixture(scope="module")
def snapshot(lm):
    frames = np.random.default_rng(0).integers(0, 256, (6, 112, 224, 3), dtype=np.uint8)
    feats = lm.encode_frames(frames, frames_per_slot=2)
    n = feats.low.shape[0]
    return SimpleNamespace(
        csm_features=feats.low.float(),
        csm_weights=torch.ones(n),
        csm_times=torch.arange(n, dtype=torch.float64),
        dam_features=feats.full[[0, 2]],
        dam_slots=torch.tensor([0, 2]),
        frames_seen=n,
        version=1,
        full_hw=feats.full_hw,
    )


def reference(lm, snapshot, condition: str) -> float:
    """Independent computation: one plain transformers forward over the whole prompt of one condition."""
    inputs = lm.prompt_inputs(snapshot, condition_question(condition))
    return float(yes_probability(lm.logits(inputs)[-1:], yes_no_tokens(lm.tokenizer))[0])


def test_question_text():
    assert condition_question("a person is at the door") == "a person is at the door? Answer yes or no."
    assert condition_question("  Is it dark?? ") == "Is it dark? Answer yes or no."
    with pytest.raises(ValueError, match="empty"):
        condition_question(" ? ")


def test_yes_no_tokens_of_the_tiny_tokenizer(lm):
    """The tiny tokenizer spells words letter by letter: 'y'/'Y' start yes, 'n'/'N' start no, and the
    space that starts ' yes' and ' no' alike is dropped."""
    tok = lm.tokenizer
    tokens = yes_no_tokens(tok)
    assert sorted(tok.decode([i]) for i in tokens.yes) == ["Y", "y"]
    assert sorted(tok.decode([i]) for i in tokens.no) == ["N", "n"]


def test_yes_no_tokens_need_both_sides():
    class SameStart:  # every word starts with the same token: nothing tells yes from no
        def __call__(self, text, add_special_tokens=False):
            return SimpleNamespace(input_ids=[7, 8])

        def decode(self, ids):
            return "x"

    with pytest.raises(ValueError, match="no token that starts only a yes"):
        yes_no_tokens(SameStart())


def test_yes_probability_normalises_over_yes_and_no_only():
    tokens = SimpleNamespace(yes=(1, 2), no=(3,))
    logits = torch.tensor([[9.0, 0.0, 0.0, 0.0, 50.0], [0.0, 1.0, 1.0, 2.0, -3.0]])
    p = yes_probability(logits, tokens)
    assert p[0] == pytest.approx(2 / 3)  # exp(0)+exp(0) vs exp(0); the other tokens do not count
    assert p[1] == pytest.approx(2 * np.e / (2 * np.e + np.e**2))


def test_block_mask():
    m = block_mask(2, [2, 1])
    assert m.tolist() == [
        [True, True, True, False, False],
        [True, True, True, True, False],
        [True, True, False, False, True],
    ]


def test_batched_equals_independent(lm, snapshot):
    prefix = lm.prefill_memory(snapshot)
    kv_before = [(k.clone(), v.clone()) for k, v in prefix.kv]
    got = lm.score_conditions(prefix, CONDITIONS).probabilities
    want = [reference(lm, snapshot, c) for c in CONDITIONS]
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)
    assert len({round(p, 4) for p in want}) == len(want)  # distinct conditions, distinct probabilities
    # a subset, another order, one alone: each condition's probability does not depend on the others
    sub = lm.score_conditions(prefix, [CONDITIONS[3], CONDITIONS[0]]).probabilities
    np.testing.assert_allclose(sub, [want[3], want[0]], rtol=0, atol=2e-6)
    np.testing.assert_allclose(
        lm.score_conditions(prefix, [CONDITIONS[4]]).probabilities, [want[4]], rtol=0, atol=2e-6
    )
    for (k, v), (k0, v0) in zip(prefix.kv, kv_before, strict=True):  # the prefix is read, never written
        assert torch.equal(k, k0) and torch.equal(v, v0)
    assert lm.score_conditions(prefix, []).probabilities == []


def test_answers_still_match_after_scoring(lm, snapshot):
    """Scoring writes into the answers' cache area (FastDecoder): the next answer is unchanged."""
    prefix = lm.prefill_memory(snapshot)
    before = lm.answer(prefix, "What is there?", max_new_tokens=8, evidence=True)
    lm.score_conditions(prefix, CONDITIONS)
    lm.score_conditions(prefix, CONDITIONS, evidence=True)
    after = lm.answer(prefix, "What is there?", max_new_tokens=8, evidence=True)
    assert after.token_ids == before.token_ids
    assert torch.equal(after.attention.mass, before.attention.mass)


@pytest.mark.parametrize("layers", [None, (0, 1)], ids=["evidence_layers", "two_layers"])
def test_evidence_equals_eager_attention_of_each_condition_alone(lm, snapshot, layers, monkeypatch):
    """Each condition's attention per memory block, from the packed forward that gives its
    probability, equals transformers' eager attention weights (output_attentions) of the last
    prompt token of that condition asked alone on the same memory (test_evidence.reference_mass
    with no answer token)."""
    if layers is not None:
        monkeypatch.setattr(lm, "evidence_layers", layers)
        if lm.fast is not None:
            monkeypatch.setattr(lm, "fast", FastDecoder(lm.llm, lm.lm_head, record_layers=layers))
    prefix = lm.prefill_memory(snapshot)
    scores = lm.score_conditions(prefix, CONDITIONS, evidence=True)
    plain = lm.score_conditions(prefix, CONDITIONS)
    assert plain.attention == () and scores.probabilities == plain.probabilities
    masses = []
    for condition, att in zip(CONDITIONS, scores.attention, strict=True):
        question = condition_question(condition)
        ref, layout = reference_mass(lm, snapshot, [], 1, lm.evidence_layers, question=question)
        assert att.layout == layout and att.rows == 1 and att.layers == lm.evidence_layers
        torch.testing.assert_close(att.mass, ref, atol=1e-5, rtol=1e-4)
        assert 0 < att.memory_fraction < 1 and float(att.shares().sum()) == pytest.approx(1.0)
        assert att.mass.max() > 1.05 * att.mass.min()  # blocks differ: a constant would not pass
        masses.append(att.mass)
    # each condition its own: a row that saw the other prompts (or another row) would differ
    assert min(float((a - b).abs().max()) for i, a in enumerate(masses) for b in masses[i + 1 :]) > 1e-4
    one = lm.score_conditions(prefix, [CONDITIONS[2]], evidence=True).attention[0]
    torch.testing.assert_close(one.mass, masses[2], atol=1e-6, rtol=1e-5)
