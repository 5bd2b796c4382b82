"""Many client processes asking at once over DDS. The node admits max_pending_questions of the
questions and refuses the others at once with a 'busy' error; every request gets a reply.

The node and the clients run in this run's own DDS domain (ROS_DOMAIN_ID, one per test run) and
this process takes no part in it: with LOCALHOST discovery, Fast DDS (Kilted wheels) was seen to
stop matching almost all participants once 52 were in one domain on this host (the node, 50
clients and one more), while 51 worked. (A domain derived from ROS_DOMAIN_ID, as before, could be
another run's own domain on a shared machine.) The clients report through files and their output.
Clients start 10 at a time, and the test waits for each to reach the service however long a
loaded machine takes (within CLIENT_BUDGET_S), never a fixed short time.
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

CLIENT_BUDGET_S = 1200.0  # for every client to start and reach the service (load average 40 seen)
ANSWER_TIMEOUT_S = 600.0  # timeout_s of each question: 20 queued answers on a loaded CPU


@pytest.fixture(scope="module")
def memory(tiny_model, tmp_path_factory):
    """A saved memory of 8 frames, so every answer runs the model (questions queue up)."""
    with StreamEngine(load_model(tiny_model), config=EngineConfig(sample_fps=0)) as eng:
        feed(eng, [i * 0.1 for i in range(8)])
        eng.flush()
        return eng.save(tmp_path_factory.mktemp("concurrency") / "memory")


def ask_at_once(tmp_path, clients: int, count: int, take_after: float = 0.0, tokens: int = 2) -> list[dict]:
    """`clients` processes (test/support/ask_once.py) each sending `count` questions at the same
    moment (and taking replies `take_after` s later); each one's report once all have ended."""
    ready, start = tmp_path / "ready", tmp_path / "start"
    ready.mkdir()
    procs = []
    try:
        for i in range(clients):  # 10 at a time: 50 interpreters and DDS participants at once starve
            procs.append(  # a 2-core machine for minutes; the questions still go out together below
                subprocess.Popen(
                    [
                        sys.executable,
                        str(ROOT / "test" / "support" / "ask_once.py"),
                        str(ready),
                        str(start),
                        f"Question {i}?",
                        f"--count={count}",
                        f"--timeout={ANSWER_TIMEOUT_S}",
                        f"--wait={CLIENT_BUDGET_S}",
                        f"--take-after={take_after}",
                        f"--max-new-tokens={tokens}",
                    ],
                    stdout=subprocess.PIPE,
                    stderr=open(tmp_path / f"client{i}.log", "w"),
                    text=True,
                    env={**os.environ, "PYTHONPATH": str(ROOT)},
                    cwd=ROOT,
                )
            )
            if len(procs) % 10 == 0 or len(procs) == clients:
                # every client so far is ready, or one gave up (it says why below)
                wait_until(
                    lambda: (
                        len(list(ready.iterdir())) == len(procs) or any(p.poll() is not None for p in procs)
                    ),
                    CLIENT_BUDGET_S,
                    period=0.5,
                )
                assert len(list(ready.iterdir())) == len(procs), (
                    f"{len(list(ready.iterdir()))} of {len(procs)} clients reached the service; "
                    + "".join(p.stdout.read() for p in procs if p.poll() is not None)[-2000:]
                    + (tmp_path / "client0.log").read_text()[-2000:]
                )
        start.touch()
        return [json.loads(p.stdout.readline()) for p in procs]  # each client's wait is bounded
    finally:
        for p in procs:  # a DDS teardown of 50 participants at once can take minutes: not waited for
            p.kill()
            p.wait()


def node_process(tmp_path, tiny_model, memory, limit: int = 20, tokens: int = 8) -> NodeProcess:
    return NodeProcess(
        tmp_path / "node.log",
        model=tiny_model,
        memory_file=memory,
        max_pending_questions=limit,
        max_new_tokens=tokens,
    )


def fvs_diagnostics(timeout: float = 120.0) -> dict:
    """The key/values of the first /diagnostics status of the node fvs heard from now on, by an
    rclpy context of this process (after the clients are gone: 2 participants in the domain)."""
    context = rclpy.Context()
    rclpy.init(context=context)
    try:
        node = rclpy.create_node("concurrency_diagnostics", context=context)
        heard = []
        node.create_subscription(
            DiagnosticArray,
            "/diagnostics",
            lambda msg: heard.extend(s for s in msg.status if s.name.startswith("fvs")),
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


def check_replies(reports, node_log: str, expected: int, limit: int = 20) -> tuple[list, list]:
    """Every request got a reply: answered ones (with the 8-frame memory) and busy refusals."""
    assert all(r["outcome"] == "reply" for r in reports), [r for r in reports if r["outcome"] != "reply"]
    replies = [reply for r in reports for reply in r["replies"]]
    assert len(replies) == expected
    answered = [r for r in replies if r["success"]]
    busy = [r for r in replies if not r["success"]]
    reason = f"questions are already waiting (max_pending_questions is {limit})"
    assert all(r["error"].startswith("busy: ") and reason in r["error"] for r in busy), busy
    assert len(answered) >= limit  # the first `limit` to arrive are all admitted and answered
    assert all(r["frames_seen"] == 8 for r in answered)
    assert sum(" frames, ttft " in line for line in node_log.splitlines()) == len(answered)
    return answered, busy


def test_50_clients_in_separate_processes_each_get_an_answer_or_a_busy_error(tiny_model, memory, tmp_path):
    """Issue 15 case 5: of 20 questions at once, 9 never got a reply. 50 processes ask at the same
    moment; max_pending_questions is 2 and each answer may run 256 tokens: every client gets a
    reply, the first 2 to arrive are answered, questions that arrive while 2 wait are refused with
    the 'busy' reason, and /diagnostics' questions_refused_busy counts exactly those refusals."""
    limit, tokens = 2, 256  # an answer takes far longer than 50 questions take to arrive
    node = node_process(tmp_path, tiny_model, memory, limit=limit, tokens=tokens)
    try:
        reports = ask_at_once(tmp_path, clients=50, count=1, tokens=tokens)
        counters = fvs_diagnostics()
    finally:
        assert node.stop() == 0, node.text()
    answered, busy = check_replies(reports, node.text(), 50, limit=limit)
    print(f"50 clients at once: {len(answered)} answered, {len(busy)} busy")
    assert busy, f"no question refused: {[r['tokens'] for r in answered]} tokens per answer"
    assert int(counters["questions_refused_busy"]) == len(busy), counters
    assert int(counters["questions_answered"]) == len(answered), counters


def test_10_clients_asking_20_at_once_each_get_all_20_replies(tiny_model, memory, tmp_path):
    """Issue 24 item 15a: 10 processes x 20 asks at once: 4 of 200 replies never arrived (the node
    counted 164 busy refusals, the clients received 160). The node sent them all: each client's
    reply history (rclpy's default keeps 10) dropped the busy replies beyond 10 that arrived together
    (measured with depth 10: 84 of 100 replies; depth 100: 100 of 100). The project's clients keep
    every reply (fvs_ros.ros.qos.CLIENT_QOS). Each client here takes its replies only 10 s after
    sending, when its ~18 busy refusals have all arrived: a history of 10 keeps 10 of them."""
    node = node_process(tmp_path, tiny_model, memory)
    try:
        reports = ask_at_once(tmp_path, clients=10, count=20, take_after=10.0)
    finally:
        assert node.stop() == 0, node.text()
    answered, busy = check_replies(reports, node.text(), 200)
    print(f"10 clients x 20 at once: {len(answered)} answered, {len(busy)} busy")
