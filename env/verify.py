"""Success conditions of a task (see :mod:`env.tasks` for the format).

All conditions present in ``success`` must hold. They fall in three groups, each checked where its
evidence is: call conditions on the clean result of a call (any turn of the episode), the answer
condition on the final answer (a turn with no call), and the probe on a call the verifier makes after
the turn on the same session.
"""

from __future__ import annotations

import math
import re
from typing import Any

CALL_KEYS = ("tool", "result_contains", "result_equals", "result_regex", "result_number")
DEFAULT_TOLERANCE = 1e-6

# Plain numbers, with optional thousands separators ("1,234.5") or an exponent ("1.5e-3").
_NUMBER_RE = re.compile(
    r"[-+]?(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?)"
)


def has_call_conditions(success: dict[str, Any]) -> bool:
    """Whether some call's result must match for the task to be complete."""
    return any(key in success for key in CALL_KEYS)


def call_matches(success: dict[str, Any], tool: str, result: str) -> bool:
    """Whether a clean result of ``tool`` satisfies every call condition of ``success``."""
    if "tool" in success and success["tool"] != tool:
        return False
    if "result_contains" in success and not _contains_all(result, success["result_contains"], fold=False):
        return False
    if "result_equals" in success and result.strip() != success["result_equals"].strip():
        return False
    if "result_regex" in success and re.search(success["result_regex"], result) is None:
        return False
    if "result_number" in success:
        tolerance = success.get("tolerance", DEFAULT_TOLERANCE)
        return any(abs(n - success["result_number"]) <= tolerance for n in numbers_in(result))
    return True


def answer_matches(success: dict[str, Any], answer: str) -> bool:
    """Whether a final answer satisfies ``answer_contains`` (case-insensitive); True when absent."""
    if "answer_contains" not in success:
        return True
    return _contains_all(answer, success["answer_contains"], fold=True)


def probe_matches(probe: dict[str, Any], result: str) -> bool:
    """Whether the probe call's result holds its ``result_contains``."""
    return _contains_all(result, probe["result_contains"], fold=False)


def numbers_in(text: str) -> list[float]:
    """Every finite number written in ``text``, in order."""
    found = []
    for match in _NUMBER_RE.finditer(text):
        try:
            value = float(match.group().replace(",", ""))
        except ValueError:
            continue
        if math.isfinite(value):
            found.append(value)
    return found


def _contains_all(text: str, needles: str | list[str], *, fold: bool) -> bool:
    """Whether ``text`` contains the needle (or every needle of a list)."""
    needles = [needles] if isinstance(needles, str) else needles
    if fold:
        text = text.casefold()
        return all(n.casefold() in text for n in needles)
    return all(n in text for n in needles)
