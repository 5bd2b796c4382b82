"""fvs_watch's text output names the camera of each condition and event when the node has several
(issue 20), and stays as it was for a node with one unnamed camera."""

from fvs_ros.cli.watch import format_conditions, format_event
from fvs_ros.msg import WatchEvent
from fvs_ros.srv import Watch


def response(cameras):
    return Watch.Response(
        names=["door", "smoke"],
        conditions=["a person is at the door", "smoke"],
        thresholds=[0.5, 0.7],
        active=[True, False],
        probabilities=[0.75, float("nan")],
        condition_cameras=cameras,
    )


def test_conditions_name_their_camera():
    assert format_conditions(response(["front", "wrist"])).splitlines() == [
        "TRUE  P(yes)=0.750 threshold=0.500  [front] door: a person is at the door",
        "false P(yes)=  n/a threshold=0.700  [wrist] smoke",
    ]
    assert format_conditions(response(["", ""])) == format_conditions(response([]))
    assert "[" not in format_conditions(response([]))


def test_events_name_their_camera():
    event = WatchEvent(name="door", probability=0.8, threshold=0.5, rising=True, camera="wrist")
    assert format_event(event).startswith("[0.000] wrist: 'door' became TRUE ")
    event.camera = ""
    assert format_event(event).startswith("[0.000] 'door' became TRUE ")
