"""The transport flags the servers' command lines share (`python -m mcp_mock`, `python -m mcp_mock.bfcl`)."""

from __future__ import annotations

import argparse


def parse_serve_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Add --http, --host and --port to ``parser``, parse ``argv`` and refuse a port outside 1-65535."""
    parser.add_argument("--http", action="store_true", help="serve streamable HTTP at /mcp instead of stdio")
    parser.add_argument("--host", default="127.0.0.1", help="HTTP host (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    args = parser.parse_args(argv)
    if not 0 < args.port < 65536:
        parser.error(f"--port must be between 1 and 65535, not {args.port}")
    return args
