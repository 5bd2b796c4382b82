"""The cameras parameter (issue 20) on a real rclpy node: declared by type (empty by default),
per-camera settings declared at resolution with descriptors, derived defaults, checked names."""

import pytest
import rclpy
from rclpy.parameter import Parameter

from fvs_ros.ros import params


@pytest.fixture
def make_node():
    rclpy.init()
    made = []

    def make(**overrides):
        node = rclpy.create_node(
            "fvs_params_test",
            parameter_overrides=[Parameter(k, value=v) for k, v in overrides.items()],
        )
        params.declare(node)
        made.append(node)
        return node

    yield make
    for node in made:
        node.destroy_node()
    rclpy.shutdown()


def test_no_cameras_is_the_single_camera_on_image_topic(make_node):
    node = make_node(image_topic="/camera/image_raw", reliability="reliable")
    values = params.read(node)
    assert values["cameras"] == []
    assert params.cameras(node, values) == [params.CameraSettings("", "/camera/image_raw", "raw", "reliable")]


def test_each_camera_defaults_to_its_name_and_the_node_values(make_node):
    node = make_node(
        cameras=["front", "r2_wrist"],
        image_transport="compressed",
        **{
            "cameras.r2_wrist.image_topic": "/robot2/wrist/image_raw",
            "cameras.r2_wrist.reliability": "reliable",
        },
    )
    cams = params.cameras(node, params.read(node))
    assert cams == [
        params.CameraSettings("front", "front/image_raw", "compressed", "best_effort"),
        params.CameraSettings("r2_wrist", "/robot2/wrist/image_raw", "compressed", "reliable"),
    ]
    described = node.describe_parameter("cameras.front.image_topic")
    assert "image topic" in described.description and "activate" in described.additional_constraints
    assert params.check_change("cameras.front.reliability", "sometimes", "inactive")
    assert params.check_change("cameras.front.image_topic", "x", "active")  # applies at activate
    assert params.check_change("cameras.front.image_topic", "x", "inactive") is None


@pytest.mark.parametrize(
    "names, reason",
    [
        (["front", "front"], "unique"),
        (["2nd"], "start with a letter"),
        (["a/b"], "letters"),
        ([""], "letter"),
    ],
)
def test_bad_camera_names_are_refused(make_node, names, reason):
    node = make_node(cameras=names)
    with pytest.raises(ValueError, match=reason):
        params.cameras(node, params.read(node))


def test_a_bad_per_camera_value_is_refused(make_node):
    node = make_node(cameras=["front"], **{"cameras.front.image_transport": "theora"})
    with pytest.raises(ValueError, match="cameras.front.image_transport"):
        params.cameras(node, params.read(node))
