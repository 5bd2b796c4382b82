"""Start the fvs node, configured and activated automatically, and optionally a video source.

    ros2 launch fvs_ros stream.launch.py image_topic:=/camera/image_raw
    ros2 launch fvs_ros stream.launch.py video:=/path/clip.mp4 model:=/path/to/checkpoint
    ros2 launch fvs_ros stream.launch.py namespace:=robot1 params_file:=/path/my_fvs.yaml
    ros2 launch fvs_ros stream.launch.py cameras:="[front, wrist]"    # front/image_raw, wrist/image_raw

Every node parameter comes from params_file (default: the installed config/fvs.yaml, which is
also where the node takes its defaults from). The launch arguments named after a parameter
override it when given; left empty they keep the params_file value.
"""

import os

import yaml
from ament_index_python.packages import get_package_share_directory
from launch.actions import DeclareLaunchArgument, EmitEvent, OpaqueFunction, RegisterEventHandler
from launch.events import matches_action
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import LifecycleNode, Node
from launch_ros.event_handlers import OnStateTransition
from launch_ros.events.lifecycle import ChangeState
from lifecycle_msgs.msg import Transition

from launch import LaunchDescription

PACKAGE = "fvs_ros"

# Launch arguments named after the node parameter they override when not empty.
PARAMETER_ARGUMENTS = {
    "cameras": "camera names as a YAML list, e.g. [front, wrist] (each on <name>/image_raw)",
    "image_topic": "image topic to watch",
    "image_transport": "raw | compressed",
    "reliability": "image subscription reliability: best_effort | reliable",
    "model": "hub id or local checkpoint directory",
    "device": "auto | cpu | cuda | cuda:N",
    "dtype": "auto | bfloat16 | float16 | float32",
    "memory_file": "directory the memory is restored from at start and saved to at exit",
}


def _file_parameter(params_file: str, name: str) -> str:
    """A parameter's value in a ROS params file (first node section that sets it), or ''."""
    with open(params_file) as f:
        sections = yaml.safe_load(f) or {}
    for section in sections.values():
        value = (section or {}).get("ros__parameters", {}).get(name)
        if value is not None:
            return str(value)
    return ""


def _camera_list(text: str) -> list:
    """The cameras launch argument ("[front, wrist]" or "front,wrist") as a list of names."""
    value = yaml.safe_load(text)
    if isinstance(value, str):
        value = value.split(",")
    if not isinstance(value, list):
        raise ValueError(f"cameras must be a list of names, e.g. [front, wrist]; got {text!r}")
    return [str(name).strip() for name in value]


def _launch_setup(context):
    def arg(name):
        return LaunchConfiguration(name).perform(context)

    params_file, namespace = arg("params_file"), arg("namespace")
    use_sim_time = arg("use_sim_time").lower() in ("true", "1", "yes")
    overrides = {name: arg(name) for name in PARAMETER_ARGUMENTS if arg(name)}
    if "cameras" in overrides:  # a list parameter: "[front, wrist]" -> ["front", "wrist"]
        overrides["cameras"] = _camera_list(overrides["cameras"])

    fvs = LifecycleNode(
        package=PACKAGE,
        executable="fvs_node",
        name="fvs",
        namespace=namespace,
        parameters=[params_file, {**overrides, "use_sim_time": use_sim_time}],
        output="screen",
        emulate_tty=True,
    )
    # Auto-activation, portable to launch_ros without LifecycleNode(autostart=): configure once
    # the process is up; activate when configuring succeeded (inactive), once.
    configure = EmitEvent(
        event=ChangeState(
            lifecycle_node_matcher=matches_action(fvs), transition_id=Transition.TRANSITION_CONFIGURE
        )
    )
    activate = RegisterEventHandler(
        OnStateTransition(
            target_lifecycle_node=fvs,
            start_state="configuring",
            goal_state="inactive",
            handle_once=True,
            entities=[
                EmitEvent(
                    event=ChangeState(
                        lifecycle_node_matcher=matches_action(fvs),
                        transition_id=Transition.TRANSITION_ACTIVATE,
                    )
                )
            ],
        )
    )
    actions = [activate, fvs, configure]

    video = arg("video")
    if video:

        def setting(name, default):  # the node's value: launch argument, else params file, else default
            return overrides.get(name) or _file_parameter(params_file, name) or default

        # with several cameras the video plays on the first one's topic
        cameras = [c for c in overrides.get("cameras") or _camera_list(setting("cameras", "[]")) if c]
        own = f"cameras.{cameras[0]}." if cameras else ""
        topic = (
            setting(own + "image_topic", f"{cameras[0]}/image_raw")
            if cameras
            else setting("image_topic", "image_raw")
        )

        actions.append(
            Node(
                package=PACKAGE,
                executable="fvs_video_source",
                name="video_source",
                namespace=namespace,
                parameters=[
                    {
                        "video": "" if video == "synthetic" else video,
                        "topic": topic,
                        "transport": setting(own + "image_transport", setting("image_transport", "raw")),
                        "reliability": setting(own + "reliability", setting("reliability", "best_effort")),
                        "use_sim_time": use_sim_time,
                    }
                ],
                output="screen",
            )
        )
    return actions


def generate_launch_description():
    default_params = os.path.join(get_package_share_directory(PACKAGE), "config", "fvs.yaml")
    return LaunchDescription(
        [
            DeclareLaunchArgument(
                "params_file", default_value=default_params, description="ROS params file for the fvs node"
            ),
            DeclareLaunchArgument(
                "namespace",
                default_value="",
                description="namespace of the nodes (services become /<namespace>/fvs/ask)",
            ),
            DeclareLaunchArgument(
                "use_sim_time", default_value="false", description="use /clock (bag replay, simulation)"
            ),
            DeclareLaunchArgument(
                "video",
                default_value="",
                description="video file to publish on the image topic ('synthetic': "
                "a generated test pattern); empty: no video source",
            ),
            *(
                DeclareLaunchArgument(name, default_value="", description=f"{text} (empty: from params_file)")
                for name, text in PARAMETER_ARGUMENTS.items()
            ),
            OpaqueFunction(function=_launch_setup),
        ]
    )
