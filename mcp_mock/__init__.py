"""mcp_mock: a deterministic, offline MCP server with math, search, database and data tools, and task suites.

`create_server()` builds a fresh in-process server; `load_tasks(split)` reads a bundled task suite;
`python -m mcp_mock [--http --port N]` serves it over stdio or streamable HTTP.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .tasks import TASKS_DIR, load_tasks

if TYPE_CHECKING:
    from mcp.server.mcpserver import MCPServer

__all__ = ["TASKS_DIR", "create_server", "load_tasks"]


def create_server() -> MCPServer:
    """A fresh MCP server object with its own state (the SDK is imported here, not at package import)."""
    from .server import create_server as _create

    return _create()
