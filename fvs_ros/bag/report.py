"""Evaluation report: one JSON file (everything), a Markdown summary and a latency plot (PNG).

The Markdown and the plot are rendered from the JSON summary, so the three always agree. Each
answer's evidence frames are written as JPEG files under evidence/ and shown in the Markdown,
with the memory view at the end of the replay (<stem>_memory_view.png) when there is one.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from fvs_ros.bag.watching import render_watch

REPORT_VERSION = 1


def stats(values: Iterable[Optional[float]]) -> dict:
    """n, mean, p50, p95, max of the non-None values (None fields when there are none)."""
    v = np.array([x for x in values if x is not None and math.isfinite(x)], dtype=float)
    if v.size == 0:
        return {"n": 0, "mean": None, "p50": None, "p95": None, "max": None}
    return {
        "n": int(v.size),
        "mean": float(v.mean()),
        "p50": float(np.percentile(v, 50)),
        "p95": float(np.percentile(v, 95)),
        "max": float(v.max()),
    }


def summarize(rows: list[dict], issues: list[dict], frames: dict, timing: Optional[dict] = None) -> dict:
    """The summary block of the report from the per-question rows."""
    answered = [r for r in rows if r["status"] == "answered"]
    scored = [r for r in answered if r.get("score") is not None]
    by_type = {}
    for kind in ("mc", "short", "open"):
        rs = [r for r in rows if r["type"] == kind]
        sc = [r for r in rs if r["status"] == "answered" and r.get("score") is not None]
        entry = {
            "questions": len(rs),
            "answered": sum(r["status"] == "answered" for r in rs),
            "scored": len(sc),
            "correct": sum(bool(r.get("correct")) for r in sc),
            "accuracy": (sum(bool(r.get("correct")) for r in sc) / len(sc)) if sc else None,
        }
        if kind == "short":
            ex = [r for r in sc if r.get("exact") is not None]
            entry["exact_accuracy"] = (sum(bool(r["exact"]) for r in ex) / len(ex)) if ex else None
            entry["contains_accuracy"] = (sum(bool(r["contains"]) for r in ex) / len(ex)) if ex else None
        by_type[kind] = entry
    cmd = [r for r in scored if r.get("scored_by") == "command"]
    correct = sum(bool(r.get("correct")) for r in scored)
    return {
        "questions": len(rows) + len(issues),
        "asked": len(rows) - sum(r["status"] == "skipped" for r in rows),
        "answered": len(answered),
        "failed": sum(r["status"] == "failed" for r in rows),
        "skipped": sum(r["status"] == "skipped" for r in rows) + len(issues),
        "scored": len(scored),
        "correct": correct,
        "accuracy": correct / len(scored) if scored else None,
        "mean_command_score": (sum(r["score"] for r in cmd) / len(cmd)) if cmd else None,
        "by_type": by_type,
        "latency_s": {
            "ttft": stats(r.get("ttft_s") for r in answered),
            "total": stats(r.get("total_s") for r in answered),
            "memory_lag": stats(r.get("memory_lag_s") for r in answered),
            **(
                {"round_trip": stats(r.get("round_trip_s") for r in answered)}
                if any(r.get("round_trip_s") is not None for r in answered)
                else {}
            ),
        },
        "frames": frames,
        **({"timing": timing} if timing else {}),
    }


def build_report(
    *,
    mode: str,
    bag: dict,
    questions_file: str,
    config: dict,
    rows: list[dict],
    issues: list[dict],
    frames: dict,
    timing: Optional[dict] = None,
    started: str = "",
    wall_s: Optional[float] = None,
    watch: Optional[dict] = None,
) -> dict:
    """watch: scores of watched conditions (fvs_ros/bag/watching.py), when the question file has any."""
    report = {
        "fvs_ros_bag_report": REPORT_VERSION,
        "mode": mode,
        "started": started,
        "wall_s": wall_s,
        "bag": bag,
        "questions_file": questions_file,
        "config": config,
        "summary": summarize(rows, issues, frames, timing),
        "questions": rows,
        "input_errors": issues,
    }
    if watch is not None:
        report["watch"] = watch
    return report


# ----------------------------------------------------------------------------- rendering


def _f(x, digits=3, unit="") -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}{unit}"
    return f"{x}{unit}"


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _ms(x) -> str:
    return "-" if x is None else f"{1000 * x:.1f}"


def _cell(text, limit=80) -> str:
    s = "" if text is None else " ".join(str(text).split())
    s = "".join(c if c.isprintable() else "\ufffd" for c in s)  # random models emit control characters
    if len(s) > limit:
        s = s[: limit - 1] + "…"
    return s.replace("|", "\\|")


def render_markdown(report: dict, plot_name: Optional[str] = None) -> str:
    s = report["summary"]
    cfg = report["config"]
    bag = report["bag"]
    lines = [f"# fvs_ros bag evaluation ({report['mode']} mode)", ""]
    lines += [
        f"- bag: `{bag.get('path')}` topic `{bag.get('topic')}` "
        f"({bag.get('msgtype')}, {bag.get('count')} frames, "
        f"{_f(bag.get('duration_s'), 2)} s)",
        f"- questions: `{report['questions_file']}`",
        f"- model: `{cfg.get('model', '-')}`" + (f", rate {cfg['rate']}" if "rate" in cfg else ""),
        f"- memory slots: {cfg.get('frames_per_slot', '-')} frame(s) each (2 = the trained layout)",
        f"- started: {report.get('started', '')}, wall time {_f(report.get('wall_s'), 1)} s",
        "",
    ]
    lines += [
        "## Accuracy",
        "",
        "| questions | answered | failed | skipped | scored | correct | accuracy |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        f"| {s['questions']} | {s['answered']} | {s['failed']} | {s['skipped']} | {s['scored']} | "
        f"{s['correct']} | {_pct(s['accuracy'])} |",
        "",
    ]
    lines += [
        "| type | questions | answered | scored | correct | accuracy | exact | contains |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for kind, e in s["by_type"].items():
        lines.append(
            f"| {kind} | {e['questions']} | {e['answered']} | {e['scored']} | {e['correct']} | "
            f"{_pct(e['accuracy'])} | {_pct(e.get('exact_accuracy'))} | {_pct(e.get('contains_accuracy'))} |"
        )
    if s.get("mean_command_score") is not None:
        lines.append(f"\nMean scoring-command score: {s['mean_command_score']:.3f}")
    lines += [
        "",
        "## Latency (ms)",
        "",
        "| measure | n | p50 | p95 | max | mean |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, st in s["latency_s"].items():
        lines.append(
            f"| {name} | {st['n']} | {_ms(st['p50'])} | "
            f"{_ms(st['p95'])} | {_ms(st['max'])} | {_ms(st['mean'])} |"
        )
    lines += [
        "",
        "## Frames",
        "",
        "| " + " | ".join(s["frames"]) + " |",
        "|" + "---:|" * len(s["frames"]),
        "| " + " | ".join(_f(v) for v in s["frames"].values()) + " |",
    ]
    if s.get("timing"):
        t = s["timing"]
        lines += [
            "",
            "## Replay timing (ms late against the recorded schedule)",
            "",
            "| what | n | p50 | p95 | max |",
            "|---|---:|---:|---:|---:|",
        ]
        for name in ("frames_late_s", "questions_late_s"):
            if name in t:
                st = t[name]
                lines.append(
                    f"| {name.replace('_late_s', '')} | {st['n']} | "
                    f"{_ms(st['p50'])} | {_ms(st['p95'])} | {_ms(st['max'])} |"
                )
        extra = {k: v for k, v in t.items() if not isinstance(v, dict)}
        if extra:
            lines += ["", ", ".join(f"{k}: {_f(v)}" for k, v in extra.items())]
    if plot_name:
        lines += ["", f"![latency against stream time]({plot_name})"]
    if report.get("watch"):
        lines += render_watch(report["watch"])
    lines += [
        "",
        "## Questions",
        "",
        "| id | t (s) | status | frames seen | memory lag (s) | ttft (ms) | total (ms) | score | answer "
        "| reference |",
        "|---|---:|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in report["questions"]:
        ref = r.get("reference")
        if r["type"] == "mc" and r.get("reference_letter"):
            ref = r["reference_letter"]
        status = r["status"] if r["status"] == "answered" else f"{r['status']}: {_cell(r.get('error'), 60)}"
        lines.append(
            f"| {_cell(r['id'], 30)} | {_f(r.get('time'), 2)} | {status} | {_f(r.get('frames_seen'))} | "
            f"{_f(r.get('memory_lag_s'), 2)} | {_ms(r.get('ttft_s'))} | {_ms(r.get('total_s'))} | "
            f"{_f(r.get('score'), 2)} | "
            f"{_cell(r.get('answer'))} | {_cell(ref, 40)} |"
        )
    lines += _evidence_lines(report)
    if report.get("files", {}).get("memory_view"):
        lines += [
            "",
            "## Memory at the end of the replay",
            "",
            f"![memory view]({report['files']['memory_view']})",
        ]
    if report["input_errors"]:
        lines += ["", "## Input errors (questions not asked)", ""]
        for e in report["input_errors"]:
            where = f"{e['source']}:{e['line']}" if e.get("line") else e["source"]
            lines.append(f"- `{where}`: {e['message']}")
    return "\n".join(lines) + "\n"


def _evidence_lines(report: dict) -> list[str]:
    """Per answered question: the moments of the stream its answer attended to most."""
    rows = [r for r in report["questions"] if r["status"] == "answered" and r.get("evidence")]
    if not rows:
        return []
    lines = ["", "## Evidence (the moments each answer attended to most)", ""]
    for r in rows:
        lines += [f"**{_cell(r['id'], 30)}** (t {_f(r.get('time'), 2)} s): {_cell(r.get('answer'))}", ""]
        for e in r["evidence"]:
            at = _f(e["stream_s"], 2)
            if e["kind"] == "detail":
                what = f"detail frame at {at} s"
            else:
                first, last = (_f(t, 2) for t in e["span_stream_s"])
                what = f"context of {e['weight']} frames, {first}-{last} s, nearest frame {at} s"
            image = f" ![{e['kind']} {at} s]({e['image']})" if e.get("image") else ""
            lines.append(f"- {_pct(e['share'])} {what}{image}")
        lines.append("")
    return lines


def _write_evidence_images(rows: list[dict], out: Path) -> None:
    """Move each row's evidence JPEG bytes (evidence_jpeg) into files under out/evidence/."""
    for r in rows:
        jpegs = r.pop("evidence_jpeg", None) or []
        for rank, (e, data) in enumerate(zip(r.get("evidence", []), jpegs, strict=False)):
            if data:
                name = f"evidence/{re.sub(r'[^A-Za-z0-9_.-]', '_', str(r['id']))}_{rank}.jpg"
                (out / "evidence").mkdir(exist_ok=True)
                (out / name).write_bytes(data)
                e["image"] = name


def render_plot(report: dict, path: Path) -> int:
    """Latency (total and time to first token) against stream time; returns the number of points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["questions"] if r.get("time") is not None and r["status"] != "skipped"]
    ok = [r for r in rows if r["status"] == "answered"]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    colors = [
        "tab:green" if r.get("correct") is True else "tab:red" if r.get("correct") is False else "tab:gray"
        for r in ok
    ]
    t = [r["time"] for r in ok]
    ax.scatter(
        t,
        [r["total_s"] for r in ok],
        c=colors,
        marker="o",
        label="total (green correct, red wrong, grey unscored)",
        zorder=3,
    )
    ax.scatter(
        t, [r["ttft_s"] for r in ok], c=colors, marker="^", alpha=0.6, label="time to first token", zorder=3
    )
    if any(r.get("round_trip_s") is not None for r in ok):
        ax.scatter(
            t,
            [r.get("round_trip_s") for r in ok],
            marker="x",
            color="tab:blue",
            label="service round trip",
            zorder=2,
        )
    failed = [r for r in rows if r["status"] != "answered"]
    if failed:
        ax.scatter(
            [r["time"] for r in failed],
            [0] * len(failed),
            marker="x",
            color="black",
            label="failed",
            zorder=4,
        )
    ax.set_xlabel("stream time (s)")
    ax.set_ylabel("latency (s)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    seen = [(r["time"], r["frames_seen"]) for r in ok if r.get("frames_seen") is not None]
    if seen:
        ax2.step(
            [x for x, _ in seen],
            [y for _, y in seen],
            where="post",
            color="tab:purple",
            alpha=0.5,
            label="frames seen",
        )
        ax2.set_ylabel("frames seen", color="tab:purple")
        ax2.set_ylim(bottom=0)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="upper left", fontsize=8)
    ax.set_title(
        f"{report['mode']} replay of {Path(str(report['bag'].get('path'))).name}: latency against stream time"
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return len(ok) + len(failed)


def write_report(report: dict, out_dir, stem: str = "report", memory_view=None) -> dict:
    """Write <stem>.json, <stem>.md and <stem>_latency.png into out_dir, the evidence frames under
    evidence/, and memory_view (an RGB image, or None) as <stem>_memory_view.png; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out / f"{stem}.json",
        "markdown": out / f"{stem}.md",
        "plot": out / f"{stem}_latency.png",
    }
    if memory_view is not None:
        import cv2

        paths["memory_view"] = out / f"{stem}_memory_view.png"
        cv2.imwrite(str(paths["memory_view"]), cv2.cvtColor(memory_view, cv2.COLOR_RGB2BGR))
    _write_evidence_images(report["questions"], out)
    report["files"] = {k: p.name for k, p in paths.items()}
    report["plot_points"] = render_plot(report, paths["plot"])
    paths["markdown"].write_text(render_markdown(report, paths["plot"].name), encoding="utf-8")
    paths["json"].write_text(json.dumps(report, indent=2, default=_json_default) + "\n", encoding="utf-8")
    return paths


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")
