"""FastDecoder on a CUDA GPU (pytest -m cuda): FlashAttention-2 varlen (split and plain prefix),
CUDA graphs for the question prefill and the decode step, chunked prefix builds and evidence
recording, against eager transformers on the same weights.

A random Qwen2-VL language model of 3 layers, 4 query / 2 KV heads of head_dim 64 or 128 (the 7B
has 128), a memory-like prefix of ~1.5k tokens on a (t, h, w) grid. bf16 results are held to
support/precision.py's rule (as accurate against float32 as eager bf16 is); float32 on the GPU
(SDPA, graphs) must give eager's logits up to float32 rounding.
"""

import copy

import pytest
import torch
from support.attention import eager_attention
from support.precision import assert_as_accurate_as_eager, no_tf32, rel_err
from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

from fvs_ros.model.evidence import MemoryLayout
from fvs_ros.model.fast_decode import FastDecoder, eager_generate, eager_prefill

pytestmark = pytest.mark.cuda

FRAMES, GRID_H, GRID_W, HEAD = 6, 8, 30, 20  # 1440 memory tokens after 20 text tokens
STEPS = 12


def text_config(head_dim: int) -> dict:
    half = head_dim // 2
    return {
        "vocab_size": 1024,
        "hidden_size": 4 * head_dim,
        "intermediate_size": 8 * head_dim,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rope_theta": 1000000.0,
        "rope_scaling": {"type": "mrope", "mrope_section": [half // 4, 3 * half // 8, 3 * half // 8]},
        "max_position_embeddings": 32768,
        "initializer_range": 0.02,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
    }


@pytest.fixture(scope="module", params=[64, 128], ids=["head_dim64", "head_dim128"])
def models(request):
    """(float32, bf16) copies of one random model on the GPU: each (llm, lm_head)."""
    no_tf32()
    torch.manual_seed(request.param)
    vision = {"depth": 1, "embed_dim": 32, "hidden_size": 4 * request.param, "num_heads": 2}
    config = Qwen2VLConfig.from_dict(
        {**text_config(request.param), "model_type": "qwen2_vl", "vision_config": vision}
    )
    config._attn_implementation = "sdpa"
    m32 = Qwen2VLForConditionalGeneration(config).eval().cuda()
    m16 = copy.deepcopy(m32).to(torch.bfloat16)
    return (m32.model.language_model, m32.lm_head), (m16.model.language_model, m16.lm_head)


def prompt(llm, seed=0):
    """[HEAD text tokens, FRAMES x GRID memory tokens on sparse times, 3 text tokens] in float32:
    embeds [1, P, hidden], positions [3, 1, P], the next text position, the memory's layout."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(3, llm.config.vocab_size, (HEAD + 3,), generator=g).cuda()
    n_vis = FRAMES * GRID_H * GRID_W
    scale = torch.linspace(0.02, 0.2, FRAMES).repeat_interleave(GRID_H * GRID_W)[:, None]  # frames differ
    vis = (torch.randn(n_vis, llm.config.hidden_size, generator=g) * scale).cuda()
    emb = llm.embed_tokens(text).float()
    embeds = torch.cat([emb[:HEAD], vis, emb[HEAD:]])[None]
    t = torch.arange(FRAMES).repeat_interleave(GRID_H * GRID_W) * 2
    r = torch.arange(GRID_H).repeat_interleave(GRID_W).repeat(FRAMES)
    c = torch.arange(GRID_W).repeat(GRID_H * FRAMES)
    end = HEAD + max(int(t.max()), GRID_H - 1, GRID_W - 1) + 1
    positions = torch.cat(
        [
            torch.arange(HEAD).expand(3, -1),
            torch.stack([t, r, c]) + HEAD,
            torch.arange(end, end + 3).expand(3, -1),
        ],
        dim=1,
    )[:, None].cuda()
    block = GRID_H * GRID_W  # any split of the memory into blocks: 4 "DAM" frames, 8 "CSM" quarters
    layout = MemoryLayout(HEAD, FRAMES - 2, block, 8, block // 4)
    return embeds, positions, end + 3, layout


def question(llm, n, start, seed):
    g = torch.Generator().manual_seed(1000 + seed)
    ids = torch.randint(3, llm.config.vocab_size, (n,), generator=g).cuda()
    return llm.embed_tokens(ids).float()[None], torch.arange(start, start + n).expand(3, 1, n).cuda()


def cast(llm, *tensors):
    dtype = llm.embed_tokens.weight.dtype
    return [t.to(dtype) for t in tensors]


def eager_forced_logits(llm, lm_head, q_embeds, q_pos, next_pos, prefix, forced):
    """Eager transformers' logits at each of len(forced) steps, feeding `forced` (teacher forcing)."""
    seen = []
    (e,) = cast(llm, q_embeds)
    pkv = None if prefix is None else prefix
    eager_generate(
        llm,
        lm_head,
        e,
        q_pos,
        next_pos,
        len(forced),
        prefix_kv=pkv,
        force_tokens=forced,
        on_logits=seen.append,
    )
    return torch.stack(seen)


@pytest.fixture(scope="module")
def case(models):
    """The prompt, eager prefixes in float32 and bf16, and 4 questions (a bucket, padded, the
    largest bucket, beyond the buckets) with the eager bf16 greedy tokens each is forced along."""
    (llm32, head32), (llm16, head16) = models
    embeds, positions, next_pos, layout = prompt(llm32)
    prefix32 = eager_prefill(llm32, embeds, positions)
    prefix16 = eager_prefill(llm16, *cast(llm16, embeds), positions)
    questions = []
    for seed, n in [(1, 8), (2, 29), (3, 256), (4, 300)]:
        q_embeds, q_pos = question(llm32, n, next_pos, seed)
        forced = eager_generate(
            llm16, head16, *cast(llm16, q_embeds), q_pos, next_pos + n, STEPS, prefix_kv=prefix16
        )
        forced = (forced + [7] * STEPS)[:STEPS]  # eager may stop early on eos: keep STEPS forced steps
        questions.append((n, q_embeds, q_pos, next_pos + n, forced))
    return embeds, positions, layout, prefix32, prefix16, questions


@pytest.mark.parametrize("splits", [8, 0], ids=["split_prefix", "plain"])
def test_flash_graphs_track_eager_logits(models, case, splits):
    """Questions on a cached prefix through FlashAttention varlen (the prefix in 8 chunks merged by
    log-sum-exp, or one causal sequence) and the graphs (prefill bucket, decode step): each step's
    logits as accurate as eager bf16's, the prefill graphed up to the largest bucket, every decode
    step after the first replayed from the graph."""
    (llm32, head32), (llm16, head16) = models
    embeds, positions, layout, prefix32, prefix16, questions = case
    fast = FastDecoder(llm16, head16, splits=splits)
    assert fast.attention == "flash" and fast.graphs
    assert fast.splits == splits  # the split's self-check passed: the split kernel is the one in use
    if splits:
        assert fast.split_check_error < 2e-2
    plen = embeds.shape[1]
    for n, q_embeds, q_pos, nxt, forced in questions:
        truth = eager_forced_logits(llm32, head32, q_embeds, q_pos, nxt, prefix32, forced)
        eager = eager_forced_logits(llm16, head16, q_embeds, q_pos, nxt, prefix16, forced)
        before = fast.decode_replays
        got = fast.generate(
            *cast(llm16, q_embeds), q_pos, nxt, 0, prefix_kv=prefix16, prefix_len=plen,
            force_tokens=forced, collect_logits=True,
        )  # fmt: skip
        assert got.graphed == (n <= max(fast.buckets)), f"question of {n} tokens"
        assert fast.decode_replays - before == STEPS - 1
        assert_as_accurate_as_eager(torch.stack(got.logits), eager, truth, f"logits, question of {n} tokens")
        assert rel_err(truth, eager) < 0.05  # bf16 through 3 layers: the reference itself is meaningful


def test_split_and_plain_kernels_agree(models, case):
    """The flash-decoding split of the prefix computes the same attention as the plain kernel."""
    (llm32, head32), (llm16, head16) = models
    embeds, _, _, prefix32, prefix16, questions = case
    n, q_embeds, q_pos, nxt, forced = questions[1]
    runs = [
        FastDecoder(llm16, head16, splits=s).generate(
            *cast(llm16, q_embeds),
            q_pos,
            nxt,
            0,
            prefix_kv=prefix16,
            prefix_len=embeds.shape[1],
            force_tokens=forced,
            collect_logits=True,
        )  # fmt: skip
        for s in (8, 0)
    ]
    truth = eager_forced_logits(llm32, head32, q_embeds, q_pos, nxt, prefix32, forced)
    eager = eager_forced_logits(llm16, head16, q_embeds, q_pos, nxt, prefix16, forced)
    split, plain = (torch.stack(r.logits) for r in runs)
    assert rel_err(split, plain) <= 2.0 * rel_err(eager, truth) + 2.0**-8


def test_float32_graphs_give_eager_logits(models, case):
    """float32 on the GPU (SDPA over the static cache, graphs): the same logits as eager up to
    float32 rounding, and so the same greedy tokens."""
    (llm32, head32), _ = models
    embeds, _, _, prefix32, _, questions = case
    fast = FastDecoder(llm32, head32)
    assert fast.attention == "sdpa" and fast.graphs  # FlashAttention needs 16-bit weights
    for n, q_embeds, q_pos, nxt, forced in questions[:3]:
        truth = eager_forced_logits(llm32, head32, q_embeds, q_pos, nxt, prefix32, forced)
        got = fast.generate(
            q_embeds, q_pos, nxt, 0, prefix_kv=prefix32, prefix_len=embeds.shape[1],
            force_tokens=forced, collect_logits=True,
        )  # fmt: skip
        assert got.graphed
        assert rel_err(torch.stack(got.logits), truth) < 1e-4, f"question of {n} tokens"
        greedy = fast.generate(q_embeds, q_pos, nxt, STEPS, prefix_kv=prefix32, prefix_len=embeds.shape[1])
        ref = eager_generate(llm32, head32, q_embeds, q_pos, nxt, STEPS, prefix_kv=prefix32)
        assert greedy.tokens == ref and len(set(ref)) > 1


def test_uncached_prompt_through_the_fast_path(models, case):
    """No prefix: the whole prompt prefilled through the static cache (FlashAttention, beyond the
    graph buckets), then graphed decode steps. The graphs are captured by reserve(), as
    VideoLM.warm_up does (a fresh decoder captures them with its first bucketed tail only:
    H100 run, benchmarks/gpu_notes.md)."""
    (llm32, head32), (llm16, head16) = models
    embeds, positions, _, _, _, questions = case
    n, q_embeds, q_pos, nxt, forced = questions[0]
    full, full_pos = torch.cat([embeds, q_embeds], dim=1), torch.cat([positions, q_pos], dim=2)
    fast = FastDecoder(llm16, head16)
    fast.reserve(prefix_tokens=full.shape[1], max_new_tokens=STEPS)
    got = fast.generate(*cast(llm16, full), full_pos, nxt, 0, force_tokens=forced, collect_logits=True)
    assert not got.graphed and fast.decode_replays == STEPS - 1
    truth = eager_forced_logits(llm32, head32, full, full_pos, nxt, None, forced)
    eager = eager_forced_logits(llm16, head16, full, full_pos, nxt, None, forced)
    assert_as_accurate_as_eager(torch.stack(got.logits), eager, truth, "logits, uncached prompt")


@pytest.mark.parametrize("attention", ["auto", "flash", "sdpa"])
def test_chunked_prefix_build_gives_eager_kv(models, case, attention):
    """prefill_steps in chunks of 256 tokens (each chunk attending to all keys before it; "auto":
    SDPA for the first chunk, FlashAttention varlen after) gives the eager prefill's keys and values,
    and a question answered on the built prefix tracks eager's logits."""
    (llm32, head32), (llm16, head16) = models
    embeds, positions, _, prefix32, prefix16, questions = case
    fast = FastDecoder(llm16, head16, prefill_attention=attention)
    steps = fast.prefill_steps(*cast(llm16, embeds), positions, chunk_tokens=256)
    chunks = 0
    while True:
        try:
            next(steps)
            chunks += 1
        except StopIteration as stop:
            built = stop.value
            break
    assert chunks + 1 == -(-embeds.shape[1] // 256)
    for layer, ((k, v), (k16, v16), (k32, v32)) in enumerate(zip(built, prefix16, prefix32, strict=True)):
        assert k.shape == k16.shape
        assert_as_accurate_as_eager(k, k16, k32, f"layer {layer} keys")
        assert_as_accurate_as_eager(v, v16, v32, f"layer {layer} values")
    n, q_embeds, q_pos, nxt, forced = questions[1]
    got = fast.generate(
        *cast(llm16, q_embeds), q_pos, nxt, 0, prefix_kv=built, prefix_len=embeds.shape[1],
        force_tokens=forced, collect_logits=True,
    )  # fmt: skip
    truth = eager_forced_logits(llm32, head32, q_embeds, q_pos, nxt, prefix32, forced)
    eager = eager_forced_logits(llm16, head16, q_embeds, q_pos, nxt, prefix16, forced)
    assert_as_accurate_as_eager(torch.stack(got.logits), eager, truth, "logits on the built prefix")


def reference_block_mass(llm, embeds, positions, layout, layers, forced, start):
    """Mean over layers, heads and the token-choosing rows of transformers' eager attention weights
    summed over each memory block: one forward of [prompt + question + forced[:-1]]."""
    (e,) = cast(llm, embeds)
    fed = llm.embed_tokens(torch.tensor(forced[:-1], device=e.device))[None]
    pos = torch.arange(start, start + len(forced) - 1, device=e.device).expand(3, 1, -1)
    with torch.inference_mode(), eager_attention(llm):
        out = llm(
            inputs_embeds=torch.cat([e, fed], dim=1),
            position_ids=torch.cat([positions, pos], 2),
            output_attentions=True,
        )
    first = embeds.shape[1] - 1
    sizes = [layout.dam_tokens] * layout.dam_blocks + [layout.csm_tokens] * layout.csm_blocks
    mass = torch.zeros(len(sizes), dtype=torch.float64)
    for layer in layers:
        w = out.attentions[layer][0, :, first : first + len(forced)].double()  # [H, rows, L]
        lo = layout.start
        for b, size in enumerate(sizes):
            mass[b] += w[..., lo : lo + size].sum(-1).mean().cpu()
            lo += size
    return mass / len(layers)


def test_evidence_recorded_in_the_graphs_equals_eager_attention(models, case):
    """The queries the graphs record (layers 1 and 2) give each memory block's attention mass, over
    the question's last row and every decode step, as transformers' eager attention weights do."""
    (llm32, _), (llm16, head16) = models
    embeds, positions, layout, _, prefix16, questions = case
    layers = (1, 2)
    fast = FastDecoder(llm16, head16, record_layers=layers)
    n, q_embeds, q_pos, nxt, forced = questions[1]
    got = fast.generate(
        *cast(llm16, q_embeds), q_pos, nxt, 0, prefix_kv=prefix16, prefix_len=embeds.shape[1],
        force_tokens=forced, evidence=layout,
    )  # fmt: skip
    assert got.graphed and got.rows == STEPS and got.block_mass.shape == (layout.num_blocks,)
    full, full_pos = torch.cat([embeds, q_embeds], dim=1), torch.cat([positions, q_pos], dim=2)
    truth = reference_block_mass(llm32, full, full_pos, layout, layers, forced, nxt)
    eager = reference_block_mass(llm16, full, full_pos, layout, layers, forced, nxt)
    assert_as_accurate_as_eager(got.block_mass, eager, truth, "block mass")
    assert truth.max() > 1.05 * truth.min()  # blocks differ: a constant would not pass
