"""The MCP server's side of ROS 2: a client of one running fvs node, through its interfaces only.

One rclpy node in a context of its own, spun by an executor thread: clients of the node's `~/ask`
and `~/watch` services, and subscriptions that keep the last N `~/events` (a bounded ring with
sequence numbers, so each agent reads with its own cursor), the latest `~/scene_summary` and the
latest `~/memory_view`. Service calls are awaited from the server's event loop with a deadline
each; nothing here imports the engine or holds a model.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections import deque

import rclpy
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import Image

from fvs_ros.cli.ask import message_dict
from fvs_ros.msg import SceneSummary, WatchEvent
from fvs_ros.srv import Ask, Watch

# The node publishes ~/events reliable with depth 100 and ~/memory_view latched (transient local).
EVENTS_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=100, reliability=ReliabilityPolicy.RELIABLE)
LATCHED_QOS = QoSProfile(
    history=HistoryPolicy.KEEP_LAST,
    depth=1,
    reliability=ReliabilityPolicy.RELIABLE,
    durability=DurabilityPolicy.TRANSIENT_LOCAL,
)


class NodeUnavailable(RuntimeError):
    """The node's service is not on the ROS graph (node not running, wrong name or domain)."""


class CallTimeout(RuntimeError):
    """The node's service did not reply in time."""


class NodeClient:
    """A client of the fvs node `node_name`: relative names ("fvs", the default) resolve against
    `namespace` (or `--ros-args -r __ns:=...` in `args`), so namespace "/robot1" reaches
    /robot1/fvs/ask; an absolute name ("/robot1/fvs") is taken as it is; remaps in `args` apply.

    `events` bounds the ring of ~/events kept; `discovery_s` is how long after start a missing
    service is waited for (DDS discovery) before a call fails as NodeUnavailable; later a missing
    service fails after a short grace only.
    """

    def __init__(
        self, node_name="fvs", namespace="", events: int = 1000, discovery_s: float = 5.0, args=None
    ):
        self.discovery_s = discovery_s
        self._started = time.monotonic()
        self.context = rclpy.Context()
        rclpy.init(args=args, context=self.context)
        self.node = rclpy.create_node(f"fvs_mcp_{os.getpid()}", namespace=namespace, context=self.context)
        name = node_name.rstrip("/")
        self.ask_client = self.node.create_client(Ask, f"{name}/ask")
        self.watch_client = self.node.create_client(Watch, f"{name}/watch")
        # Resolved names (namespace, remaps) for what the tools say.
        self.node_name = self.node.resolve_service_name(f"{name}/ask").rsplit("/", 1)[0]
        self._names = {
            c: self.node.resolve_service_name(c.srv_name) for c in (self.ask_client, self.watch_client)
        }
        # A request the node answers at once, sent until a reply arrives: see _ready.
        self._pings = {
            self.ask_client: Ask.Request(question=""),
            self.watch_client: Watch.Request(command=Watch.Request.LIST),
        }
        self._answering: set = set()  # clients whose replies have come back since the service appeared
        self._lock = threading.Lock()
        self._events: deque[dict] = deque(maxlen=events)
        self._events_seen = 0  # sequence number of the newest event received
        self._summary: dict | None = None
        self._view: Image | None = None
        self._view_received = 0.0
        self.node.create_subscription(WatchEvent, f"{name}/events", self._on_event, EVENTS_QOS)
        self.node.create_subscription(SceneSummary, f"{name}/scene_summary", self._on_summary, 10)
        self.node.create_subscription(Image, f"{name}/memory_view", self._on_view, LATCHED_QOS)
        self.executor = MultiThreadedExecutor(num_threads=2, context=self.context)
        self.executor.add_node(self.node)
        self._thread = threading.Thread(target=self._spin, name="fvs_mcp_ros", daemon=True)
        self._thread.start()

    def _spin(self):
        try:
            self.executor.spin()
        except ExternalShutdownException:
            pass

    def close(self):
        self.executor.shutdown()
        self.node.destroy_node()
        rclpy.try_shutdown(context=self.context)
        self._thread.join(timeout=5.0)

    # --- subscriptions (executor thread) ---

    def _on_event(self, msg: WatchEvent):
        event = message_dict(msg)
        with self._lock:
            self._events_seen += 1
            self._events.append({"seq": self._events_seen, "received": time.time(), **event})

    def _on_summary(self, msg: SceneSummary):
        summary = {"received": time.time(), **message_dict(msg)}
        with self._lock:
            self._summary = summary

    def _on_view(self, msg: Image):
        with self._lock:
            self._view, self._view_received = msg, time.time()

    # --- reads for the tools ---

    def events(self, after: int = 0, since: float | None = None, limit: int = 100) -> dict:
        """Events with a sequence number above `after` (and a stamp above `since`, stream seconds),
        oldest first, at most `limit`. `next_after` is the cursor for the next read; `missed` counts
        events after `after` that left the ring before this read (it keeps the last N)."""
        with self._lock:
            kept = list(self._events)
            newest = self._events_seen
        oldest = kept[0]["seq"] if kept else newest + 1
        picked = [e for e in kept if e["seq"] > after and (since is None or e["header"]["stamp"] > since)]
        picked = picked[:limit]
        return {
            "events": picked,
            "next_after": picked[-1]["seq"] if len(picked) == limit else max(after, newest),
            "missed": max(0, oldest - 1 - after),
            "ring_size": self._events.maxlen,
        }

    def summary(self) -> dict | None:
        with self._lock:
            return self._summary

    def view(self) -> tuple[Image | None, float]:
        with self._lock:
            return self._view, self._view_received

    # --- service calls (server event loop) ---

    async def call(self, client, request, timeout: float):
        """The node's reply to `request`, or NodeUnavailable / CallTimeout; never waits past
        the discovery grace plus `timeout` seconds."""
        await self._ready(client)
        try:
            return await self._send(client, request, timeout)
        except CallTimeout:
            self._answering.discard(client)  # a restarted node: ping again before the next request
            raise

    async def _send(self, client, request, timeout: float):
        loop = asyncio.get_running_loop()
        replied = asyncio.Event()

        def wake(_future):
            try:
                loop.call_soon_threadsafe(replied.set)
            except RuntimeError:  # the loop has closed (server shutting down)
                pass

        future = client.call_async(request)
        future.add_done_callback(wake)
        try:
            await asyncio.wait_for(replied.wait(), timeout)
        except TimeoutError:
            raise CallTimeout(
                f"{self._names[client]} did not reply within {timeout:.1f} s: the node is overloaded or "
                "stuck; try again later (or with a longer timeout_s)"
            ) from None
        finally:
            if not future.done():
                client.remove_pending_request(future)
        return future.result()

    async def _ready(self, client):
        """Until `client`'s service is up and its replies reach us; NodeUnavailable when it is not
        on the graph, CallTimeout when it is but does not reply. Right after discovery Fast DDS can
        drop a reply (the server's reply writer has not matched this client yet), so the first call
        after the service appears is preceded by pings the node answers at once, until one comes
        back: the real request is never the one lost."""
        grace = max(self._started + self.discovery_s, time.monotonic() + 0.5)
        while True:
            if client.service_is_ready():
                if client in self._answering:
                    return
                try:
                    await self._send(client, self._pings[client], 1.0)
                    self._answering.add(client)
                    return
                except CallTimeout:
                    if time.monotonic() >= grace:
                        raise CallTimeout(
                            f"{self._names[client]} is there but did not answer (a request it answers "
                            "at once got no reply within 1 s): the node is stuck or overloaded; try "
                            "again later"
                        ) from None
            else:
                self._answering.discard(client)
                if time.monotonic() >= grace:
                    raise NodeUnavailable(
                        f"no fvs node answers at {self._names[client]}: is fvs_node running and active, "
                        f"under this name ({self.node_name}) and with the same ROS_DOMAIN_ID? Start "
                        "it, or point fvs_mcp at it with --node."
                    )
                await asyncio.sleep(0.1)
