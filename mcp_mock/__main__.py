"""Serve the mock server: `python -m mcp_mock` (stdio) or `python -m mcp_mock --http --port N`."""

from __future__ import annotations

import argparse

from . import create_server


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and serve until the transport closes."""
    parser = argparse.ArgumentParser(prog="python -m mcp_mock", description=__doc__)
    parser.add_argument("--http", action="store_true", help="serve streamable HTTP at /mcp instead of stdio")
    parser.add_argument("--host", default="127.0.0.1", help="HTTP host (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    args = parser.parse_args(argv)
    if not 0 < args.port < 65536:
        parser.error(f"--port must be between 1 and 65535, not {args.port}")
    server = create_server()
    if args.http:
        server.run("streamable-http", host=args.host, port=args.port)
    else:
        server.run()


if __name__ == "__main__":
    main()
