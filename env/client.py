"""A synchronous bridge to any MCP server over the async SDK (``mcp`` 2.x).

gymnasium is synchronous and the SDK is async, so an event loop runs in a thread of its own (an anyio
blocking portal, :class:`Bridge`) and the env calls into it. Each session is owned by a supervisor
task (:class:`MCPConnection`): the SDK wants a client context opened and closed in one task, and an
HTTP server that dies mid-call raises an exception group out of the whole client context, which the
supervisor catches instead of letting it take the loop down. Calls from other tasks on the loop share
the session, so concurrent calls overlap.

Transports: an in-process server object (``mcp.Client(server)``), a command line (stdio, spawned with
this process's environment so a virtualenv's PATH and PYTHONPATH reach the server), or an
``http(s)://.../mcp`` URL (streamable HTTP).
"""

from __future__ import annotations

import json
import os
import queue
import re
import shlex
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio
from anyio.from_thread import BlockingPortal

CONNECTION_CLOSED = -32000  # the SDK's code for a transport that closed under a request
REQUEST_TIMEOUT = -32001  # the SDK's code for read_timeout_seconds running out
_TIMEOUT_GRACE_S = 5.0  # backstop on top of the SDK's own per-call timeout
_MAX_TOOL_PAGES = 100  # a paginating server that never ends cannot hang list_tools


class ServerStartError(RuntimeError):
    """An MCP server that could not be started or reached."""


@dataclass(frozen=True)
class ServerSpec:
    """Where the server is: ``kind`` is "inprocess", "stdio" or "http"; ``label`` names it for errors."""

    kind: str
    target: Any
    label: str


@dataclass(frozen=True)
class CallResult:
    """A tool result as text (full length) and whether the server or the bridge flagged it an error."""

    text: str
    is_error: bool
    connection_lost: bool = False


def resolve_server(server: Any) -> ServerSpec:
    """Turn the env's ``server`` argument into a :class:`ServerSpec`; None is the bundled mock."""
    if server is None:
        import mcp_mock  # the default server; imported here so foreign servers never need it

        return ServerSpec("inprocess", mcp_mock.create_server(), "mcp_mock (in-process)")
    if isinstance(server, str) and re.match(r"https?://", server):
        return ServerSpec("http", server, server)
    if isinstance(server, (str, list, tuple)):
        argv = shlex.split(server) if isinstance(server, str) else [str(a) for a in server]
        if not argv:
            raise ValueError("the MCP server command line is empty")
        from mcp import StdioServerParameters

        params = StdioServerParameters(command=argv[0], args=argv[1:], env=dict(os.environ))
        return ServerSpec("stdio", params, shlex.join(argv))
    from mcp.server import Server
    from mcp.server.mcpserver import MCPServer

    if isinstance(server, (MCPServer, Server)):
        return ServerSpec("inprocess", server, f"{type(server).__name__} {getattr(server, 'name', '')!r}")
    raise TypeError(
        f"server must be None, an MCPServer object, a command line or an http(s) URL, got {type(server).__name__}"
    )


def describe_error(exc: BaseException) -> str:
    """One line for an exception, looking through exception groups to the first real cause."""
    while isinstance(getattr(exc, "exceptions", None), tuple) and exc.exceptions:  # an exception group
        exc = exc.exceptions[0]
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def result_text(result: Any) -> str:
    """Flatten a ``CallToolResult`` into the text the model reads."""
    parts = []
    for block in result.content:
        kind = getattr(block, "type", "")
        if kind == "text":
            parts.append(block.text)
        elif kind == "resource":
            resource = block.resource
            parts.append(getattr(resource, "text", None) or f"[resource {resource.uri}]")
        elif kind == "resource_link":
            parts.append(f"[resource link {block.uri}]")
        else:
            parts.append(f"[{kind} content {getattr(block, 'mime_type', '')}]".replace(" ]", "]"))
    if not parts and result.structured_content is not None:
        parts.append(json.dumps(result.structured_content, ensure_ascii=False))
    return "\n".join(parts)


def truncate_middle(text: str, limit: int) -> str:
    """Cut ``text`` to ``limit`` characters (plus a marker) by removing its middle.

    The middle goes because a tool's output usually says what it is at the top and how it ended
    at the bottom.
    """
    if len(text) <= limit:
        return text
    head = limit // 2
    tail = limit - head
    return f"{text[:head]}\n... [{len(text) - limit} characters cut] ...\n{text[len(text) - tail :]}"


async def _host(*, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
    """Own a task group for connection supervisors until told to stop."""
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        task_status.started((tg, stop))
        await stop.wait()
        tg.cancel_scope.cancel()


class LoopThread:
    """An event loop on a daemon thread, reached through a blocking portal.

    anyio's ``start_blocking_portal`` runs the loop on a pool thread that interpreter exit joins,
    so an env the user forgot to close would hang the program at exit; a daemon thread does not.
    """

    def __init__(self) -> None:
        ready: queue.Queue[BlockingPortal | BaseException] = queue.Queue(1)

        async def serve() -> None:
            async with BlockingPortal() as portal:
                ready.put(portal)
                await portal.sleep_until_stopped()

        def run() -> None:
            try:
                anyio.run(serve)
            except BaseException as exc:  # reported to the constructor instead of a silent dead thread
                ready.put(exc)

        self._thread = threading.Thread(target=run, name="mcp-env-loop", daemon=True)
        self._thread.start()
        got = ready.get(timeout=30)
        if isinstance(got, BaseException):
            raise RuntimeError(f"could not start the event-loop thread: {got}") from got
        self.portal = got

    def close(self) -> None:
        """Stop the loop (cancelling what is left) and join the thread."""
        self.portal.call(self.portal.stop, True)
        self._thread.join(timeout=30)


class Bridge:
    """An event loop in a thread (a portal, owned or given) and a task group on it."""

    def __init__(self, portal: BlockingPortal | None = None) -> None:
        self._owned: LoopThread | None = None
        if portal is None:
            self._owned = LoopThread()
            portal = self._owned.portal
        self.portal = portal
        self._host, (self.task_group, self._stop) = portal.start_task(_host)
        self.closed = False

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` (awaited if async) on the loop and return its result."""
        return self.portal.call(fn, *args)

    def close(self) -> None:
        """Stop the host task group, then the loop thread if this bridge started it."""
        if self.closed:
            return
        self.closed = True
        self.portal.call(self._stop.set)
        self._host.result(timeout=30)
        if self._owned is not None:
            self._owned.close()


# Episode isolation: a server that lists this extension in its capabilities gives every value of the
# ``_meta[EPISODE_META_KEY]`` of a tools/call its own state, so the env sends a new key each episode.
# (mcp_mock/server.py defines the same two names for the server side.)
EPISODE_EXTENSION = "io.github.qwen-tool/episodes"
EPISODE_META_KEY = "qwen-tool/episode"


class MCPConnection:
    """One client session to one server, opened, restarted and closed by a supervisor task."""

    def __init__(self, spec: ServerSpec, task_group: Any, *, start_timeout: float = 30.0) -> None:
        self.spec = spec
        self.start_timeout = start_timeout
        self._tg = task_group
        self._client: Any = None
        self._stop: anyio.Event | None = None
        self._done: anyio.Event | None = None
        self._in_flight: set[anyio.CancelScope] = set()
        self._healthy = False
        self._opening: anyio.Lock | None = None
        self.extensions: dict[str, Any] = {}

    @property
    def isolates_episodes(self) -> bool:
        """Whether the server declared episode isolation (known once a session has been opened)."""
        return EPISODE_EXTENSION in self.extensions

    @property
    def connected(self) -> bool:
        """Whether a live session is open."""
        return self._client is not None and self._healthy

    async def open(self) -> None:
        """Start a session; raise :class:`ServerStartError` if it is not up within ``start_timeout``."""
        await self.close()
        self._stop, self._done = anyio.Event(), anyio.Event()
        try:
            with anyio.move_on_after(self.start_timeout) as scope:
                await self._tg.start(self._supervise)
        except Exception as exc:
            raise ServerStartError(
                f"could not start MCP server {self.spec.label!r}: {describe_error(exc)}"
            ) from exc
        if scope.cancelled_caught:
            raise ServerStartError(
                f"could not start MCP server {self.spec.label!r}: no answer within {self.start_timeout:g} s"
            )

    async def close(self) -> None:
        """End the session (and a stdio server process) if one is open."""
        if self._stop is None or self._done is None:
            return
        self._stop.set()
        with anyio.move_on_after(self.start_timeout):
            await self._done.wait()
        self._stop = self._done = None

    async def list_tools(self) -> list[Any]:
        """Every tool the server lists, following pagination."""
        await self._ensure_open()
        tools, cursor = [], None
        with anyio.fail_after(self.start_timeout):
            for _ in range(_MAX_TOOL_PAGES):
                page = await self._client.list_tools(cursor=cursor)
                tools.extend(page.tools)
                cursor = page.next_cursor
                if not cursor:
                    break
        return tools

    async def call(
        self, name: str, arguments: dict[str, Any], timeout: float, meta: dict[str, Any] | None = None
    ) -> CallResult:
        """Call a tool (``meta`` goes into the request's ``_meta``); timeouts, transport errors and a lost server
        become error results."""
        await self._ensure_open()
        client = self._client
        with anyio.CancelScope() as scope:
            self._in_flight.add(scope)
            try:
                with anyio.fail_after(timeout + _TIMEOUT_GRACE_S):
                    result = await client.call_tool(name, arguments, read_timeout_seconds=timeout, meta=meta)
                return CallResult(result_text(result), bool(result.is_error))
            except TimeoutError:
                return CallResult(f"tool {name!r} timed out after {timeout:g} s", True)
            except Exception as exc:
                return self._failed_call(name, exc, timeout)
            finally:
                self._in_flight.discard(scope)
        # Only the supervisor cancels this scope: the session died under the call.
        return self._lost(name)

    def _failed_call(self, name: str, exc: Exception, timeout: float) -> CallResult:
        """Map an exception from ``call_tool`` to an error result."""
        code = getattr(getattr(exc, "error", None), "code", getattr(exc, "code", None))
        if code == REQUEST_TIMEOUT:
            return CallResult(f"tool {name!r} timed out after {timeout:g} s", True)
        if code == CONNECTION_CLOSED or isinstance(
            exc, (anyio.ClosedResourceError, anyio.BrokenResourceError)
        ):
            return self._lost(name)
        return CallResult(f"tool {name!r} failed: {describe_error(exc)}", True)

    def _lost(self, name: str) -> CallResult:
        """Mark the session dead (the next use restarts it) and say so to the model."""
        self._healthy = False
        text = f"tool {name!r} failed: the connection to the MCP server was lost; it will be restarted"
        return CallResult(text, True, connection_lost=True)

    async def _ensure_open(self) -> None:
        """Open the session, or restart it after the server died; once, when several envs share it."""
        if self.connected:
            return
        if self._opening is None:  # made on the loop, on first need (no await between test and set)
            self._opening = anyio.Lock()
        async with self._opening:
            if not self.connected:
                await self.open()

    async def _supervise(self, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        """Own the client context: open it, wait for stop, and outlive a server that dies."""
        from mcp import Client

        assert self._stop is not None and self._done is not None
        stop, done = self._stop, self._done
        started = False
        client = None
        try:
            async with Client(self.spec.target) as client:
                self._client, self._healthy = client, True
                capabilities = getattr(client, "server_capabilities", None)
                self.extensions = dict(getattr(capabilities, "extensions", None) or {})
                started = True
                task_status.started()
                await stop.wait()
        except Exception:
            if not started:
                raise
            # The transport failed under the session (an HTTP server died): in-flight calls learn
            # of it through their cancelled scopes, and the next call reopens the session.
        finally:
            if self._client is client:  # a late exit must not clobber a newer session
                self._client, self._healthy = None, False
            for scope in list(self._in_flight):
                scope.cancel()
            done.set()
