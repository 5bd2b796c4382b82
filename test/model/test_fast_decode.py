"""The static-cache fast path (fvs_ros/model/fast_decode.py) gives the eager greedy tokens.

CPU: no CUDA graphs, SDPA with a boolean mask over the static cache. The GPU path (graphs,
FlashAttention varlen, chunked prefix builds, evidence): test_fast_decode_cuda.py (pytest -m cuda).
"""

import pytest
import torch
from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

from fvs_ros.model.fast_decode import FastDecoder, eager_generate, eager_prefill

TEXT = {
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,  # 2 query heads per KV head: exercises the grouped-query path
    "num_key_value_heads": 2,
    "rope_theta": 1000000.0,
    "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},  # head_dim 16
    "max_position_embeddings": 4096,
    "initializer_range": 0.2,  # wide logits: greedy ties are unlikely
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}
VISION = {"depth": 1, "embed_dim": 16, "hidden_size": 64, "num_heads": 2}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = Qwen2VLConfig.from_dict({**TEXT, "model_type": "qwen2_vl", "vision_config": VISION})
    config._attn_implementation = "sdpa"
    m = Qwen2VLForConditionalGeneration(config).eval()
    return m.model.language_model, m.lm_head


def multimodal_prompt(llm, n_text=5, frames=3, h=2, w=3, seed=0):
    """[text, 'memory' tokens on a (t, h, w) grid, text]: embeds [1, P, hidden], positions [3, 1, P], next
    pos."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(3, 256, (n_text,), generator=g)
    n_vis = frames * h * w
    vis = torch.randn(n_vis, llm.config.hidden_size, generator=g) * 0.5
    embeds = torch.cat([llm.embed_tokens(text[:3]), vis, llm.embed_tokens(text[3:])])[None]
    t = torch.arange(frames).repeat_interleave(h * w) * 2  # sparse times, like memory slots
    r = torch.arange(h).repeat_interleave(w).repeat(frames)
    c = torch.arange(w).repeat(h * frames)
    vis_pos = torch.stack([t, r, c]) + 3
    end = 3 + max(int(t.max()), h - 1, w - 1) + 1
    after = torch.arange(end, end + n_text - 3).expand(3, -1)
    positions = torch.cat([torch.arange(3).expand(3, -1), vis_pos, after], dim=1)[:, None]
    return embeds, positions, end + n_text - 3


def question(llm, n, start, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 256, (n,), generator=g)
    return llm.embed_tokens(ids)[None], torch.arange(start, start + n).expand(3, 1, n)


@torch.inference_mode()
def test_fast_matches_eager_on_cached_prefix(model):
    llm, lm_head = model
    embeds, positions, next_pos = multimodal_prompt(llm)
    prefix = eager_prefill(llm, embeds, positions)
    before = [(k.clone(), v.clone()) for k, v in prefix]
    fast = FastDecoder(llm, lm_head, buckets=(4, 8))
    assert fast.attention == "sdpa" and not fast.graphs
    for seed, n in [(1, 3), (2, 7), (3, 12), (4, 1)]:  # in a bucket, padded, beyond the buckets, one token
        q_embeds, q_pos = question(llm, n, next_pos, seed)
        ref = eager_generate(llm, lm_head, q_embeds, q_pos, next_pos + n, 16, prefix_kv=prefix)
        got = fast.generate(q_embeds, q_pos, next_pos + n, 16, prefix_kv=prefix, prefix_len=embeds.shape[1])
        assert got.tokens == ref, f"question of {n} tokens"
        assert len(set(ref)) > 1  # a meaningful sequence, not one repeated token
    for (k, v), (k0, v0) in zip(prefix, before, strict=True):  # the prefix is read, never written
        assert torch.equal(k, k0) and torch.equal(v, v0)


@torch.inference_mode()
def test_prefix_switch_and_no_prefix(model):
    llm, lm_head = model
    fast = FastDecoder(llm, lm_head, buckets=(8,))
    for seed in (0, 5):  # a new memory prefix replaces the old one in the static cache
        embeds, positions, next_pos = multimodal_prompt(llm, frames=2 + seed, seed=seed)
        prefix = eager_prefill(llm, embeds, positions)
        q_embeds, q_pos = question(llm, 6, next_pos, seed)
        ref = eager_generate(llm, lm_head, q_embeds, q_pos, next_pos + 6, 12, prefix_kv=prefix)
        got = fast.generate(q_embeds, q_pos, next_pos + 6, 12, prefix_kv=prefix, prefix_len=embeds.shape[1])
        assert got.tokens == ref
        # the same prompt without a prefix cache (full prefill through the fast path)
        full = torch.cat([embeds, q_embeds], dim=1)
        full_pos = torch.cat([positions, q_pos], dim=2)
        got_full = fast.generate(full, full_pos, next_pos + 6, 12)
        assert got_full.tokens == ref


def cached_question(model, q_len, seed, max_new_tokens):
    """A memory prefix (eager KV), a question of q_len tokens after it and eager's greedy answer."""
    llm, lm_head = model
    embeds, positions, next_pos = multimodal_prompt(llm)
    prefix = eager_prefill(llm, embeds, positions)
    q_embeds, q_pos = question(llm, q_len, next_pos, seed)
    ref = eager_generate(llm, lm_head, q_embeds, q_pos, next_pos + q_len, max_new_tokens, prefix_kv=prefix)
    return prefix, embeds.shape[1], q_embeds, q_pos, next_pos + q_len, ref


@torch.inference_mode()
def test_stop_tokens_and_callback(model):
    prefix, plen, q_embeds, q_pos, next_pos, ref = cached_question(model, q_len=4, seed=9, max_new_tokens=10)
    stop = ref[3]
    fast = FastDecoder(*model)
    seen = []
    got = fast.generate(
        q_embeds,
        q_pos,
        next_pos,
        10,
        stop_ids=[stop],
        prefix_kv=prefix,
        prefix_len=plen,
        on_token=seen.append,
    )
    assert got.tokens == ref[: ref.index(stop)] == seen
    assert got.ttft_s <= got.total_s

    class Cancel(Exception):
        pass

    def cancel(token):
        raise Cancel

    with pytest.raises(Cancel):
        fast.generate(q_embeds, q_pos, next_pos, 10, prefix_kv=prefix, prefix_len=plen, on_token=cancel)
    # the decoder stays usable after a cancelled generation
    again = fast.generate(q_embeds, q_pos, next_pos, 10, prefix_kv=prefix, prefix_len=plen)
    assert again.tokens == ref


@torch.inference_mode()
def test_forced_tokens_give_per_step_predictions(model):
    llm, lm_head = model
    prefix, plen, q_embeds, q_pos, next_pos, ref = cached_question(model, q_len=5, seed=11, max_new_tokens=12)
    fast = FastDecoder(llm, lm_head, buckets=(8,))
    got = fast.generate(
        q_embeds, q_pos, next_pos, 99, stop_ids=[ref[2]], prefix_kv=prefix, prefix_len=plen, force_tokens=ref
    )
    assert got.tokens == ref  # forcing the eager sequence reproduces it step by step; stops ignored
    other = list(reversed(ref))
    forced = fast.generate(
        q_embeds, q_pos, next_pos, 0, prefix_kv=prefix, prefix_len=plen, force_tokens=other
    ).tokens
    assert forced[0] == ref[0] and len(forced) == len(other)
    for i in range(
        1, len(other)
    ):  # prediction i follows other[:i]: the eager loop fed the same tokens agrees
        assert forced[i] == eager_forced(llm, lm_head, q_embeds, q_pos, next_pos, prefix, other[:i])


def eager_forced(llm, lm_head, q_embeds, q_pos, next_pos, prefix, fed):
    """Eager greedy choice after the question and the tokens `fed` (one full eager pass, no cache reuse)."""
    ids = torch.tensor(fed)
    e = torch.cat([q_embeds, llm.embed_tokens(ids)[None]], dim=1)
    p = torch.cat([q_pos, torch.arange(next_pos, next_pos + len(fed)).expand(3, 1, -1)], dim=2)
    return eager_generate(llm, lm_head, e, p, next_pos + len(fed), 1, prefix_kv=prefix)[0]


def test_eager_attention_setting_is_restored(model):
    llm, lm_head = model
    fast = FastDecoder(llm, lm_head)
    embeds, positions, next_pos = multimodal_prompt(llm)
    fast.generate(embeds, positions, next_pos, 2)
    assert llm.config._attn_implementation == "sdpa"
    assert all(layer.self_attn.config._attn_implementation == "sdpa" for layer in llm.layers)


def test_graphs_need_cuda(model):
    llm, lm_head = model
    with pytest.raises(ValueError):
        FastDecoder(llm, lm_head, graphs=True)
    with pytest.raises(ValueError):
        FastDecoder(llm, lm_head, attention="flash")
