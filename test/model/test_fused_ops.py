"""Fused small kernels (fvs_ros/model/fused_ops.py) and the fused layer loop of FastDecoder.

On a CPU the Triton kernels do not run, so what is checked here is (1) the reference ops, the
specification the kernels implement, equal transformers' own modules bit for bit; (2) the fused
layer loop (residual adds moved into the next norm, the last layer's MLP skipped in prefix
builds, the final norm on the chosen rows) gives exactly what transformers' layers give;
(3) which path a device gets, and why. Where Triton is installed, the kernels themselves run in
Triton's interpreter against the reference; on the GPU, benchmarks/bench_gpu.py checks them
against eager (teacher-forced bf16 logits).
"""

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from test_fast_decode import TEXT, VISION, multimodal_prompt, question
from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

from fvs_ros.common.steps import drain
from fvs_ros.model import fused_ops
from fvs_ros.model.fast_decode import FastDecoder, eager_generate, eager_prefill


def build(dtype=torch.float32, **text):
    torch.manual_seed(0)
    config = Qwen2VLConfig.from_dict({**TEXT, **text, "model_type": "qwen2_vl", "vision_config": VISION})
    config._attn_implementation = "sdpa"
    m = Qwen2VLForConditionalGeneration(config).eval().to(dtype)
    return m.model.language_model, m.lm_head


@pytest.fixture(scope="module")
def model():
    return build()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_ops_are_transformers_numerics(model, dtype):
    """Same rounding steps as Qwen2RMSNorm, `residual + hidden`, and act_fn(gate) * up: equal bits."""
    llm, _ = model
    layer = llm.layers[0]
    norm = type(layer.input_layernorm)(64, eps=layer.input_layernorm.variance_epsilon).to(dtype)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(64, generator=g) * 0.3 + 1)
    x = (torch.randn(2, 7, 64, generator=g) * 3).to(dtype)
    r = torch.randn(2, 7, 64, generator=g).to(dtype)
    eps = norm.variance_epsilon
    with torch.inference_mode():
        assert torch.equal(fused_ops.REFERENCE.rms_norm(x, norm.weight, eps), norm(x))
        y, total = fused_ops.REFERENCE.add_rms_norm(x, r, norm.weight, eps)
        assert torch.equal(total, r + x) and torch.equal(y, norm(r + x))
        gate, up = (
            (torch.randn(5, 128, generator=g) * 4).to(dtype),
            torch.randn(5, 128, generator=g).to(dtype),
        )
        assert torch.equal(fused_ops.REFERENCE.silu_mul(gate, up), layer.mlp.act_fn(gate) * up)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_loop_gives_transformers_layers_results(dtype):
    """fused='reference' runs the fused loop with the reference ops: the same logits (teacher-forced),
    the same greedy tokens and the same prefix K/V as the layers' own forward, bit for bit."""
    llm, lm_head = build(dtype)
    embeds, positions, next_pos = multimodal_prompt(llm)
    embeds = embeds.to(dtype)
    P = embeds.shape[1]
    plain = FastDecoder(llm, lm_head, buckets=(4, 8), fused="off")
    fused = FastDecoder(llm, lm_head, buckets=(4, 8), fused="reference")
    assert plain.fused_ops is None and fused.fused_ops is fused_ops.REFERENCE
    with torch.inference_mode():
        prefix = eager_prefill(llm, embeds, positions)
        for chunk in (None, 5):  # one pass, and chunks (a later chunk attends the keys before it)
            kv_plain = list(plain.prefill_steps(embeds, positions, chunk))
            want = drain(plain.prefill_steps(embeds, positions, chunk))
            got = drain(fused.prefill_steps(embeds, positions, chunk))
            assert kv_plain == [None] * len(kv_plain)
            for (k0, v0), (k1, v1) in zip(want, got, strict=True):  # the last layer's K/V too
                assert torch.equal(k0, k1) and torch.equal(v0, v1)
        for seed, n in [(1, 3), (2, 7), (3, 12)]:
            qe, qp = question(llm, n, next_pos, seed)
            qe = qe.to(dtype)
            ref = plain.generate(
                qe, qp, next_pos + n, 12, prefix_kv=prefix, prefix_len=P, collect_logits=True
            )
            out = fused.generate(
                qe,
                qp,
                next_pos + n,
                12,
                prefix_kv=prefix,
                prefix_len=P,
                force_tokens=ref.tokens,
                collect_logits=True,
            )
            assert out.tokens == ref.tokens
            assert all(torch.equal(a, b) for a, b in zip(ref.logits, out.logits, strict=True))
            if dtype == torch.float32:
                assert ref.tokens == eager_generate(llm, lm_head, qe, qp, next_pos + n, 12, prefix_kv=prefix)


@torch.inference_mode()
def test_set_fused_switches_the_loop(model):
    """set_fused changes the path of the next forward (the bench compares both in one process) and
    refuses a mode the device cannot run, keeping the path it had."""
    llm, lm_head = model
    embeds, positions, next_pos = multimodal_prompt(llm)
    prefix = eager_prefill(llm, embeds, positions)
    fast = FastDecoder(llm, lm_head, buckets=(4, 8), fused="reference")
    qe, qp = question(llm, 3, next_pos, 5)
    want = fast.generate(
        qe, qp, next_pos + 3, 6, prefix_kv=prefix, prefix_len=embeds.shape[1], collect_logits=True
    )
    fast.set_fused("off")
    assert fast.fused_ops is None and fast.fused_reason == "off"
    got = fast.generate(
        qe, qp, next_pos + 3, 6, prefix_kv=prefix, prefix_len=embeds.shape[1], collect_logits=True
    )
    assert got.tokens == want.tokens and all(
        torch.equal(a, b) for a, b in zip(got.logits, want.logits, strict=True)
    )
    with pytest.raises(ValueError, match="cannot run"):
        fast.set_fused("triton")
    assert fast.fused_ops is None  # unchanged


def test_selection_on_cpu(model):
    llm, lm_head = model
    cpu = torch.device("cpu")
    ops, why = fused_ops.select_ops("auto", cpu, torch.float32, llm.layers)
    assert ops is None and ("CUDA" in why or "Triton" in why)
    auto = FastDecoder(llm, lm_head)  # the default: transformers' modules on a CPU, and why
    assert auto.fused_ops is None and auto.fused_reason == why
    with pytest.raises(ValueError, match="cannot run"):
        FastDecoder(llm, lm_head, fused="triton")
    with pytest.raises(ValueError, match="fused must be one of"):
        FastDecoder(llm, lm_head, fused="yes")
    assert fused_ops.select_ops("off", cpu, torch.float32, llm.layers) == (None, "off")


def test_layers_the_loop_cannot_rebuild_keep_transformers_path():
    llm, lm_head = build(hidden_act="gelu")
    ops, why = fused_ops.select_ops("auto", torch.device("cuda"), torch.bfloat16, llm.layers)
    assert ops is None and "not SiLU" in why
    with pytest.raises(ValueError, match="not SiLU"):
        FastDecoder(llm, lm_head, fused="reference")
    llm, lm_head = build()  # float32 norm weights under a bf16 decoder: the kernels would round otherwise
    with pytest.raises(ValueError, match="norm weights are not"):
        fused_ops.select_ops("reference", torch.device("cpu"), torch.bfloat16, llm.layers)


INTERPRETED = """
import torch
from fvs_ros.model import fused_ops as f
g = torch.Generator().manual_seed(0)
for dtype in (torch.float32, torch.bfloat16):
    worst = 0.0
    for rows, n in ((3, 64), (2, 100)):  # a power of two, and a masked tail
        x = (torch.randn(rows, n, generator=g) * 3).to(dtype)
        r = torch.randn(rows, n, generator=g).to(dtype)
        w = (torch.randn(n, generator=g) * 0.3 + 1).to(dtype)
        gate, up = (torch.randn(5000, generator=g) * 4).to(dtype), torch.randn(5000, generator=g).to(dtype)
        pairs = [(f._triton_rms_norm(x, w, 1e-6), f.REFERENCE.rms_norm(x, w, 1e-6)),
                 *zip(f._triton_add_rms_norm(x, r, w, 1e-6), f.REFERENCE.add_rms_norm(x, r, w, 1e-6)),
                 (f._triton_silu_mul(gate, up), f.REFERENCE.silu_mul(gate, up))]
        for got, want in pairs:
            assert got.dtype == want.dtype and got.shape == want.shape
            rel = (got.float() - want.float()).abs() / want.float().abs().clamp_min(1e-3)
            worst = max(worst, float(rel.max()))
    print(str(dtype), worst)
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed (CI, CPU)")
def test_triton_kernels_in_interpreter_match_reference():
    """The kernels' code, run by Triton's CPU interpreter, against the reference ops. float32: equal up
    to the order of the mean's sum. bf16: the interpreter rounds bf16 toward zero where the GPU (and
    torch) round to nearest, at each of the two rounding points (up to an ulp each, against half an
    ulp each): at most 3 ulps (3 x 2^-7 relative); the GPU check in benchmarks/bench_gpu.py holds the
    compiled kernels to 2 ulps on at most 1% of the elements."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(INTERPRETED)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    worst = dict(line.rsplit(" ", 1) for line in out.stdout.strip().splitlines())
    assert float(worst["torch.float32"]) <= 1e-6, worst
    assert float(worst["torch.bfloat16"]) <= 3 * 2**-7, worst
