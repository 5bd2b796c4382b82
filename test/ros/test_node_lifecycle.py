"""The node as the real ros2 command-line tools see it (issue 24): the ROS graph across lifecycle
cycles, node names, watched conditions added before activation, the command-line tools in a
namespace and their messages. One node process runs in a namespace of its own with memory_file
set; this process's client talks to it over DDS. Every test leaves the node active, so the tests
pass in any order.
"""

import signal
import subprocess
import sys

import pytest
import torch
from lifecycle_msgs.msg import Transition
from rclpy.action import ActionClient
from support.dds import rclpy_session, wait_until
from support.fvs_client import FPS, Client, frame
from support.node_process import ROOT, NodeProcess

from fvs_ros.action import Ask as AskAction
from fvs_ros.srv import Watch

NS, NAME = "/fvs_lifecycle_test", "fvs"
FULL = f"{NS}/{NAME}"
STATUS = f"{FULL}/ask_stream/_action/status"  # one publisher per ~/ask_stream action server
ROS_ARGS = ["--ros-args", "-r", f"__ns:={NS}"]
DOWN = [Transition.TRANSITION_DEACTIVATE, Transition.TRANSITION_CLEANUP]
UP = [Transition.TRANSITION_CONFIGURE, Transition.TRANSITION_ACTIVATE]


@pytest.fixture(scope="module")
def client():
    def make():
        c = Client(NAME, f"{NS}/image_raw", namespace=NS)
        c.clients[f"{FULL}/watch"] = c.node.create_client(Watch, f"{FULL}/watch")
        c.action = ActionClient(c.node, AskAction, f"{FULL}/ask_stream")
        return c

    yield from rclpy_session(make)


@pytest.fixture(scope="module")
def memory_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("memory") / "saved"


@pytest.fixture(scope="module")
def node(tiny_model, memory_dir, tmp_path_factory, client):
    proc = NodeProcess(
        tmp_path_factory.mktemp("logs") / "lifecycle.log",
        NAME,
        namespace=NS,
        model=tiny_model,
        memory_file=memory_dir,
        memory_fps=FPS,
        max_new_tokens=256,  # long enough for a timeout to fall inside a generation
        summary_period_s=0.0,
        reliability="reliable",
        qos_depth=10,
    )
    assert client.wait_ready(), proc.text()
    client.wait_matched()
    yield proc
    proc.stop()


def transitions(client, node, ids):
    for transition in ids:
        assert client.change_state(transition), f"transition {transition} failed:\n{node.text()}"


def back_up(client, node):
    """Configure and activate, then wait until the new services answer and the images match."""
    transitions(client, node, UP)
    assert client.wait_ready(), node.text()
    client.wait_matched()


def leave_active(client, node):
    """After a test, whatever state it left: active again, for the next test."""
    state = client.state()
    if state != "active":
        transitions(client, node, UP if state == "unconfigured" else UP[1:])
        assert client.wait_ready(), node.text()
        client.wait_matched()


def graph(client) -> dict:
    """The part of the ROS graph the node makes: node names in its namespace (duplicates kept),
    its services (action services included), and its topics with their publisher and subscriber
    counts (action status and feedback topics included, one publisher per action server)."""
    n = client.node
    topics = [name for name, _ in n.get_topic_names_and_types() if name.startswith(f"{NS}/")]
    return {
        "nodes": sorted(name for name, ns in n.get_node_names_and_namespaces() if ns == NS),
        "services": sorted(s for s, _ in n.get_service_names_and_types() if s.startswith(f"{FULL}/")),
        "topics": {name: (n.count_publishers(name), n.count_subscribers(name)) for name in sorted(topics)},
        "diagnostics_publishers": n.count_publishers("/diagnostics"),
    }


def settled_graph(client, timeout=60.0) -> dict:
    """The graph once discovery has caught up: the same in three looks half a second apart."""
    looks = [graph(client)]

    def steady():
        looks.append(graph(client))
        return looks[-1] == looks[-2] == looks[-3] if len(looks) >= 3 else False

    assert wait_until(steady, timeout, period=0.5), looks[-3:]
    return looks[-1]


def ask_goal(client, question: str):
    """Send one ~/ask_stream goal and wait for its result."""
    assert client.action.wait_for_server(timeout_sec=60), "no ~/ask_stream action server"
    sent = client.action.send_goal_async(AskAction.Goal(question=question, timeout_s=60.0))
    assert wait_until(sent.done, 60), "no goal response"
    handle = sent.result()
    assert handle.accepted
    done = handle.get_result_async()
    assert wait_until(done.done, 90), "no result"
    return done.result().result


def test_lifecycle_cycles_leave_the_graph_as_one_cycle_and_a_goal_runs_once(node, client):
    """Every entity configure creates (the ~/ask_stream action server included) goes at cleanup:
    unconfigured, the node offers no action and no services; after 5 cycles its graph is the
    graph after one, and a goal runs once (a second action server would run it twice)."""
    transitions(client, node, DOWN)
    assert wait_until(lambda: client.node.count_publishers(STATUS) == 0, 60), "unconfigured: ~/ask_stream"
    assert wait_until(lambda: not client.service("ask").service_is_ready(), 60), "unconfigured: ~/ask"
    back_up(client, node)
    assert wait_until(lambda: client.node.count_publishers(STATUS) == 1, 60), graph(client)
    after_one = settled_graph(client)
    assert after_one["topics"][STATUS] == (1, 1), after_one  # one action server, our client's subscriber
    for _ in range(4):
        transitions(client, node, DOWN)
        back_up(client, node)
    assert wait_until(lambda: graph(client) == after_one, 60), (graph(client), after_one)

    question = "How many times is this goal answered?"
    result = ask_goal(client, question)
    assert result.success, result.error
    assert client.ask().success  # served after the goal by the one engine: any second run is logged by now
    assert node.text().count(f"ask {question!r} ->") == 1, node.text()


def test_no_duplicate_node_names_and_one_action_server(node, client):
    """The image intake node is named after the lifecycle node (`fvs_intake`), not `fvs` again
    under launch's `__node:=fvs` remap (NodeProcess passes it too)."""
    assert wait_until(lambda: NAME + "_intake" in graph(client)["nodes"], 60), graph(client)
    g = settled_graph(client)
    assert g["nodes"].count(NAME) == 1 and len(g["nodes"]) == len(set(g["nodes"])), g["nodes"]
    assert g["topics"][STATUS][0] == 1, g


def watch(client, command, **fields) -> Watch.Response:
    request = Watch.Request(command=command, **fields)
    return client.call("watch", request, resend=2.0 if command == Watch.Request.LIST else None)


def test_a_condition_added_between_configure_and_activate_is_kept(node, client, memory_dir):
    """With memory_file set, the stored conditions are listed right after configure, a condition
    added before activate is kept when activation restores memory_file, and both are saved."""
    stored = watch(client, "add", condition="a box is on the table", threshold=0.5, name="stored")
    assert stored.success, stored.error
    try:
        transitions(client, node, DOWN + [Transition.TRANSITION_CONFIGURE])
        listed = watch(client, "list")  # also waits for the new service to answer
        assert listed.success and list(listed.names) == ["stored"], listed
        added = watch(client, "add", condition="a door is open", threshold=0.5, name="early")
        assert added.success and list(added.names) == ["stored", "early"], added
        assert client.change_state(Transition.TRANSITION_ACTIVATE), node.text()
        client.wait_matched()
        after = watch(client, "list")
        assert after.success and list(after.names) == ["stored", "early"], after
        assert (memory_dir / "watch.json").read_text().count('"name"') == 2
        assert "not restored" not in node.text()  # a directory holding only watch.json is no broken save
    finally:
        leave_active(client, node)
        for name in ("stored", "early"):
            watch(client, "remove", name=name)


def test_device_without_cuda_fails_configure_saying_which_parameter_and_what_there_is(node, client):
    missing = f"cuda:{torch.cuda.device_count()}"  # `cuda` on a machine without CUDA (CI)
    transitions(client, node, DOWN)
    try:
        assert client.set_parameter("device", missing).successful
        assert not client.change_state(Transition.TRANSITION_CONFIGURE)
        assert client.state() == "unconfigured" and node.proc.poll() is None
        (line,) = [x for x in node.text().splitlines() if "configure failed: parameter device" in x]
        assert f"'{missing}' is not available" in line and "available: cpu" in line, line
        assert "set device to auto or one of those" in line
    finally:
        assert client.set_parameter("device", "cpu").successful
        leave_active(client, node)


def test_a_timed_out_answer_returns_its_text_so_far_marked_partial(node, client):
    """Ask with timeouts growing by half until one runs out while the answer is being generated:
    that reply carries the text generated until then (partial, num_tokens, the error says so), the
    start of the full answer to the same memory (greedy)."""
    if client.ask().frames_seen == 0:  # the model runs only once memory holds a slot
        client.image(frame(), "rgb8")
        client.image(frame(), "rgb8")
        assert wait_until(lambda: client.ask().frames_seen >= 2, 60), node.text()
    question, timeout, cut = "What do you see?", 0.01, None
    while cut is None and timeout < 60:
        response = client.ask(question, timeout_s=timeout)
        assert response.success or "no answer within" in response.error, response.error
        if response.success:
            break  # generation fitted in this timeout: none of the shorter ones fell inside it
        if response.partial:
            cut = response
        timeout *= 1.5
    assert cut is not None, "no timeout fell inside the generation"
    assert cut.answer and cut.num_tokens >= 1 and f"after {cut.num_tokens} text piece" in cut.error, cut
    full = client.ask(question, timeout_s=120.0)
    assert full.success and full.answer.startswith(cut.answer) and not full.partial, (full.answer, cut.answer)


def run_cli(*args, timeout=180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def test_fvs_ask_and_fvs_watch_resolve_their_default_names_in_the_ros_namespace(node, client):
    asked = run_cli("fvs_ros.cli.ask", "What is happening?", "--wait", "60", *ROS_ARGS)
    assert asked.returncode == 0 and "A: " in asked.stdout, asked.stdout + asked.stderr
    streamed = run_cli("fvs_ros.cli.ask", "What is happening?", "--stream", "--wait", "60", *ROS_ARGS)
    assert streamed.returncode == 0 and "A: " in streamed.stdout, streamed.stdout + streamed.stderr
    listed = run_cli("fvs_ros.cli.watch", "--wait", "60", "--json", "list", *ROS_ARGS)
    assert listed.returncode == 0 and '"success": true' in listed.stdout, listed.stdout + listed.stderr
    gone = run_cli("fvs_ros.cli.ask", "Anyone?", "--wait", "2", "--ros-args", "-r", "__ns:=/elsewhere")
    assert gone.returncode == 2 and "service /elsewhere/fvs/ask is not available" in gone.stderr, gone.stderr


def test_fvs_watch_events_ends_cleanly_on_sigterm(node, client):
    events = subprocess.Popen(
        [sys.executable, "-m", "fvs_ros.cli.watch", "events", *ROS_ARGS],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert wait_until(lambda: client.node.count_subscribers(f"{FULL}/events") >= 1, 60)
        events.send_signal(signal.SIGTERM)
        out, err = events.communicate(timeout=60)
    finally:
        events.kill()
    assert events.returncode == 0 and "Traceback" not in err, err


def test_video_source_exits_non_zero_for_a_video_it_cannot_read(tmp_path):
    missing = run_cli("fvs_ros.cli.video_source", *ROS_ARGS, "-p", "video:=/nonexistent/clip.mp4")
    assert missing.returncode == 1, missing.stderr
    assert "no video file '/nonexistent/clip.mp4'" in missing.stderr and "set video:=" in missing.stderr
    (tmp_path / "clip.mp4").write_bytes(b"not a video")
    broken = run_cli("fvs_ros.cli.video_source", *ROS_ARGS, "-p", f"video:={tmp_path / 'clip.mp4'}")
    assert broken.returncode == 1 and "cannot decode video" in broken.stderr, broken.stderr
