"""A small MCP server for env tests, written the way a stranger's server would be.

``build_server()`` gives the object for in-process use; ``python echo_server.py`` serves stdio and
``python echo_server.py --http PORT`` serves streamable HTTP at /mcp.
"""

from __future__ import annotations

import os
import sys

import anyio
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from pydantic import Field


def build_server() -> MCPServer:
    """A fresh server with its own notes store."""
    server = MCPServer("echo")
    notes: dict[str, str] = {}
    in_flight = {"now": 0, "max": 0}

    @server.tool()
    def echo(text: str = Field(description="Text to send back.")) -> str:
        """Return the text unchanged."""
        return text

    @server.tool()
    def add(a: float, b: float) -> float:
        """Add two numbers."""
        return a + b

    @server.tool()
    def fail(message: str) -> str:
        """Always fail with the message."""
        raise ToolError(message)

    @server.tool()
    def big(n: int) -> str:
        """Return n characters: 'a' * (n - 1) + 'z'."""
        return "a" * (n - 1) + "z"

    @server.tool()
    async def slow(seconds: float) -> str:
        """Sleep, then report the most calls that were in flight at once so far."""
        in_flight["now"] += 1
        in_flight["max"] = max(in_flight["max"], in_flight["now"])
        try:
            await anyio.sleep(seconds)
        finally:
            in_flight["now"] -= 1
        return f"slept; max in flight {in_flight['max']}"

    @server.tool()
    def write_note(key: str, value: str) -> str:
        """Store a note."""
        notes[key] = value
        return "stored"

    @server.tool()
    def read_note(key: str) -> str:
        """Read a note ('missing' when absent)."""
        return notes.get(key, "missing")

    @server.tool()
    def pid() -> str:
        """The server's process id."""
        return str(os.getpid())

    server.in_flight = in_flight  # tests read it for in-process servers
    return server


if __name__ == "__main__":
    srv = build_server()
    if len(sys.argv) == 3 and sys.argv[1] == "--http":
        srv.run("streamable-http", host="127.0.0.1", port=int(sys.argv[2]))
    else:
        srv.run()
