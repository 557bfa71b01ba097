"""Serve BFCL over MCP: `python -m mcp_mock.bfcl [--category C]` (stdio) or `... --http --port N`.

Without --category: the multi-turn backends; with an AST category (simple_python, multiple, parallel,
parallel_multiple, irrelevance): that category's functions."""

from __future__ import annotations

import argparse

import anyio

from . import AST_CATEGORIES, create_server


async def _serve_stdio(category: str | None) -> None:
    from mcp.server.stdio import stdio_server

    server = create_server(category)
    async with stdio_server() as (read, write):
        await server.run(read, write, server.create_initialization_options())


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and serve until the transport closes."""
    parser = argparse.ArgumentParser(prog="python -m mcp_mock.bfcl", description=__doc__)
    parser.add_argument("--http", action="store_true", help="serve streamable HTTP at /mcp instead of stdio")
    parser.add_argument("--host", default="127.0.0.1", help="HTTP host (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    parser.add_argument(
        "--category", choices=AST_CATEGORIES, help="serve this AST category's functions instead"
    )
    args = parser.parse_args(argv)
    if not 0 < args.port < 65536:
        parser.error(f"--port must be between 1 and 65535, not {args.port}")
    if args.http:
        import uvicorn

        app = create_server(args.category).streamable_http_app(host=args.host)
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    else:
        anyio.run(_serve_stdio, args.category)


if __name__ == "__main__":
    main()
