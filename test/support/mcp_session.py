"""The MCP SDK's own client session (mcp.ClientSession) to an fvs_mcp server, for synchronous tests:
over stdio (the SDK starts the server as its subprocess) or over streamable HTTP (a server process
this helper starts and reads its address from). Each session runs on an event loop in a thread of
its own; tests call tools from any thread and wait with a deadline."""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import httpx2
from mcp import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client

from .dds import wait_until
from .node_process import ROOT

SERVER = [sys.executable, "-m", "fvs_ros.cli.mcp"]


class McpSession:
    """One initialized ClientSession; `open_streams()` makes the transport's (read, write) streams."""

    def __init__(self, open_streams, timeout=120.0):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._ready = concurrent.futures.Future()
        self._held = asyncio.run_coroutine_threadsafe(self._hold(open_streams), self._loop)
        self._ready.result(timeout)

    async def _hold(self, open_streams):
        """Enter and leave the transport and the session in one task (anyio's cancel scopes need it)."""
        self._closing = asyncio.Event()
        try:
            async with open_streams() as streams, ClientSession(streams[0], streams[1]) as session:
                await session.initialize()
                self.session = session
                self._ready.set_result(None)
                await self._closing.wait()
        except BaseException as e:
            if not self._ready.done():
                self._ready.set_exception(e)
            raise

    def run(self, coroutine, timeout=180.0):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    def call(self, tool: str, timeout=180.0, **arguments):
        """tools/call; the CallToolResult (is_error set for tool errors)."""
        return self.run(self.session.call_tool(tool, arguments), timeout)

    def tools(self) -> dict:
        """tools/list as {name: Tool}."""
        return {t.name: t for t in self.run(self.session.list_tools()).tools}

    def close(self):
        self._loop.call_soon_threadsafe(self._closing.set)
        try:
            self._held.result(60)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)


def stdio_session(log_path: Path, *args: str) -> McpSession:
    """fvs_mcp over stdio, started by the SDK's stdio_client with this environment (ROS_DOMAIN_ID)."""
    log = open(log_path, "w")
    params = StdioServerParameters(
        command=SERVER[0], args=[*SERVER[1:], *args], env={**os.environ, "PYTHONUNBUFFERED": "1"}, cwd=ROOT
    )
    return McpSession(lambda: stdio_client(params, errlog=log))


class HttpServer:
    """fvs_mcp --transport http on a free port of 127.0.0.1; its URL once it says it serves."""

    def __init__(self, log_path: Path, *args: str, env=None):
        self.log_path = log_path
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(
            [*SERVER, "--transport", "http", "--port", "0", *args],
            cwd=ROOT,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        found = wait_until(lambda: re.search(r"serving MCP at (\S+)", log_path.read_text()), 120)
        assert found, log_path.read_text()
        self.url = found.group(1)

    def session(self, token: str | None = None) -> McpSession:
        """A session of the SDK's streamable HTTP client, sending `token` as its bearer token."""
        headers = {"Authorization": f"Bearer {token}"} if token else None

        @contextlib.asynccontextmanager
        async def open_streams():
            timeout = httpx2.Timeout(30.0, read=300.0)
            async with (
                httpx2.AsyncClient(headers=headers, timeout=timeout) as http,
                streamable_http_client(self.url, http_client=http) as streams,
            ):
                yield streams

        return McpSession(open_streams)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def structured(result) -> dict:
    """A successful result's structured content, checked against its JSON text item."""
    assert not result.is_error, result.content[0].text
    assert json.loads(result.content[0].text) == result.structured_content
    return result.structured_content


def error_text(result) -> str:
    assert result.is_error, result.structured_content
    return result.content[0].text


def images(result) -> list[tuple[str, bytes]]:
    """The result's image items as (mime type, bytes)."""
    return [(c.mime_type, base64.b64decode(c.data)) for c in result.content if c.type == "image"]
