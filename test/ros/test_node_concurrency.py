"""50 questions at once from 50 client processes over DDS (issue 15 case 5: of 20 questions at once,
9 never got a reply). The node admits max_pending_questions of them and refuses the others at once
with a 'busy' error; every client gets a reply, and /diagnostics counts the refusals.

The node and the clients run in a DDS domain of their own and this process takes no part in it:
with LOCALHOST discovery, Fast DDS (Kilted wheels) was seen to stop matching almost all
participants once 52 were in one domain on this host (the node, 50 clients and one more), while
51 worked; the clients report through files and their output.
"""

import json
import os
import subprocess
import sys
import time

import pytest
import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from rclpy.executors import SingleThreadedExecutor
from support.dds import wait_until
from support.engines import feed
from support.node_process import ROOT, NodeProcess

from fvs_ros.engine import EngineConfig, StreamEngine
from fvs_ros.model import load_model


@pytest.fixture(scope="module")
def memory(tiny_model, tmp_path_factory):
    """A saved memory of 8 frames, so every answer runs the model (questions queue up)."""
    with StreamEngine(load_model(tiny_model), config=EngineConfig(sample_fps=0)) as eng:
        feed(eng, [i * 0.1 for i in range(8)])
        eng.flush()
        return eng.save(tmp_path_factory.mktemp("concurrency") / "memory")


LIMIT = 2  # max_pending_questions
TOKENS = 256  # each answer's max_new_tokens: an answer takes far longer than 50 questions take to arrive


def fvs_diagnostics(domain: int, timeout: float = 120.0) -> dict:
    """The key/values of the first /diagnostics status of the node fvs heard from now on, by an
    rclpy context of this process in `domain` (after the clients are gone: 2 participants)."""
    context = rclpy.Context()
    rclpy.init(context=context, domain_id=domain)
    try:
        node = rclpy.create_node("concurrency_diagnostics", context=context)
        heard = []
        node.create_subscription(
            DiagnosticArray,
            "/diagnostics",
            lambda msg: heard.extend(s for s in msg.status if s.name.startswith("fvs:")),
            10,
        )
        executor = SingleThreadedExecutor(context=context)
        executor.add_node(node)
        deadline = time.monotonic() + timeout
        while not heard and time.monotonic() < deadline:
            executor.spin_once(timeout_sec=0.5)
        assert heard, f"no /diagnostics from fvs within {timeout} s"
        return {kv.key: kv.value for kv in heard[0].values}
    finally:
        rclpy.try_shutdown(context=context)


def test_50_clients_in_separate_processes_each_get_an_answer_or_a_busy_error(
    tiny_model, memory, tmp_path, monkeypatch
):
    """Issue 15 case 5: of 20 questions at once, 9 never got a reply. 50 processes ask at the same
    moment; max_pending_questions is 2 and each answer may run 256 tokens: every client gets a
    reply, the first 2 to arrive are answered, questions that arrive while 2 wait are refused with
    the 'busy' reason, and /diagnostics' questions_refused_busy counts exactly those refusals."""
    # The node and the clients in a DDS domain of their own: nothing else can push it past 51.
    domain = int(os.environ.get("ROS_DOMAIN_ID", "0")) % 100 + 101
    monkeypatch.setenv("ROS_DOMAIN_ID", str(domain))
    ready, start = tmp_path / "ready", tmp_path / "start"
    ready.mkdir()
    node = NodeProcess(
        tmp_path / "node.log",
        model=tiny_model,
        memory_file=memory,
        max_pending_questions=LIMIT,
        max_new_tokens=TOKENS,
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = []
    try:
        for i in range(50):  # started 10 at a time: 50 interpreters and DDS participants at once starve
            procs.append(  # a 2-core machine for minutes; the questions still go out together below
                subprocess.Popen(
                    [
                        sys.executable,
                        str(ROOT / "test" / "support" / "ask_once.py"),
                        str(ready),
                        str(start),
                        f"Question {i}?",
                        "--max-new-tokens",
                        str(TOKENS),
                    ],
                    stdout=subprocess.PIPE,
                    stderr=open(tmp_path / f"client{i}.log", "w"),
                    text=True,
                    env=env,
                    cwd=ROOT,
                )
            )
            if len(procs) % 10 == 0:
                assert wait_until(lambda: len(list(ready.iterdir())) == len(procs), 180, period=0.5), (
                    f"{len(list(ready.iterdir()))} of {len(procs)} clients reached the service; "
                    + (tmp_path / "client0.log").read_text()[-2000:]
                )
        start.touch()
        replies = [json.loads(p.stdout.readline()) for p in procs]  # each client's wait is bounded
        for p in procs:  # a DDS teardown of 50 participants at once can take minutes: not waited for
            p.kill()
            p.wait()
        counters = fvs_diagnostics(domain)
    finally:
        for p in procs:
            p.kill()
            p.wait()
        assert node.stop() == 0, node.text()
    assert all(r["outcome"] == "reply" for r in replies), [r for r in replies if r["outcome"] != "reply"]
    answered = [r for r in replies if r["success"]]
    busy = [r for r in replies if not r["success"]]
    print(f"50 clients at once: {len(answered)} answered, {len(busy)} busy")
    assert len(answered) >= LIMIT  # the first 2 to arrive are admitted whatever happens after
    assert busy, f"no question refused: {[r['tokens'] for r in answered]} tokens per answer"
    reason = f"questions are already waiting (max_pending_questions is {LIMIT})"
    assert all(r["error"].startswith("busy: ") and reason in r["error"] for r in busy), busy
    assert int(counters["questions_refused_busy"]) == len(busy), counters
    assert int(counters["questions_answered"]) == len(answered), counters
    assert all(r["frames_seen"] == 8 for r in answered)
    assert sum(" frames, ttft " in line for line in node.text().splitlines()) == len(answered)
