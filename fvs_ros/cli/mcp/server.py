"""fvs_mcp: the fvs node's memory as tools for LLM agents, over the Model Context Protocol.

    fvs_mcp [--node fvs] [--namespace /robot1]                  # stdio (an agent starts it)
    fvs_mcp --transport http [--host 127.0.0.1] [--port 8765]   # streamable HTTP at /mcp
    FVS_MCP_TOKEN=secret fvs_mcp --transport http --host 0.0.0.0
    ros2 run fvs_ros fvs_mcp

A client of a running node through its ROS 2 interfaces (node_client.py): it never imports the
engine and holds no model. HTTP binds to localhost unless --host says otherwise, and any other
address needs a token (environment variable FVS_MCP_TOKEN) that every request must carry as
`Authorization: Bearer <token>`. Failures (node not running, no reply in time, busy, a refused
question) come back as MCP tool errors that say what to do; every ROS call has a deadline.
"""

import argparse
import base64
import contextlib
import hmac
import inspect
import ipaddress
import json
import os
import sys
import time
from typing import Annotated

import anyio
import cv2
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import CallToolResult, ImageContent, TextContent, ToolAnnotations
from pydantic import Field
from rclpy.utilities import remove_ros_args

from fvs_ros.cli.ask import message_dict
from fvs_ros.cli.mcp.node_client import CallTimeout, NodeClient, NodeUnavailable
from fvs_ros.cli.watch import response_dict
from fvs_ros.ros.image import ImageError, image_to_rgb
from fvs_ros.srv import Ask, Watch

TOKEN_ENV = "FVS_MCP_TOKEN"
INSTRUCTIONS = (
    "A robot's visual memory (Flash-VStream): the fvs node keeps a fixed-size memory of everything "
    "its camera has seen. `ask` answers a question from that memory, saying which part of the "
    "stream it saw (frames_seen, first/last_frame_stamp, memory_lag_s) and its evidence (the "
    "moments it attended to most). `watch_add` keeps a yes/no condition evaluated on every memory "
    "update; `read_events` returns when conditions became true or false. Stamps are seconds of "
    "stream time (the camera's image stamps)."
)
READ_ONLY = ToolAnnotations(read_only_hint=True, open_world_hint=False)
CHANGES_WATCHES = ToolAnnotations(read_only_hint=False, destructive_hint=False, open_world_hint=False)


def result(data: dict, images=()) -> CallToolResult:
    """A tool result: `data` as structured content and as JSON text (for clients that read text
    only), then the image items."""
    return CallToolResult(content=[TextContent(text=json.dumps(data)), *images], structured_content=data)


def image_item(data: bytes, mime_type: str) -> ImageContent:
    return ImageContent(data=base64.b64encode(data).decode("ascii"), mime_type=mime_type)


def offers(request_type, field: str) -> bool:
    """Whether the node's interface has `field` (a string list) in `request_type`: the tools take
    such an argument only then, so they follow the interface they were built against."""
    return request_type.get_fields_and_field_types().get(field, "").startswith("sequence<string")


def without(fn, parameter: str):
    """`fn` with `parameter` left out of the signature its tool schema is made from (it keeps its
    default when called)."""
    signature = inspect.signature(fn, eval_str=True)
    fn.__signature__ = signature.replace(
        parameters=[p for p in signature.parameters.values() if p.name != parameter]
    )
    return fn


def build_server(node: NodeClient, ros_timeout: float = 10.0) -> MCPServer:
    """The MCP server with its tools, talking to the fvs node through `node`; `ros_timeout` bounds
    every ROS call beyond the time the node is given to answer."""
    server = MCPServer("fvs_mcp", instructions=INSTRUCTIONS)

    async def call(client, request, timeout: float):
        try:
            return await node.call(client, request, timeout)
        except (NodeUnavailable, CallTimeout) as e:
            raise ToolError(str(e)) from None

    def refused(what: str, error: str) -> ToolError:
        if error.startswith("busy"):
            return ToolError(f"the node is busy, try again in a moment: {error}")
        return ToolError(f"the node refused {what}: {error}")

    async def ask(
        question: Annotated[str, Field(description="A question about what the robot's camera has seen.")],
        want_images: Annotated[
            bool,
            Field(description="Also return the evidence frames as JPEG image items, largest share first."),
        ] = False,
        max_new_tokens: Annotated[
            int,
            Field(ge=0, le=4096, description="Upper bound on the answer's tokens; 0: the node's default."),
        ] = 0,
        timeout_s: Annotated[
            float, Field(gt=0, le=600, description="Seconds the node may take to answer.")
        ] = 30.0,
        cameras: Annotated[
            list[str] | None, Field(description="Cameras whose memory to ask; omitted: the node's default.")
        ] = None,
    ) -> CallToolResult:
        """Ask the robot's visual memory a question; answered from everything its camera has seen.

        Returns the answer with what it rests on: frames_seen (frames taken into memory),
        first/last_frame_stamp (stream seconds the memory covers), memory_lag_s (how old the memory
        was: -1 when empty), timings, and evidence (the memory blocks the answer attended to most:
        kind 0 = a detail frame, 1 = a context centroid spanning span_start..span_end; stamp, share
        of attention, slot)."""
        request = Ask.Request(
            question=question, timeout_s=timeout_s, max_new_tokens=max_new_tokens, want_images=want_images
        )
        if cameras is not None:
            request.cameras = cameras
        reply = await call(node.ask_client, request, timeout_s + ros_timeout)
        if not reply.success:
            raise refused("the question", reply.error)
        images = [image_item(bytes(i.data), "image/jpeg") for i in reply.evidence_images if i.data]
        return result({"question": question, **message_dict(reply)}, images)

    async def watch(request: Watch.Request) -> CallToolResult:
        reply = await call(node.watch_client, request, ros_timeout)
        if not reply.success:
            raise refused(f"'{request.command}'", reply.error)
        return result(response_dict(reply))

    async def watch_add(
        condition: Annotated[
            str,
            Field(
                description="A statement true or false of what the camera sees: 'a person is at the door'."
            ),
        ],
        threshold: Annotated[
            float, Field(ge=0, le=1, description="It becomes true at P(yes) >= threshold.")
        ] = 0.5,
        name: Annotated[str, Field(description="A unique name; empty: the condition text.")] = "",
        cameras: Annotated[
            list[str] | None, Field(description="Cameras to watch; omitted: the node's default.")
        ] = None,
    ) -> CallToolResult:
        """Watch a condition on every memory update (standing query); read_events then says when it
        becomes true and false again. Returns every watched condition with its latest P(yes)."""
        request = Watch.Request(
            command=Watch.Request.ADD, condition=condition, threshold=threshold, name=name
        )
        if cameras is not None:
            request.cameras = cameras
        return await watch(request)

    async def watch_list() -> CallToolResult:
        """The watched conditions: name, text, threshold, whether each is true now (active) and its
        latest P(yes) (null before its first evaluation)."""
        return await watch(Watch.Request(command=Watch.Request.LIST))

    async def watch_remove(
        name: Annotated[str, Field(description="The name of the condition to stop watching.")],
    ) -> CallToolResult:
        """Stop watching a condition. Returns the conditions still watched."""
        return await watch(Watch.Request(command=Watch.Request.REMOVE, name=name))

    async def read_events(
        after: Annotated[
            int,
            Field(ge=0, description="Return events with seq above this: pass the last read's next_after."),
        ] = 0,
        since_s: Annotated[
            float | None, Field(description="Only events stamped later than this (stream seconds).")
        ] = None,
        limit: Annotated[int, Field(ge=1, le=1000, description="At most this many events.")] = 100,
    ) -> CallToolResult:
        """Events of the watched conditions, oldest first: a condition became true (rising) or false
        again, with its P(yes), the stamp of the memory evaluated, frames_seen and evidence. This
        server keeps the last events in a ring: next_after is the cursor for the next call, missed
        counts events that left the ring before they were read."""
        return result(node.events(after, since_s, limit))

    async def scene_summary() -> CallToolResult:
        """The latest scene summary the node published: a description of what the camera saw
        recently, the stream span it covers, memory_lag_s, and age_s (seconds since it arrived)."""
        summary = node.summary()
        if summary is None:
            raise ToolError(
                f"no scene summary received from {node.node_name}/scene_summary yet: the node publishes "
                "one every summary_period_s while new frames arrive (0 turns them off); ask instead"
            )
        return result({**summary, "age_s": time.time() - summary["received"]})

    async def memory_view() -> CallToolResult:
        """A picture of what the memory holds now (PNG): the detail frames in time order with their
        stamps, the context timeline below. Returns its stamp (the newest frame in memory), size and
        age_s (seconds since it arrived)."""
        view, received = node.view()
        if view is None:
            raise ToolError(
                f"no memory view received from {node.node_name}/memory_view: the node publishes it "
                "when its memory changes, if memory_view_period_s > 0"
            )
        try:
            rgb = image_to_rgb(view)
        except ImageError as e:
            raise ToolError(f"the memory view could not be read: {e}") from None
        png = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))[1].tobytes()
        data = {
            "stamp": message_dict(view.header)["stamp"],
            "width": view.width,
            "height": view.height,
            "age_s": time.time() - received,
        }
        return result(data, [image_item(png, "image/png")])

    server.add_tool(ask if offers(Ask.Request, "cameras") else without(ask, "cameras"), annotations=READ_ONLY)
    server.add_tool(
        watch_add if offers(Watch.Request, "cameras") else without(watch_add, "cameras"),
        annotations=CHANGES_WATCHES,
    )
    server.add_tool(watch_list, annotations=READ_ONLY)
    server.add_tool(watch_remove, annotations=CHANGES_WATCHES)
    server.add_tool(read_events, annotations=READ_ONLY)
    server.add_tool(scene_summary, annotations=READ_ONLY)
    server.add_tool(memory_view, annotations=READ_ONLY)
    return server


class BearerToken:
    """ASGI middleware: an HTTP request without `Authorization: Bearer <token>` gets 401."""

    def __init__(self, app, token: str):
        self.app, self.expected = app, f"Bearer {token}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                body = b'{"error": "unauthorized: send Authorization: Bearer <FVS_MCP_TOKEN>"}'
                await send(
                    {
                        "type": "http.response.start",
                        "status": 401,
                        "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")],
                    }
                )
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fvs_mcp", description="MCP server for agents, beside an fvs node.")
    parser.add_argument(
        "--node",
        default="fvs",
        help="the node's name, relative to --namespace unless it starts with / (default: fvs)",
    )
    parser.add_argument(
        "--namespace", default="", help="namespace of this client (e.g. /robot1: /robot1/fvs)"
    )
    parser.add_argument("--transport", choices=("stdio", "http"), default="stdio")
    parser.add_argument(
        "--host", default="127.0.0.1", help="HTTP: address to bind (non-local: needs a token)"
    )
    parser.add_argument("--port", type=int, default=8765, help="HTTP: port (0: any free port, printed)")
    parser.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        help="seconds any ROS call may take beyond the node's own timeout_s",
    )
    parser.add_argument("--events", type=int, default=1000, help="watch events kept for read_events")
    parser.add_argument(
        "--wait", type=float, default=5.0, help="seconds after start to wait for the node's services"
    )
    return parser


@contextlib.contextmanager
def stdout_to_stderr():
    """Native output (DDS start-up messages) to stderr while inside: on stdio, stdout is the protocol."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


async def serve(options, argv, token: str | None):
    quiet = stdout_to_stderr() if options.transport == "stdio" else contextlib.nullcontext()
    with quiet:
        node = NodeClient(options.node, options.namespace, options.events, options.wait, args=argv)
    try:
        server = build_server(node, options.timeout)
        if options.transport == "stdio":
            await server.run_stdio_async()
        else:
            await serve_http(server, options, token)
    finally:
        node.close()


async def serve_http(server: MCPServer, options, token: str | None):
    import uvicorn

    app = server.streamable_http_app(host=options.host)
    if token:
        app = BearerToken(app, token)
    http = uvicorn.Server(uvicorn.Config(app, host=options.host, port=options.port, log_level="warning"))

    async def announce():
        while not http.started:
            await anyio.sleep(0.05)
        host, port = http.servers[0].sockets[0].getsockname()[:2]
        print(f"fvs_mcp: serving MCP at http://{host}:{port}/mcp", file=sys.stderr, flush=True)

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(announce)
        await http.serve()
        tasks.cancel_scope.cancel()


def run(args=None) -> int:
    argv = sys.argv if args is None else args
    parser = build_parser()
    options = parser.parse_args(remove_ros_args(argv)[1:])
    if options.events < 1 or options.timeout <= 0 or options.wait < 0:
        parser.error("--events must be at least 1, --timeout above 0 and --wait not negative")
    token = os.environ.get(TOKEN_ENV) or None
    if options.transport == "http" and not is_loopback(options.host) and not token:
        print(
            f"fvs_mcp: refusing to serve on {options.host} without a token: set {TOKEN_ENV} "
            "(clients then send Authorization: Bearer <token>), or bind to 127.0.0.1",
            file=sys.stderr,
        )
        return 2
    try:
        anyio.run(serve, options, argv, token)
    except KeyboardInterrupt:
        pass
    return 0


def main(args=None):
    """Entry point of `fvs_mcp` / `python -m fvs_ros.cli.mcp`."""
    sys.exit(run(args))


if __name__ == "__main__":
    main()
