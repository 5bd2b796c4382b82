"""8-bit weights on the GPU (issue 22): fp8 / int8 against bf16 on the Flash-VStream-Qwen-7B shapes.

    python benchmarks/bench_quant.py                  # one H100/H200, about 3-4 minutes
    python benchmarks/bench_quant.py --tiny           # tiny shapes, CPU ok: a dry run of every path

One process, one random bf16 model (bench_gpu.build_model: ViT 675M + 7.6B LLM), in this order so
that only one mode's weights are on the GPU while its engine runs:
1. bf16: prefix rebuild (10,821 tokens, one pass and 1024-token chunks, FastDecoder as the
   engine runs it), TTFT of a 30-token question on the cached prefix (p50/p99), decode tokens/s
   (64 tokens), greedy tokens along which every mode is then teacher-forced, the ViT batch
   (8 two-frame slots of 336x560, full + low resolution) with its blocks in each mode, and the real
   StreamEngine (bench_gpu.run_engine) for its peak GPU memory, beside budget.estimate's figure.
2. The LLM's linear layers quantized to fp8 and int8 (timed: what configure adds), bf16 dropped.
3. fp8, then int8: the same figures, and teacher-forced logits along bf16's tokens (the 30
   question tokens and 32 answer tokens): max |logit difference| / max |bf16 logit|, top-1
   agreement, KL(bf16 || mode) mean and max.
Results: a table at the end, JSON in $OUT/bench_quant.json (or --out).
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import os
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_gpu as bg  # noqa: E402  (the 7B-shaped model, prompt and engine run shared with bench_gpu)

from fvs_ros.common.steps import drain  # noqa: E402
from fvs_ros.memory import MemoryConfig  # noqa: E402
from fvs_ros.model import quant  # noqa: E402
from fvs_ros.model.budget import estimate  # noqa: E402
from fvs_ros.model.checkpoint import QWEN2_VL, CheckpointConfig  # noqa: E402
from fvs_ros.model.fast_decode import FastDecoder  # noqa: E402

QUESTION_TOKENS, ANSWER_TOKENS, DECODE_TOKENS = 30, 32, 64
RESULTS: dict = {"modes": {}}


def timed(device, fn, reps=3):
    """Median seconds of fn() (synchronized), and its last result."""
    times, out = [], None
    for _ in range(reps):
        bg.sync(device)
        t = time.perf_counter()
        out = fn()
        bg.sync(device)
        times.append(time.perf_counter() - t)
    return float(np.median(times)), out


@torch.inference_mode()
def llm_figures(model, device, tiny, mode, reps):
    """Rebuild, TTFT, decode of one mode through a FastDecoder built for the current modules."""
    llm, lm_head = model.model.language_model, model.lm_head
    embeds, positions, next_pos = bg.prompt(llm, tiny, device, lm_head.weight.dtype)
    fast = FastDecoder(llm, lm_head)
    P = embeds.shape[1]
    fast.reserve(P + 64, DECODE_TOKENS)
    one, kv = timed(device, lambda: drain(fast.prefill_steps(embeds, positions, None)))
    chunked, _ = timed(device, lambda: drain(fast.prefill_steps(embeds, positions, 1024)))
    if mode != "bf16" and quant._triton is not None:  # the same rebuild with PyTorch ops only
        kernels, quant._triton = quant._triton, None
        try:
            plain, _ = timed(device, lambda: drain(fast.prefill_steps(embeds, positions, None)))
        finally:
            quant._triton = kernels
        bg.row(f"[{mode}] rebuild one pass without the Triton kernels", f"{1e3 * plain:.1f} ms")
    qe, qp = bg.question(llm, QUESTION_TOKENS, next_pos, 0, device)
    ttft, rates = [], []
    for _ in range(reps):
        out = fast.generate(qe, qp, next_pos + QUESTION_TOKENS, 1, prefix_kv=kv, prefix_len=P)
        ttft.append(out.ttft_s)
    for _ in range(3):
        out = fast.generate(qe, qp, next_pos + QUESTION_TOKENS, DECODE_TOKENS, prefix_kv=kv, prefix_len=P)
        rates.append((len(out.tokens) - 1) / max(out.total_s - out.ttft_s, 1e-9))
    res = {
        "rebuild_one_pass_ms": 1e3 * one,
        "rebuild_chunked_1024_ms": 1e3 * chunked,
        "ttft_p50_ms": 1e3 * bg.pct(ttft, 50),
        "ttft_p99_ms": 1e3 * bg.pct(ttft, 99),
        "decode_tok_s": float(np.median(rates)),
        "prefix_tokens": P,
    }
    bg.row(
        f"[{mode}] rebuild one pass / 1024-token chunks ({P} tokens)",
        f"{res['rebuild_one_pass_ms']:.1f} / {res['rebuild_chunked_1024_ms']:.1f} ms",
    )
    bg.row(
        f"[{mode}] TTFT cached prefix p50/p99; decode",
        f"{res['ttft_p50_ms']:.2f} / {res['ttft_p99_ms']:.2f} ms; {res['decode_tok_s']:.1f} tok/s",
    )
    return res, (embeds, positions, next_pos, qe, qp)


@torch.inference_mode()
def greedy_tokens(model, inputs, n):
    """bf16's greedy answer after [prefix + question], eager (the tokens every mode is forced along)."""
    from transformers import DynamicCache

    llm, lm_head = model.model.language_model, model.lm_head
    embeds, positions, next_pos, qe, qp = inputs
    cache = DynamicCache(config=llm.config)
    cache_kw = "cache" if "cache" in inspect.signature(type(llm).forward).parameters else "past_key_values"
    x, pos = torch.cat([embeds, qe], 1), torch.cat([positions, qp], 2)
    tokens, position = [], next_pos + qe.shape[1]
    for _ in range(n):
        hidden = llm(inputs_embeds=x, position_ids=pos, use_cache=True, **{cache_kw: cache}).last_hidden_state
        tokens.append(int(lm_head(hidden[0, -1]).argmax()))
        x = llm.embed_tokens(torch.tensor([[tokens[-1]]], device=embeds.device))
        pos = torch.full((3, 1, 1), position, device=embeds.device)
        position += 1
    return tokens


@torch.inference_mode()
def forced_logits(model, inputs, tokens):
    """float32 logits [Q + A, vocab] at the question's and answer's positions, teacher-forced."""
    llm, lm_head = model.model.language_model, model.lm_head
    embeds, positions, next_pos, qe, qp = inputs
    ids = torch.tensor(tokens[:-1], device=embeds.device)
    start = next_pos + qe.shape[1]
    ap = torch.arange(start, start + len(ids), device=embeds.device).expand(3, 1, len(ids))
    x = torch.cat([embeds, qe, llm.embed_tokens(ids)[None]], 1)
    hidden = llm(inputs_embeds=x, position_ids=torch.cat([positions, qp, ap], 2)).last_hidden_state
    rows = qe.shape[1] + len(ids)
    return lm_head(hidden[0, -rows:]).float().cpu()


def fidelity(ref: torch.Tensor, got: torch.Tensor, mode: str) -> dict:
    logp, logq = torch.log_softmax(ref.double(), -1), torch.log_softmax(got.double(), -1)
    kl = (logp.exp() * (logp - logq)).sum(-1)
    top2 = ref.topk(2, -1).values
    res = {
        "max_rel_logit_diff": float((got - ref).abs().max() / ref.abs().max()),
        "top1_agreement": float((got.argmax(-1) == ref.argmax(-1)).float().mean()),
        "kl_mean": float(kl.mean()),
        "kl_max": float(kl.max()),
        "bf16_top2_gap_median": float((top2[:, 0] - top2[:, 1]).median()),
        "positions": int(ref.shape[0]),
    }
    bg.row(
        f"[{mode}] teacher-forced vs bf16 ({res['positions']} positions): "
        "max rel logit diff, top-1, KL mean/max",
        f"{res['max_rel_logit_diff']:.4f}, {100 * res['top1_agreement']:.1f} %, "
        f"{res['kl_mean']:.2e} / {res['kl_max']:.2e}",
        "target top-1 >= 99 % (fp8)",
    )
    return res


@torch.inference_mode()
def vit_figures(model, device, tiny, reps):
    """8 two-frame slots through the ViT (transformers forward) with its blocks in each mode."""
    from fvs_ros.model.preprocess import slot_patches

    visual = model.model.visual
    h, w = (112, 224) if tiny else (336, 560)
    frames = torch.from_numpy(np.stack(bg.synthetic_frames(16, h, w))).to(device)
    patches = slot_patches(frames, frames_per_slot=2)
    (fh, fw), (lh, lw) = patches.full_hw, patches.low_hw
    grid = torch.tensor([[8, fh, fw], [8, lh, lw]], device=device)
    pixels = torch.cat([patches.full, patches.low]).to(device, model.lm_head.weight.dtype)

    def run():
        return visual(pixels, grid_thw=grid).last_hidden_state

    res, ref = {}, None
    names = quant.targets(model, "int8", ("vision",))
    originals = {n: model.get_submodule(n) for n in names}
    for mode in ("bf16", "fp8", "int8"):
        if mode != "bf16":
            for n, m in originals.items():
                quant.replace_module(model, n, quant.quantize_linear(m, mode))
        seconds = bg.bench_cuda(run, device, reps=reps, warmup=2)
        out = run().float()
        ref = out if ref is None else ref
        res[mode] = {
            "slots_per_s": 8 / seconds,
            "rel_diff_vs_bf16": float((out - ref).norm() / ref.norm()),
        }
        bg.row(
            f"[{mode}] ViT, 8 two-frame slots {h}x{w} (transformers forward)",
            f"{res[mode]['slots_per_s']:.1f} slots/s, features rel. diff vs bf16 "
            f"{res[mode]['rel_diff_vs_bf16']:.4f}",
        )
        for n, m in originals.items():
            quant.replace_module(model, n, m)
    return res


def engine_figures(model, device, tiny, mode, args, shapes):
    """The real StreamEngine (bench_gpu.run_engine) and its peak GPU memory, beside the estimate."""
    lm = bg.make_video_lm(model, tiny, fast=True)
    res = bg.run_engine(
        lm,
        device,
        tiny,
        label=mode,
        prefix_cache=True,
        bank_capacity=120,
        checkpoints=[args.engine_frames],
        realtime_s=args.realtime_s,
        ask_reps=args.ask_reps,
        frames_per_slot=2,
    )
    ckpt = CheckpointConfig(QWEN2_VL, model.config, lm.memory_defaults)
    memory = MemoryConfig(**lm.memory_defaults, bank_capacity=120)
    # run_engine's settings (max_batch 16, FastDecoder's default 1024 new tokens), bf16's shapes
    b = estimate(
        shapes,
        ckpt,
        model.lm_head.weight.dtype,
        mode,
        memory,
        max_pixels=lm.max_pixels,
        max_new_tokens=1024,
        system_prompt="You are a helpful assistant.",
        fast_decode=device.type == "cuda",
    )
    weights = sum(
        t.untyped_storage().nbytes() for t in {id(t): t for t in model.state_dict().values()}.values()
    )
    cp = next(iter(res["checkpoints"].values()), {})
    out = {
        "peak_gib": cp.get("peak_gib"),
        "weights_gib": bg.gib(weights),
        "estimate_gib": bg.gib(b.total),
        "estimate_parts_gib": {
            "weights": bg.gib(b.weights),
            "memory": bg.gib(b.memory),
            "prefix_kv": bg.gib(b.prefix_kv),
            "activations": bg.gib(b.activations),
        },
        "ttft_p50_ms": bg.pct(cp.get("ttft_ms", []), 50),
        "errors": res.get("errors"),
    }
    bg.row(
        f"[{mode}] engine peak GPU memory (weights {out['weights_gib']:.2f} GiB) vs budget estimate",
        f"{out['peak_gib'] or 0:.2f} GiB vs {out['estimate_gib']:.2f} GiB; engine TTFT p50 "
        f"{out['ttft_p50_ms']:.1f} ms, errors {out['errors']}",
        "target peak <= 13 GiB (fp8, int8)",
    )
    return out


def guarded(label, fn, *args):
    """fn(*args), or None after printing its traceback: one failing figure keeps the others."""
    try:
        return fn(*args)
    except Exception:  # noqa: BLE001 - a benchmark reports every failure and goes on
        bg.log(f"  [{label}] FAILED:\n{traceback.format_exc()}")
        RESULTS.setdefault("failures", []).append(f"{label}: {traceback.format_exc().splitlines()[-1]}")
        return None


@torch.inference_mode()
def kernel_checks(device):
    """The Triton kernels against the PyTorch ops they replace, on random data (CUDA only)."""
    if device.type != "cuda" or quant._triton is None:
        return None
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(37, 3584, device=device, generator=g).to(torch.bfloat16) * 3
    q, s = quant._triton.fp8_rows(x, quant.FP8_MAX)
    q_ref, s_ref = quant.fp8_rows(x)
    w = torch.randn(18944, 3584, device=device, generator=g) * 0.02
    wq, ws = quant.quantize_weight(w, "int8")
    ref = x[:5].double() @ quant.dequantize(wq, ws, torch.float64).T
    got = quant._triton.int8_weight_only_mm(x[:5], wq, ws).double()
    res = {
        "fp8_rows_scale_equal": bool(torch.equal(s, s_ref)),
        "fp8_rows_values_equal_fraction": float((q.float() == q_ref.float()).float().mean()),
        "int8_kernel_rel_err": float((got - ref).norm() / ref.norm()),
    }
    bg.row("Triton kernels vs PyTorch ops", json.dumps(res))
    return res


def free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def write(out):
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_quant.json").write_text(json.dumps(RESULTS, indent=1))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (dry run of the code paths; CPU ok)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--modes", default="fp8,int8")
    ap.add_argument("--reps", type=int, default=30, help="questions timed per TTFT figure")
    ap.add_argument("--engine-frames", type=int, default=300, help="frames into memory before questions")
    ap.add_argument("--realtime-s", type=float, default=3.0, help="engine: seconds of 30 fps camera first")
    ap.add_argument("--ask-reps", type=int, default=10)
    ap.add_argument("--engines", default="bf16,fp8,int8", help="modes whose engine peak is measured")
    ap.add_argument("--no-vit", action="store_true", help="skip the ViT rows")
    ap.add_argument("--budget-s", type=float, default=480.0, help="stop starting engine runs after this")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    bg.DEADLINE[0] = time.monotonic() + args.budget_s
    if device.type == "cuda":
        RESULTS["gpu"] = torch.cuda.get_device_name(device)
        RESULTS["capability"] = list(torch.cuda.get_device_capability(device))
    RESULTS["torch"] = torch.__version__
    bg.log(f"device {RESULTS.get('gpu', device)}, torch {torch.__version__}")
    modes = [m for m in args.modes.split(",") if m]
    for m in modes:
        quant.check_mode(m, device, dtype)

    RESULTS["kernel_checks"] = guarded("kernel checks", kernel_checks, device)
    model = bg.build_model(args.tiny, device, dtype)
    shapes = {n: list(t.shape) for n, t in model.state_dict().items()}  # the "checkpoint" of the budget
    bf16, inputs = llm_figures(model, device, args.tiny, "bf16", args.reps)
    tokens = greedy_tokens(model, inputs, ANSWER_TOKENS)
    ref = forced_logits(model, inputs, tokens)
    engines = set(args.engines.split(","))
    if not args.no_vit:
        RESULTS["vit"] = guarded("vit", vit_figures, model, device, args.tiny, 10)
    if "bf16" in engines:
        bf16["engine"] = guarded(
            "bf16 engine", engine_figures, model, device, args.tiny, "bf16", args, shapes
        )
    RESULTS["modes"]["bf16"] = bf16
    write(args.out)

    names = quant.targets(model, "int8")
    eight_bit = {}
    for mode in modes:
        seconds, layers = timed(
            device,
            lambda m=mode: {n: quant.quantize_linear(model.get_submodule(n), m) for n in names},
            reps=1,
        )
        eight_bit[mode] = {n: m.to("cpu") for n, m in layers.items()} if len(modes) > 1 else layers
        del layers
        RESULTS["modes"][mode] = {"quantize_s": seconds, "layers": len(names)}
        bg.row(f"[{mode}] quantize {len(names)} LLM linear layers (what configure adds)", f"{seconds:.2f} s")
    for n in names:  # bf16's linear layers leave the GPU for good
        quant.replace_module(model, n, torch.nn.Identity())
    free(device)

    for mode in modes:
        for n, m in eight_bit.pop(mode).items():
            quant.replace_module(model, n, m.to(device))
        free(device)
        res = {}
        res["fidelity"] = guarded(
            f"{mode} fidelity", lambda m=mode: fidelity(ref, forced_logits(model, inputs, tokens), m)
        )
        res["llm"] = (
            guarded(f"{mode} llm", llm_figures, model, device, args.tiny, mode, args.reps) or [None]
        )[0]
        if mode in engines and bg.time_left() > 60:
            res["engine"] = guarded(
                f"{mode} engine", engine_figures, model, device, args.tiny, mode, args, shapes
            )
        RESULTS["modes"][mode].update(res)
        write(args.out)
        for n in names:
            quant.replace_module(model, n, torch.nn.Identity())
        free(device)

    write(args.out)
    bg.log("\n== summary ==")
    for metric, value, target in bg.ROWS:
        bg.log(f"{metric}: {value}" + (f"  ({target})" if target else ""))


if __name__ == "__main__":
    main()
