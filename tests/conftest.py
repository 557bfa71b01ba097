"""Shared fixtures: one small tiny-preset model built once per session; the mock server over HTTP."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# A tiny-preset model smaller than the default, so the tests that train it run in seconds on 2 cores.
SMALL_TINY = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 32,
    "intermediate_size": 128,
}


@pytest.fixture(scope="session")
def small_tiny_dir(tmp_path_factory):
    """A tiny-preset model folder (tokenizer trained on the project's text, random weights)."""
    from models import tiny
    from ppo.tiny.corpus import tokenizer_texts

    return tiny.build_tiny(tmp_path_factory.mktemp("small-tiny"), tokenizer_texts(), seed=0, **SMALL_TINY)


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_http(module: str):
    """Serve ``python -m module --http`` in a subprocess; yields its /mcp URL, then stops it."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", module, "--http", "--port", str(port)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, "the HTTP server did not start"
            time.sleep(0.1)
    yield f"http://127.0.0.1:{port}/mcp"
    proc.kill()
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def http_url():
    """The bundled mock served over streamable HTTP in a subprocess, for one test module."""
    yield from serve_http("mcp_mock")
