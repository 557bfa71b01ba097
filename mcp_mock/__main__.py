"""Serve the mock server: `python -m mcp_mock` (stdio) or `python -m mcp_mock --http --port N`."""

from __future__ import annotations

import argparse

from . import create_server
from .cli import parse_serve_args


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and serve until the transport closes."""
    args = parse_serve_args(argparse.ArgumentParser(prog="python -m mcp_mock", description=__doc__), argv)
    server = create_server()
    if args.http:
        server.run("streamable-http", host=args.host, port=args.port)
    else:
        server.run()


if __name__ == "__main__":
    main()
