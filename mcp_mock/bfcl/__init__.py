"""BFCL as MCP environments: the Berkeley Function Calling Leaderboard's multi-turn and single-turn AST categories.

- ``create_server()``: an MCP server whose tools are the functions of BFCL's multi-turn backends, each episode
  with its own backend state; ``create_server("simple_python")`` one AST category's functions instead
  (``python -m mcp_mock.bfcl [--category C]`` serves either over stdio or HTTP);
- ``category_tasks(category)``: a category's entries as tasks of this project's format (conversations, one user
  message per turn), verified after each user turn by BFCL's own checkers (``multi_turn_checker``,
  ``ast_checker``).

``python -m ppo.train --tasks bfcl:multi_turn_base`` and ``python -m ppo.evaluate --tasks bfcl:...`` use both.
Needs ``bfcl-eval``, installed without its dependencies (README, "BFCL"); ``BFCLMissing`` says how.
"""

from ._bfcl import BFCL_VERSION, INSTALL_HINT, BFCLMissing
from .server import create_server
from .suite import AST_CATEGORIES, CATEGORIES, MULTI_TURN_CATEGORIES, category_tasks

__all__ = [
    "AST_CATEGORIES", "BFCL_VERSION", "CATEGORIES", "INSTALL_HINT", "MULTI_TURN_CATEGORIES", "BFCLMissing",
    "category_tasks", "create_server",
]  # fmt: skip
