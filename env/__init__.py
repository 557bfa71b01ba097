"""The gymnasium environment that executes a language model's tool calls on any MCP server.

Importing ``env`` registers ``MCPGym-v0`` with gymnasium, so ``gymnasium.make("MCPGym-v0", ...)``
works. ``env`` knows nothing of torch or tokenizers: actions and observations are text.
"""

import gymnasium

from env.client import ServerStartError
from env.mcp_env import AnyText, MCPGymEnv
from env.parsing import ParsedCall, ParsedTurn, parse_turn
from env.pool import EnvPool
from env.rewards import STATUSES, RewardConfig
from env.tasks import SUCCESS_KEYS, TaskError, load_tasks

__all__ = [
    "STATUSES",
    "SUCCESS_KEYS",
    "AnyText",
    "EnvPool",
    "MCPGymEnv",
    "ParsedCall",
    "ParsedTurn",
    "RewardConfig",
    "ServerStartError",
    "TaskError",
    "load_tasks",
    "parse_turn",
]

if "MCPGym-v0" not in gymnasium.registry:
    gymnasium.register(id="MCPGym-v0", entry_point="env:MCPGymEnv")
