"""fvs_mcp over the real protocol (issue 23): the MCP SDK's client session talks to fvs_mcp over
stdio and over streamable HTTP, and fvs_mcp talks to a real fvs node (tiny random model) over DDS.

Every result is checked against what the node itself produced: the same question asked of its
~/ask service directly (greedy decoding on an unchanged memory gives the same answer), the
events, memory view and summaries this test receives from the node's own topics, and the node's
/diagnostics counters. The test frames go over reliable QoS and are waited for until counted.
"""

import math
import os
import signal
import subprocess
import sys
import threading
import time

import cv2
import httpx2
import numpy as np
import pytest
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import Image
from support.dds import rclpy_session, seconds, wait_until
from support.fvs_client import FPS, Client, frame, latest_diagnostics
from support.mcp_session import HttpServer, error_text, images, stdio_session, structured
from support.node_process import ROOT, NodeProcess

from fvs_ros.msg import WatchEvent
from fvs_ros.ros.image import image_to_rgb
from fvs_ros.srv import Ask, Watch

TOOLS = {"ask", "watch_add", "watch_list", "watch_remove", "read_events", "scene_summary", "memory_view"}
TOKENS = 8  # max_new_tokens of the test questions
# Answer fields that depend on when the node answered, not on what it answered from.
TIMINGS = {"time_to_first_token_s", "total_time_s"}


class McpTestClient(Client):
    """The module's client of the node, plus its ~/watch service and ~/events and ~/memory_view."""

    def __init__(self):
        super().__init__()
        self.clients["/fvs/watch"] = self.node.create_client(Watch, "/fvs/watch")
        self.events, self.views = [], []
        events_qos = QoSProfile(
            history=HistoryPolicy.KEEP_LAST, depth=100, reliability=ReliabilityPolicy.RELIABLE
        )
        self.node.create_subscription(WatchEvent, "/fvs/events", self.events.append, events_qos)
        latched = QoSProfile(
            depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL
        )
        self.node.create_subscription(Image, "/fvs/memory_view", self.views.append, latched)

    def watch(self, command, **fields):
        return self.call("watch", Watch.Request(command=command, **fields))


@pytest.fixture(scope="module")
def client():
    yield from rclpy_session(McpTestClient)


@pytest.fixture(scope="module")
def node(tiny_model, tmp_path_factory, client):
    proc = NodeProcess(
        tmp_path_factory.mktemp("logs") / "node.log",
        model=tiny_model,
        memory_fps=FPS,
        summary_period_s=1.0,
        summary_max_new_tokens=8,
        diagnostics_period_s=0.5,
        memory_view_period_s=1.0,
        max_new_tokens=256,  # the busy test's long answers; the other questions ask for TOKENS
        max_pending_questions=2,
        max_prefix_lag_s=0.0,  # answers see every frame counted
        evidence_frames=3,
        reliability="reliable",
        qos_depth=10,
    )
    assert client.wait_ready(), proc.text()
    client.wait_matched()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    return tmp_path_factory.mktemp("mcp_logs")


@pytest.fixture(scope="module")
def stdio(node, logs):
    session = stdio_session(logs / "stdio.log")
    yield session
    session.close()


@pytest.fixture(scope="module")
def http_server(node, logs):
    server = HttpServer(logs / "http.log")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def http(http_server):
    session = http_server.session()
    yield session
    session.close()


def feed(client, n=2):
    """Send n frames (whole two-frame slots) and wait until the node's answers count them."""
    before = client.ask(max_new_tokens=1).frames_seen
    for _ in range(n):
        client.image(frame(), "rgb8")
    assert wait_until(lambda: client.ask(max_new_tokens=1).frames_seen >= before + n, 60, period=0.3)


def direct(client, question, **fields):
    """The node's own reply to the question, as the tool reports it (message fields)."""
    from fvs_ros.cli.ask import message_dict

    reply = client.ask(question, timeout_s=30.0, max_new_tokens=TOKENS, **fields)
    return reply, message_dict(reply)


def same(tool, node, where="answer"):
    """The tool's value is the node's: equal, floats to float32 precision, recursively."""
    if isinstance(node, dict):
        assert isinstance(tool, dict) and tool.keys() == node.keys(), where
        for key in node:
            same(tool[key], node[key], f"{where}.{key}")
    elif isinstance(node, list):
        assert isinstance(tool, list) and len(tool) == len(node), where
        for k, (a, b) in enumerate(zip(tool, node, strict=True)):
            same(a, b, f"{where}[{k}]")
    elif isinstance(node, float):
        assert tool == pytest.approx(node, rel=1e-6, abs=1e-9), where
    else:
        assert tool == node, where


def same_answer(tool: dict, node: dict):
    """The tool's answer is the node's, but for the question it adds and the timings."""
    assert tool.keys() - {"question"} == node.keys()
    same({k: tool[k] for k in node.keys() - TIMINGS}, {k: node[k] for k in node.keys() - TIMINGS})


def test_lists_the_tools_with_schemas_and_descriptions(stdio, http):
    for session in (stdio, http):
        tools = session.tools()
        assert set(tools) == TOOLS
        for tool in tools.values():
            assert tool.description and tool.input_schema["type"] == "object"
        ask = tools["ask"].input_schema
        assert ask["required"] == ["question"]
        assert {"question", "want_images", "max_new_tokens", "timeout_s"} <= ask["properties"].keys()
        assert all(p.get("description") for p in ask["properties"].values())


def test_cameras_argument_follows_the_interface(stdio):
    """The ask and watch_add tools take `cameras` exactly when Ask.srv / Watch.srv have the field."""
    tools = stdio.tools()
    for tool, request in (("ask", Ask.Request), ("watch_add", Watch.Request)):
        has_field = "cameras" in request.get_fields_and_field_types()
        assert ("cameras" in tools[tool].input_schema["properties"]) == has_field, tool


@pytest.mark.skipif(
    "cameras" not in Ask.Request.get_fields_and_field_types(), reason="Ask.srv has no cameras field (yet)"
)
def test_a_camera_the_node_does_not_have_is_a_tool_error(stdio, client):
    result = stdio.call("ask", question="What is here?", cameras=["no_such_camera"], max_new_tokens=TOKENS)
    reply = client.ask("What is here?", cameras=["no_such_camera"], max_new_tokens=TOKENS)
    assert not reply.success and reply.error in error_text(result)


def test_ask_returns_the_nodes_answer_over_stdio_and_http(stdio, http, client):
    feed(client, 4)
    question = "What is on the table?"
    for session in (stdio, http):
        result = session.call("ask", question=question, max_new_tokens=TOKENS)
        reply, node = direct(client, question)
        tool = structured(result)
        assert reply.success and tool["success"] and tool["question"] == question
        assert tool["frames_seen"] >= 4 and tool["evidence"], tool
        same_answer(tool, node)
        assert images(result) == []  # thumbnails only on request


def test_ask_with_images_returns_the_nodes_evidence_thumbnails(stdio, client):
    feed(client, 2)
    question = "Where is the ball?"
    result = stdio.call("ask", question=question, max_new_tokens=TOKENS, want_images=True)
    reply, node = direct(client, question, want_images=True)
    same_answer(structured(result), node)
    thumbnails = [bytes(i.data) for i in reply.evidence_images if i.data]
    assert thumbnails and images(result) == [("image/jpeg", jpeg) for jpeg in thumbnails]
    decoded = cv2.imdecode(np.frombuffer(thumbnails[0], np.uint8), cv2.IMREAD_COLOR)
    assert decoded is not None and decoded.size > 0


def test_a_refused_question_is_a_tool_error_with_the_nodes_reason(stdio, client):
    long_question = "x" * 3000  # over max_question_chars
    result = stdio.call("ask", question=long_question)
    reply = client.ask(long_question)
    assert not reply.success and "max_question_chars" in reply.error
    assert reply.error in error_text(result) and "refused" in error_text(result)
    empty = stdio.call("ask", question="")
    assert client.ask("").error in error_text(empty)


def test_bad_arguments_are_tool_errors_and_change_nothing(stdio, client):
    before = client.watch(Watch.Request.LIST).names
    result = stdio.call("watch_add", condition="a door is open", threshold=2.0)
    assert "threshold" in error_text(result)
    assert stdio.call("ask", question="hi", timeout_s=-1).is_error
    assert client.watch(Watch.Request.LIST).names == before


def test_watch_add_then_the_event_is_read_back(stdio, client):
    count = len(client.events)  # the node may evaluate a new condition on its memory at once
    listed = structured(
        stdio.call("watch_add", condition="the camera sees something", threshold=0.0, name="mcp_seen")
    )
    try:
        node_list = client.watch(Watch.Request.LIST)
        assert [c["name"] for c in listed["conditions"]] == list(node_list.names)
        assert "mcp_seen" in node_list.names
        feed(client, 2)  # else on the next memory update: threshold 0 rises on its first evaluation
        assert wait_until(lambda: any(e.name == "mcp_seen" for e in client.events[count:]), 60)
        event = next(e for e in client.events[count:] if e.name == "mcp_seen")

        def read():
            read.last = structured(stdio.call("read_events", after=0))
            return [e for e in read.last["events"] if e["name"] == "mcp_seen"]

        seen = wait_until(read, 30)
        assert seen, read.last
        got = seen[0]
        assert got["rising"] and event.rising
        assert got["header"]["stamp"] == pytest.approx(seconds(event.header.stamp), abs=1e-9)
        assert got["probability"] == pytest.approx(event.probability, rel=1e-6)
        assert got["frames_seen"] == event.frames_seen and got["condition"] == event.condition
        assert [e["stamp"] for e in got["evidence"]] == pytest.approx(
            [seconds(e.stamp) for e in event.evidence]
        )
        # the cursor: nothing at or below next_after comes back
        again = structured(stdio.call("read_events", after=read.last["next_after"]))
        assert all(e["seq"] > read.last["next_after"] for e in again["events"])
        later = structured(stdio.call("read_events", since_s=got["header"]["stamp"]))
        assert all(e["header"]["stamp"] > got["header"]["stamp"] for e in later["events"])
        listed = structured(stdio.call("watch_list"))
        mine = next(c for c in listed["conditions"] if c["name"] == "mcp_seen")
        assert mine["active"] and mine["probability"] is not None
    finally:
        removed = structured(stdio.call("watch_remove", name="mcp_seen"))
    assert "mcp_seen" not in [c["name"] for c in removed["conditions"]]
    assert "mcp_seen" not in client.watch(Watch.Request.LIST).names
    refused = stdio.call("watch_remove", name="mcp_seen")
    assert "refused" in error_text(refused)


def test_the_event_ring_is_bounded_and_says_what_it_missed(node, logs, client):
    """fvs_mcp --events 2 keeps the last two events; a read from the start says one was missed."""
    session = stdio_session(logs / "stdio_ring.log", "--events", "2")
    names = [f"ring_{k}" for k in range(3)]
    count = len(client.events)
    try:
        for name in names:  # threshold 0: each rises on its first evaluation
            structured(session.call("watch_add", condition=f"{name} is in view", threshold=0.0, name=name))
        feed(client, 2)
        assert wait_until(lambda: {e.name for e in client.events[count:]} >= set(names), 60)
        published = [e.name for e in client.events[count:] if e.name in names]

        def read():
            read.data = structured(session.call("read_events"))
            return read.data["next_after"] == len(published)

        assert wait_until(read, 30), read.data
        assert [e["name"] for e in read.data["events"]] == published[-2:]
        assert read.data["missed"] == len(published) - 2 and read.data["ring_size"] == 2
        assert [e["seq"] for e in read.data["events"]] == [len(published) - 1, len(published)]
    finally:
        for name in names:
            session.call("watch_remove", name=name)
        session.close()


def test_memory_view_is_the_nodes_picture_as_png(stdio, client):
    feed(client, 2)
    stamp = client.stamp  # the newest frame: the view of this memory is stamped with it
    assert wait_until(
        lambda: client.views and seconds(client.views[-1].header.stamp) == pytest.approx(stamp), 60
    )
    expected = image_to_rgb(client.views[-1])

    def read():
        read.result = stdio.call("memory_view")
        return structured(read.result)["stamp"] == pytest.approx(stamp)

    assert wait_until(read, 30), structured(read.result)
    [(mime, png)] = images(read.result)
    assert mime == "image/png"
    decoded = cv2.cvtColor(cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    assert np.array_equal(decoded, expected)
    data = structured(read.result)
    assert (data["height"], data["width"]) == expected.shape[:2]


def test_scene_summary_is_the_latest_the_node_published(stdio, client):
    count = len(client.summaries)
    feed(client, 2)  # summaries come while new frames arrive
    assert wait_until(lambda: len(client.summaries) > count, 60)

    def read():
        read.data = structured(stdio.call("scene_summary"))
        latest = client.summaries[-1]
        return read.data["header"]["stamp"] == pytest.approx(seconds(latest.header.stamp)) and (
            read.data["summary"] == latest.summary
        )

    assert wait_until(read, 30), read.data
    assert read.data["frames_seen"] >= 2 and read.data["age_s"] >= 0


def test_two_agents_at_once_get_their_own_answers_and_cursors(http_server, stdio, client):
    """Two HTTP sessions on one server ask different questions at the same time, and add, read and
    remove their own conditions: each gets what the node gave for its own request."""
    feed(client, 2)
    agents = {"a": http_server.session(), "b": http_server.session()}
    questions = {"a": "Is there a person?", "b": "What colour is the wall behind the robot?"}
    results = {name: [] for name in agents}

    def agent(name):
        session = agents[name]
        for _ in range(3):
            results[name].append(session.call("ask", question=questions[name], max_new_tokens=TOKENS))
        session.call("watch_add", condition=f"agent {name} sees a cup", threshold=0.0, name=f"agent_{name}")

    try:
        threads = [threading.Thread(target=agent, args=(name,)) for name in agents]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        for name in agents:
            _, node = direct(client, questions[name])
            assert len(results[name]) == 3
            for result in results[name]:
                tool = structured(result)
                assert tool["question"] == questions[name]
                same_answer(tool, node)
        assert {"agent_a", "agent_b"} <= set(client.watch(Watch.Request.LIST).names)
        feed(client, 2)
        cursors = {}
        for name, session in agents.items():

            def mine(name=name, session=session):
                data = structured(session.call("read_events", after=0))
                cursors[name] = data["next_after"]
                return {e["name"] for e in data["events"]} >= {"agent_a", "agent_b"}

            assert wait_until(mine, 60)  # reading does not consume: both see both events
        assert cursors["a"] >= 2 and cursors["b"] >= 2
    finally:
        for name, session in agents.items():
            session.call("watch_remove", name=f"agent_{name}")
            session.close()
    assert not {"agent_a", "agent_b"} & set(client.watch(Watch.Request.LIST).names)


def test_busy_is_a_tool_error_counted_by_the_node(stdio, client):
    """More concurrent questions than max_pending_questions (2): the rest are refused as busy, each
    one a tool error, and the node's own busy counter grows by exactly as many."""
    feed(client, 2)
    before = int(latest_diagnostics(client)["questions_refused_busy"])
    busy = answered = 0
    for _ in range(5):  # rounds until one meets a busy node (a long answer holds a slot)
        pool = [None] * 6

        def one(k, pool=pool):
            pool[k] = stdio.call(
                "ask", question=f"Describe everything you saw, part {k}.", max_new_tokens=256
            )

        threads = [threading.Thread(target=one, args=(k,)) for k in range(len(pool))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        for result in pool:
            if result.is_error:
                assert "busy" in error_text(result) and "try again" in error_text(result), error_text(result)
                busy += 1
            else:
                assert structured(result)["success"]
                answered += 1
        if busy:
            break
    assert busy and answered
    assert wait_until(lambda: int(client.diagnostics[-1]["questions_refused_busy"]) == before + busy, 30), (
        client.diagnostics[-1],
        busy,
    )


def test_a_node_that_does_not_reply_is_a_timeout_not_a_hang(node, logs, client):
    session = stdio_session(logs / "stdio_timeout.log", "--timeout", "1")
    try:
        assert structured(session.call("ask", question="Anything?", max_new_tokens=TOKENS))["success"]
        assert structured(session.call("watch_list"))["success"]
        os.kill(node.proc.pid, signal.SIGSTOP)  # the node is there but stuck
        try:
            t0 = time.monotonic()
            result = session.call("ask", question="Anything?", timeout_s=1.0, max_new_tokens=TOKENS)
            waited = time.monotonic() - t0
            watch = session.call("watch_list")
        finally:
            os.kill(node.proc.pid, signal.SIGCONT)
        assert "did not reply within 2.0 s" in error_text(result)
        assert "did not reply within 1.0 s" in error_text(watch)
        assert waited < 60  # bounded by the deadline, however loaded the machine
        # the server is still up and the node answers again
        assert wait_until(
            lambda: not session.call("ask", question="Anything?", max_new_tokens=TOKENS).is_error, 60
        )
    finally:
        session.close()


def test_no_node_is_a_tool_error_saying_what_to_do(node, logs):
    session = stdio_session(logs / "stdio_nobody.log", "--node", "nobody", "--wait", "1")
    try:
        for tool, arguments in (("ask", {"question": "Hello?"}), ("watch_list", {})):
            text = error_text(session.call(tool, **arguments))
            assert "no fvs node answers at /nobody/" in text and "fvs_node running" in text
        assert "no memory view received from /nobody/memory_view" in error_text(session.call("memory_view"))
        assert "no scene summary received" in error_text(session.call("scene_summary"))
        assert structured(session.call("read_events"))["events"] == []
    finally:
        session.close()


def test_namespace_argument_reaches_the_node_under_it(node, logs):
    """--namespace / resolves the relative node name to /fvs; /elsewhere does not reach it."""
    here = stdio_session(logs / "stdio_ns.log", "--namespace", "/")
    there = stdio_session(logs / "stdio_ns2.log", "--namespace", "/elsewhere", "--wait", "1")
    try:
        assert structured(here.call("watch_list"))["success"]
        assert "/elsewhere/fvs/watch" in error_text(there.call("watch_list"))
    finally:
        here.close()
        there.close()


def test_http_needs_the_token_when_one_is_set(node, logs):
    server = HttpServer(logs / "http_token.log", env={"FVS_MCP_TOKEN": "s3cret"})
    try:
        refused = httpx2.post(server.url, json={"jsonrpc": "2.0", "id": 1, "method": "ping"}, timeout=30)
        assert refused.status_code == 401
        wrong = httpx2.post(server.url, headers={"Authorization": "Bearer nope"}, json={}, timeout=30)
        assert wrong.status_code == 401
        session = server.session(token="s3cret")
        try:
            assert set(session.tools()) == TOOLS
        finally:
            session.close()
    finally:
        server.stop()


def test_refuses_to_start_on_a_non_local_address_without_a_token_or_with_bad_options():
    env = {k: v for k, v in os.environ.items() if k != "FVS_MCP_TOKEN"}

    def start(*args):
        command = [sys.executable, "-m", "fvs_ros.cli.mcp", *args]
        return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)

    done = start("--transport", "http", "--host", "0.0.0.0")
    assert done.returncode == 2 and "without a token" in done.stderr and "FVS_MCP_TOKEN" in done.stderr
    done = start("--events", "0")
    assert done.returncode == 2 and "--events must be at least 1" in done.stderr


def test_the_server_holds_no_model_and_never_imports_the_engine():
    probe = (
        "import sys, fvs_ros.cli.mcp.server; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers') "
        "or m.startswith(('fvs_ros.engine', 'fvs_ros.model', 'fvs_ros.memory'))))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_memory_lag_and_stamps_match_the_nodes_diagnostics(stdio, client):
    """frames_seen of an answer is the node's own count (its /diagnostics) when no frame is in flight."""
    feed(client, 2)
    diagnostics = latest_diagnostics(client)
    tool = structured(stdio.call("ask", question="How long have you watched?", max_new_tokens=TOKENS))
    assert tool["frames_seen"] == int(diagnostics["frames_seen"])
    assert tool["last_frame_stamp"] == pytest.approx(client.stamp)
    assert math.isfinite(tool["memory_lag_s"]) and tool["memory_lag_s"] >= 0
