"""The reward matrix (README, "Reward matrix"): five turn statuses and what each one pays."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

STATUSES = ("success", "tool_execution", "tool_error", "invalid_json", "structural_fail")

# Most severe last; a turn with several calls takes the most severe one (success is decided apart).
_SEVERITY = {"tool_execution": 0, "tool_error": 1, "invalid_json": 2, "structural_fail": 3}


@dataclass(frozen=True)
class RewardConfig:
    """Reward paid for a turn of each status (README, "Reward matrix")."""

    success: float = 10.0
    """The turn completes the task."""
    tool_execution: float = 0.0
    """Every call ran cleanly; the task is not complete yet."""
    tool_error: float = -0.5
    """A real tool failed: bad arguments, a runtime error, a timeout."""
    invalid_json: float = -0.8
    """A ``<tool_call>`` block that is not a JSON object with a string name and object arguments."""
    structural_fail: float = -1.0
    """An unknown tool, or a final answer that does not complete the task."""

    def reward(self, status: str) -> float:
        """The reward for one turn of ``status``."""
        if status not in STATUSES:
            raise ValueError(f"unknown status {status!r}; expected one of {', '.join(STATUSES)}")
        return float(getattr(self, status))


def worst_status(statuses: Iterable[str]) -> str:
    """The most severe of per-call statuses (``tool_execution`` for none)."""
    return max(statuses, key=_SEVERITY.__getitem__, default="tool_execution")
