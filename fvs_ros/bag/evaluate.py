"""Evaluate fvs_ros on a recorded bag: replay it, ask scheduled questions, score, report.

    python -m fvs_ros.bag.evaluate BAG QUESTIONS --mode offline --model CKPT [--out DIR]
    python -m fvs_ros.bag.evaluate BAG QUESTIONS --mode live [--rate 1] [--clock] [--out DIR]
    python -m fvs_ros.bag.evaluate BAG QUESTIONS --mode live --player external [--sync clock|image]

offline: decodes the frames and feeds the engine in this process, as fast as it goes and
deterministically (each question sees exactly the frames up to its time). live: replays the
bag into the running node over DDS at recorded timing and asks through its Ask service
(--player external: someone else plays the bag, e.g. `ros2 bag play BAG --clock`; this only
schedules the questions). Writes DIR/report.json, DIR/report.md and DIR/report_latency.png.

Exit status: 0 every question answered; 1 some question skipped (bad line, beyond the bag's end)
or failed; 2 nothing evaluated (unusable bag or question file, node not reachable).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import sys
import time
from pathlib import Path
from typing import Optional

from fvs_ros.bag.bagio import BagError, ImageBag
from fvs_ros.bag.questions import MC_INSTRUCTION, Question, QuestionFileError, load_questions
from fvs_ros.bag.report import build_report, write_report
from fvs_ros.bag.scoring import score_answer
from fvs_ros.bag.watching import DEFAULT_TOLERANCE_S, LiveWatch, OfflineWatch, load_watches

EPS = 1e-6


# ----------------------------------------------------------------------------- offline engine


def _node_params(params_file: Optional[str]) -> dict:
    """The node's parameters (config/fvs.yaml, then --params FILE) so offline runs match the node."""
    from fvs_ros.engine.settings import defaults_file, read_params_file

    try:
        values = read_params_file(defaults_file())
        if params_file:
            values.update(read_params_file(params_file))
    except ValueError as e:
        raise SystemExit(f"evaluate: error: {e}") from None
    return values


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


def make_engine(args, watch=None) -> tuple[object, dict]:
    """Load the model and start an engine set up like the node (offline mode); `watch`: an
    OfflineWatch whose conditions the engine evaluates."""
    from fvs_ros.engine import StreamEngine
    from fvs_ros.engine.settings import engine_config, memory_config
    from fvs_ros.engine.stream_engine import budget_check
    from fvs_ros.model import load_model, resolve_device_dtype

    p = _node_params(args.params)
    for key, value in (
        ("model", args.model),
        ("device", args.device),
        ("dtype", args.dtype),
        ("memory_fps", args.memory_fps),
        ("frames_per_slot", args.frames_per_slot),
        ("csm_slots", args.csm_slots),
        ("dam_frames", args.dam_frames),
        ("queue_size", args.queue_size),
        ("max_new_tokens", args.max_new_tokens),
        ("system_prompt", args.system_prompt),
    ):
        if value is not None:
            p[key] = value
    if not p.get("model"):
        raise SystemExit("evaluate: error: offline mode needs --model (checkpoint directory or hub id)")
    device, dtype = resolve_device_dtype(p.get("device", "auto"), p.get("dtype", "auto"))
    try:
        memory = memory_config(p)
        config = engine_config(
            p,
            answer_timeout_s=float(args.ask_timeout),
            summary_period_s=0.0,
            prefix_cache=not args.no_prefix_cache,
            max_prefix_lag_s=0.0,  # each question sees exactly the frames up to its time
        )
    except (TypeError, ValueError) as e:
        raise SystemExit(f"evaluate: error: parameters: {e}") from None
    t0 = time.perf_counter()
    weights = p.get("weights", "bf16")
    check = budget_check(config, memory, float(p.get("max_gpu_memory", 0.0)), _stderr)
    lm = load_model(p["model"], dtype=dtype, device=device, weights=weights, budget=check)
    watcher, on_watch = (watch.watcher, watch.on_watch) if watch is not None else (None, None)
    engine = StreamEngine(lm, memory, config, watcher=watcher, on_watch=on_watch).start()
    settings = {
        "model": str(p["model"]),
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "weights": weights,
        "memory_fps": config.sample_fps,
        "frames_per_slot": config.frames_per_slot,
        "csm_slots": memory.csm_slots,
        "dam_frames": memory.dam_frames,
        "queue_size": config.queue_size,
        "max_new_tokens": config.max_new_tokens,
        "system_prompt": config.system_prompt,
        "prefix_cache": config.prefix_cache,
        "batch": args.batch,
        "stamps": args.stamps,
        "model_load_s": round(time.perf_counter() - t0, 3),
    }
    return engine, settings


# ----------------------------------------------------------------------------- rows


def _row(q: Question, res: dict, bag_first_stamp: float, args, last_frame_s: Optional[float]) -> dict:
    row = q.as_dict()
    row["prompt"] = q.prompt()
    if q.kind == "mc" and q.reference is not None:
        row["reference_letter"] = q.reference_letter
    if q.at_end:  # asked after the last frame: plotted and listed at the last frame's stream time
        row["time"] = last_frame_s if last_frame_s is not None else res.get("asked_stream_s")
    row.update({k: v for k, v in res.items() if k != "id"})
    row.setdefault("error", None)
    if row.get("last_stamp") is not None:
        row["last_frame_stream_s"] = row["last_stamp"] - bag_first_stamp
    for e in row.get("evidence", []):  # stream time of the evidence frames, as the questions use it
        e["stream_s"] = e["stamp"] - bag_first_stamp
        e["span_stream_s"] = [t - bag_first_stamp for t in e["span"]]
    if row["status"] == "answered":
        s = score_answer(
            q,
            row["answer"],
            args.score_cmd,
            cmd_all=args.score_cmd_all,
            timeout=args.score_timeout,
            threshold=args.score_threshold,
        )
        row.update(
            score=s.score,
            correct=s.correct,
            scored_by=s.method,
            exact=s.exact,
            contains=s.contains,
            predicted=s.predicted,
            score_detail=s.detail,
        )
    else:
        row.update(score=None, correct=None, scored_by=None)
    return row


def _print_row(row: dict, out=sys.stdout):
    t = row.get("time")
    head = f"[t={t:7.2f} s]" if t is not None else "[t=    end]"
    if row["status"] != "answered":
        print(f"{head} {row['id']}: {row['status'].upper()}: {row.get('error')}", file=out, flush=True)
        return
    mark = {True: "correct", False: "wrong"}.get(row.get("correct"), "unscored")
    answer = repr(row["answer"])
    if len(answer) > 120:
        answer = answer[:117] + "..."
    print(
        f"{head} {row['id']}: {answer} ({mark}; frames seen {row.get('frames_seen')}, "
        f"ttft {1000 * row['ttft_s']:.0f} ms, total {1000 * row['total_s']:.0f} ms)",
        file=out,
        flush=True,
    )


# ----------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fvs_ros.bag.evaluate",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n", 2)[2],
    )
    p.add_argument("bag", metavar="BAG", help="rosbag2 directory, or a single .mcap / .db3 file")
    p.add_argument(
        "questions",
        metavar="QUESTIONS",
        help="question file: .jsonl, .yaml/.yml, .json (or VStream-QA .json)",
    )
    p.add_argument("--mode", choices=("live", "offline"), required=True)
    p.add_argument("--out", help="report directory (default: eval_<bag name>_<mode>)")
    p.add_argument("--name", default="report", help="report file stem (default: report)")
    p.add_argument("--topic", help="image topic in the bag (default: its only Image/CompressedImage topic)")
    p.add_argument("--quiet", action="store_true", help="no per-question lines")
    g = p.add_argument_group("questions")
    g.add_argument(
        "--video-id", help="VStream-QA: the video (or original video, with --vstream-clips) in the bag"
    )
    g.add_argument(
        "--vstream-clips", help="VStream-QA: RVS clip list (rvs_ego.json) -> ask at each clip's end_time"
    )
    g.add_argument(
        "--time-offset",
        type=float,
        default=0.0,
        help="VStream-QA with clips: original-video time of the bag's first frame",
    )
    g.add_argument(
        "--mc-instruction", default=MC_INSTRUCTION, help="line appended after multiple-choice options"
    )
    g = p.add_argument_group("scoring")
    g.add_argument("--score-cmd", help="command scoring open answers: question JSON on stdin, prints a score")
    g.add_argument(
        "--score-cmd-all", action="store_true", help="use --score-cmd for every question with an answer"
    )
    g.add_argument("--score-timeout", type=float, default=60.0)
    g.add_argument("--score-threshold", type=float, default=0.5, help="command score counted as correct (>=)")
    g.add_argument(
        "--watch-tolerance",
        type=float,
        default=DEFAULT_TOLERANCE_S,
        help="watched conditions: a rise up to this long after a true interval still detects it (s)",
    )
    g = p.add_argument_group("offline mode (engine settings default to the node's config/fvs.yaml)")
    g.add_argument("--model", help="checkpoint directory or hub id")
    g.add_argument("--params", help="node params file to take settings from (as given to the node)")
    g.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    g.add_argument("--dtype", help="auto | float32 | bfloat16 | float16")
    g.add_argument("--memory-fps", type=float, help="frames per second of stream time into memory (0: all)")
    g.add_argument(
        "--frames-per-slot",
        type=int,
        choices=(1, 2),
        help="sampled frames per memory slot: 2 = the trained layout (pairs), 1 = one frame each",
    )
    g.add_argument("--csm-slots", type=int)
    g.add_argument("--dam-frames", type=int)
    g.add_argument("--queue-size", type=int)
    g.add_argument("--max-new-tokens", type=int, help="answer length limit (live: sent with each request)")
    g.add_argument("--system-prompt")
    g.add_argument(
        "--batch", type=int, default=1, help="drain the frame worker every N queued frames (default 1)"
    )
    g.add_argument(
        "--stamps", choices=("header", "log"), default="header", help="frame stamps given to the engine"
    )
    g.add_argument("--no-prefix-cache", action="store_true", help="full prefill for every answer")
    g = p.add_argument_group("live mode")
    g.add_argument("--rate", type=float, default=1.0, help="replay speed factor (2 = twice as fast)")
    g.add_argument(
        "--clock",
        nargs="?",
        type=float,
        const=40.0,
        default=0.0,
        metavar="HZ",
        help="publish /clock (bag time) at HZ (default 40) for nodes with use_sim_time",
    )
    g.add_argument("--publish-topic", help="publish the images on this topic instead of the bag's")
    g.add_argument("--service", default="/fvs/ask", help="the node's Ask service (default /fvs/ask)")
    g.add_argument("--reliability", choices=("reliable", "best_effort"), default="reliable")
    g.add_argument("--wait", type=float, default=60.0, help="seconds to wait for the node / the player")
    g.add_argument(
        "--preroll",
        type=float,
        default=1.0,
        help="seconds between the node's subscription matching and the first frame (default 1)",
    )
    g.add_argument("--ask-timeout", type=float, default=120.0, help="seconds per answer")
    g.add_argument("--player", choices=("internal", "external"), default="internal")
    g.add_argument(
        "--sync", choices=("auto", "clock", "image"), default="auto", help="external player: time source"
    )
    g.add_argument(
        "--idle-timeout", type=float, default=5.0, help="external player: stream over after this long idle"
    )
    g.add_argument(
        "--no-diagnostics", action="store_true", help="do not read frame counters from /diagnostics"
    )
    g.add_argument(
        "--reset-service",
        default="",
        help="Trigger service emptying the node's memory before the replay (default: <service ns>/reset)",
    )
    g.add_argument("--no-reset", action="store_true", help="keep the node's memory as it is")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.batch < 1 or args.rate <= 0:
        print("evaluate: error: --batch must be >= 1 and --rate > 0", file=sys.stderr)
        return 2
    started = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
    t_wall = time.perf_counter()
    try:
        bag = ImageBag(args.bag, args.topic)
    except BagError as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 2
    with bag:
        try:
            questions, issues = load_questions(
                args.questions, video_id=args.video_id, clips=args.vstream_clips, time_offset=args.time_offset
            )
            watches, watch_issues = load_watches(args.questions)
        except QuestionFileError as e:
            print(f"evaluate: error: {e}", file=sys.stderr)
            return 2
        issues += watch_issues
        for q in questions:  # the line after multiple-choice options, as chosen on the command line
            q.mc_instruction = args.mc_instruction
        skipped_rows = []
        runnable = []
        for q in questions:
            if not q.at_end and q.time > bag.info.bag_end_s + EPS:
                skipped_rows.append(
                    (
                        q,
                        {
                            "status": "skipped",
                            "error": (
                                f"{q.where}: time {q.time:.3f} s is beyond the "
                                f"end of the bag ({bag.info.bag_end_s:.3f} s); "
                                "use time 'end' to ask after the last frame"
                            ),
                        },
                    )
                )
            else:
                runnable.append(q)
        for i in issues:
            print(f"evaluate: {i}", file=sys.stderr)
        for _, r in skipped_rows:
            print(f"evaluate: {r['error']}; question skipped", file=sys.stderr)
        info = bag.info
        print(
            f"[evaluate] {args.mode}: {info.count} frames on {info.topic} ({info.msgtype}), "
            f"{len(runnable)} question(s) to ask, {len(issues) + len(skipped_rows)} skipped",
            file=sys.stderr,
        )
        done: dict[str, dict] = {}  # rows already built (and scored) while running
        watch = None
        if args.mode == "offline":
            from fvs_ros.model import ModelLoadError

            if watches:
                hysteresis = float(_node_params(args.params).get("watch_hysteresis", 0.05))
                watch = OfflineWatch(watches, hysteresis, args.watch_tolerance)
            try:
                engine, config = make_engine(args, watch)
            except ModelLoadError as e:
                print(f"evaluate: error: cannot load model: {e}", file=sys.stderr)
                return 2
            try:
                from fvs_ros.bag.offline import run_offline

                def on_answer(q, res):  # print as we go; the row (and its score) is kept for the report
                    row = done[q.id] = _row(q, res, info.first_stamp, args, res.get("asked_stream_s"))
                    if not args.quiet:
                        _print_row(row, sys.stdout)

                results, frames = run_offline(
                    bag,
                    runnable,
                    engine,
                    batch=args.batch,
                    stamps=args.stamps,
                    max_new_tokens=args.max_new_tokens,
                    timeout=args.ask_timeout,
                    on_answer=on_answer,
                    after_update=None if watch is None else lambda: watch.wait(engine, args.ask_timeout),
                )
                memory_view = engine.memory_view().image
            finally:
                engine.shutdown()
            timing = None
        else:
            from fvs_ros.bag.live import LiveError, LiveOptions, run_live

            opts = LiveOptions(
                rate=args.rate,
                clock_hz=args.clock,
                topic=args.publish_topic,
                service=args.service,
                reliability=args.reliability,
                wait_s=args.wait,
                preroll_s=args.preroll,
                ask_timeout_s=args.ask_timeout,
                max_new_tokens=args.max_new_tokens or 0,
                player=args.player,
                sync=args.sync,
                idle_timeout_s=args.idle_timeout,
                diagnostics=not args.no_diagnostics,
                reset_service=None if args.no_reset else args.reset_service,
            )
            config = {
                "model": "(the running node's)",
                "rate": args.rate,
                "clock_hz": args.clock,
                "service": args.service,
                "player": args.player,
                "sync": args.sync,
                "publish_topic": args.publish_topic or info.topic,
                "reliability": args.reliability,
                "ask_timeout_s": args.ask_timeout,
                "max_new_tokens": args.max_new_tokens or 0,
                "reset": not args.no_reset,
            }
            watch = LiveWatch(watches, args.watch_tolerance) if watches else None
            try:
                results, frames, timing = run_live(bag, runnable, opts, watch=watch)
            except LiveError as e:
                print(f"evaluate: error: {e}", file=sys.stderr)
                return 2
            if frames.get("node_model"):  # from the node's /diagnostics status
                config["model"] = frames.pop("node_model")
            if frames.get("node_frames_per_slot"):
                config["frames_per_slot"] = frames.pop("node_frames_per_slot")
            memory_view = frames.pop("memory_view", None)  # the node's latest ~/memory_view
        by_id = {r["id"]: r for r in results}
        last = frames.get("last_frame_stream_s")
        rows = []
        for q in questions:
            if q.id in done:
                rows.append(done[q.id])
            elif q.id in by_id:
                rows.append(_row(q, by_id[q.id], info.first_stamp, args, last))
        rows += [_row(q, r, info.first_stamp, args, last) for q, r in skipped_rows]
        rows.sort(key=lambda r: (r["time"] is None, r["time"] or 0.0))
        if args.mode == "live" and not args.quiet:
            for r in rows:
                _print_row(r)
        bag_info = info.as_dict() | {"duration_s": last}
        config |= {"mc_instruction": args.mc_instruction, "score_cmd": args.score_cmd}
        watch_report = None if watch is None else watch.report(info.first_stamp, last or 0.0)
        report = build_report(
            mode=args.mode,
            bag=bag_info,
            questions_file=str(args.questions),
            config=config,
            rows=rows,
            issues=[i.as_dict() for i in issues],
            frames=frames,
            timing=timing,
            started=started,
            wall_s=time.perf_counter() - t_wall,
            watch=watch_report,
        )
        out = Path(args.out or f"eval_{Path(args.bag).stem}_{args.mode}")
        paths = write_report(report, out, args.name, memory_view)
    s = report["summary"]
    acc = "-" if s["accuracy"] is None else f"{100 * s['accuracy']:.1f}%"
    lat = s["latency_s"]["total"]
    p50 = "-" if lat["p50"] is None else f"{1000 * lat['p50']:.0f} ms"
    print(
        f"[evaluate] {s['answered']}/{s['questions']} answered, "
        f"{s['failed']} failed, {s['skipped']} skipped; "
        f"accuracy {acc} of {s['scored']} scored; latency p50 {p50}; report: {paths['markdown']}",
        file=sys.stderr,
    )
    return 0 if s["answered"] == s["questions"] else 1


if __name__ == "__main__":
    sys.exit(main())
