"""launch/stream.launch.py without launch installed: it compiles, its arguments mirror the YAML
parameters, and, run against recording stand-ins for the launch/launch_ros classes, it builds
the lifecycle node, the auto-activation events and the optional video source as intended.
(test_launch_stream.py runs it for real under launch_testing on a ROS 2 install.)
"""

import ast
import importlib.util
import sys
import types
from pathlib import Path

import pytest
from lifecycle_msgs.msg import Transition

from fvs_ros.ros.params import SPECS, load_defaults

ROOT = Path(__file__).resolve().parents[2]
LAUNCH_FILE = ROOT / "launch" / "stream.launch.py"
OWN_ARGUMENTS = {"params_file", "namespace", "use_sim_time", "video"}


def parameter_arguments():
    """PARAMETER_ARGUMENTS of the launch file, read from its syntax tree."""
    for node in ast.parse(LAUNCH_FILE.read_text()).body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "PARAMETER_ARGUMENTS":
            return ast.literal_eval(node.value)
    raise AssertionError("no PARAMETER_ARGUMENTS in the launch file")


def test_launch_file_compiles():
    compile(LAUNCH_FILE.read_text(), str(LAUNCH_FILE), "exec")


def test_parameter_arguments_are_yaml_parameters():
    names = set(parameter_arguments())
    assert names <= set(load_defaults()) == set(SPECS)
    assert {"image_topic", "image_transport", "model", "device"} <= names
    assert not names & OWN_ARGUMENTS


class Recorded:
    """Stand-in for a launch class: keeps its arguments."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs


class LaunchConfiguration(Recorded):
    def perform(self, context):
        return context.launch_configurations[self.args[0]]


class Context:
    def __init__(self, **configurations):
        self.launch_configurations = configurations


@pytest.fixture
def launch_module(monkeypatch):
    """The launch file, imported with launch/launch_ros replaced by recording stand-ins."""
    names = {
        "launch": ["LaunchDescription"],
        "launch.actions": ["DeclareLaunchArgument", "EmitEvent", "OpaqueFunction", "RegisterEventHandler"],
        "launch.events": [],
        "launch.substitutions": [],
        "launch_ros": [],
        "launch_ros.actions": ["LifecycleNode", "Node"],
        "launch_ros.event_handlers": ["OnStateTransition"],
        "launch_ros.events": [],
        "launch_ros.events.lifecycle": ["ChangeState"],
    }
    for module_name, classes in names.items():
        module = types.ModuleType(module_name)
        for cls in classes:
            setattr(module, cls, type(cls, (Recorded,), {}))
        monkeypatch.setitem(sys.modules, module_name, module)
    sys.modules["launch.substitutions"].LaunchConfiguration = LaunchConfiguration
    sys.modules["launch.events"].matches_action = lambda action: ("matches", action)
    spec = importlib.util.spec_from_file_location("stream_launch", LAUNCH_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def configurations(**given):
    values = {name: "" for name in [*parameter_arguments(), "namespace", "video"]}
    values.update(params_file=str(ROOT / "config" / "fvs.yaml"), use_sim_time="false")
    values.update(given)
    return Context(**values)


def test_declared_arguments(launch_module):
    description = launch_module.generate_launch_description()
    declared = {
        a.args[0]: a.kwargs for a in description.args[0] if type(a).__name__ == "DeclareLaunchArgument"
    }
    assert set(declared) == OWN_ARGUMENTS | set(parameter_arguments())
    assert declared["params_file"]["default_value"].endswith("share/fvs_ros/config/fvs.yaml")
    assert all(declared[name]["default_value"] == "" for name in parameter_arguments())
    assert type(description.args[0][-1]).__name__ == "OpaqueFunction"


def test_defaults_launch_the_lifecycle_node_with_the_params_file_and_auto_activation(launch_module):
    context = configurations()
    handler, node, configure = launch_module._launch_setup(context)
    assert type(node).__name__ == "LifecycleNode"
    assert node.kwargs["package"] == "fvs_ros" and node.kwargs["executable"] == "fvs_node"
    assert node.kwargs["name"] == "fvs" and node.kwargs["namespace"] == ""
    assert node.kwargs["parameters"] == [
        context.launch_configurations["params_file"],
        {"use_sim_time": False},
    ]
    # configure as soon as the node is launched ...
    change = configure.kwargs["event"]
    assert change.kwargs["transition_id"] == Transition.TRANSITION_CONFIGURE
    assert change.kwargs["lifecycle_node_matcher"] == ("matches", node)
    # ... and activate once, when configuring succeeded
    on_inactive = handler.args[0]
    assert on_inactive.kwargs["target_lifecycle_node"] is node
    assert (on_inactive.kwargs["start_state"], on_inactive.kwargs["goal_state"]) == (
        "configuring",
        "inactive",
    )
    assert on_inactive.kwargs["handle_once"] is True
    (activate,) = on_inactive.kwargs["entities"]
    assert activate.kwargs["event"].kwargs["transition_id"] == Transition.TRANSITION_ACTIVATE


def test_given_arguments_override_their_parameters_and_start_the_video_source(launch_module):
    context = configurations(
        model="/ckpt",
        image_topic="/cam/image",
        device="cpu",
        namespace="robot1",
        use_sim_time="true",
        video="/videos/clip.mp4",
    )
    _, node, _, video = launch_module._launch_setup(context)
    assert node.kwargs["namespace"] == "robot1"
    assert node.kwargs["parameters"][1] == {
        "model": "/ckpt",
        "image_topic": "/cam/image",
        "device": "cpu",
        "use_sim_time": True,
    }
    assert video.kwargs["executable"] == "fvs_video_source" and video.kwargs["namespace"] == "robot1"
    assert video.kwargs["parameters"] == [
        {
            "video": "/videos/clip.mp4",
            "topic": "/cam/image",
            "transport": "raw",
            "reliability": "best_effort",
            "use_sim_time": True,
        }
    ]


def test_video_source_follows_the_params_file(launch_module, tmp_path):
    params_file = tmp_path / "my.yaml"
    params_file.write_text(
        "/**:\n  ros__parameters:\n    image_topic: front/image\n    image_transport: compressed\n"
        "    reliability: reliable\n"
    )
    *_, video = launch_module._launch_setup(configurations(params_file=str(params_file), video="synthetic"))
    assert video.kwargs["parameters"][0] == {
        "video": "",
        "topic": "front/image",
        "transport": "compressed",
        "reliability": "reliable",
        "use_sim_time": False,
    }


def test_video_source_follows_the_reliability_argument(launch_module):
    """Issue 15: with reliability:=reliable the video source still published best effort."""
    *_, video = launch_module._launch_setup(configurations(reliability="reliable", video="synthetic"))
    assert video.kwargs["parameters"][0]["reliability"] == "reliable"


def test_cameras_argument_is_a_list_and_the_video_plays_on_the_first_camera(launch_module, tmp_path):
    """Issue 20: cameras:="[front, wrist]" reaches the node as a list of names; a video source
    publishes on the first camera's topic (its own setting in the params file, else <name>/image_raw)."""
    _, node, _, video = launch_module._launch_setup(
        configurations(cameras="[front, wrist]", video="synthetic")
    )
    assert node.kwargs["parameters"][1]["cameras"] == ["front", "wrist"]
    assert video.kwargs["parameters"][0]["topic"] == "front/image_raw"
    params_file = tmp_path / "cams.yaml"
    params_file.write_text(
        "/**:\n  ros__parameters:\n    cameras: [r2_front]\n"
        "    cameras.r2_front.image_topic: /robot2/front/image_raw\n"
        "    cameras.r2_front.image_transport: compressed\n"
    )
    *_, video = launch_module._launch_setup(configurations(params_file=str(params_file), video="synthetic"))
    assert video.kwargs["parameters"][0]["topic"] == "/robot2/front/image_raw"
    assert video.kwargs["parameters"][0]["transport"] == "compressed"
    assert launch_module._camera_list("front,wrist") == ["front", "wrist"]
    with pytest.raises(ValueError, match="list of names"):
        launch_module._camera_list("{a: 1}")
