"""Serve BFCL over MCP: `python -m mcp_mock.bfcl [--category C]` (stdio) or `... --http --port N`.

Without --category: the multi-turn backends; with an AST category (simple_python, multiple, parallel,
parallel_multiple, irrelevance): that category's functions."""

from __future__ import annotations

import argparse

import anyio

from ..cli import parse_serve_args
from . import AST_CATEGORIES, create_server


async def _serve_stdio(category: str | None) -> None:
    from mcp.server.stdio import stdio_server

    server = create_server(category)
    async with stdio_server() as (read, write):
        await server.run(read, write, server.create_initialization_options())


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and serve until the transport closes."""
    parser = argparse.ArgumentParser(prog="python -m mcp_mock.bfcl", description=__doc__)
    parser.add_argument(
        "--category", choices=AST_CATEGORIES, help="serve this AST category's functions instead"
    )
    args = parse_serve_args(parser, argv)
    if args.http:
        import uvicorn

        app = create_server(args.category).streamable_http_app(host=args.host)
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    else:
        anyio.run(_serve_stdio, args.category)


if __name__ == "__main__":
    main()
