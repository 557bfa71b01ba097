"""A calculator that walks the Python AST of an arithmetic expression (never eval/exec).

Only numbers, + - * / // % **, unary signs, parentheses, a fixed set of math functions and the
constants pi and e are accepted; everything else (names, attributes, lambdas, subscripts) is refused
before anything runs. Sizes are bounded so no input can make the server compute for long.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable

from mcp.server.mcpserver.exceptions import ToolError

from .fmt import fmt_number

MAX_EXPRESSION_CHARS = 300
MAX_MAGNITUDE = 1e100
MAX_FACTORIAL = 100

_BINARY: dict[type[ast.operator], Callable[[float, float], float]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
}
_UNARY: dict[type[ast.unaryop], Callable[[float], float]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def _factorial(n: float) -> int:
    if n != int(n) or n < 0 or n > MAX_FACTORIAL:
        raise ToolError(f"factorial needs a whole number from 0 to {MAX_FACTORIAL}, got {fmt_number(n)}")
    return math.factorial(int(n))


def _log(x: float, base: float = math.e) -> float:
    return math.log(x, base)


FUNCTIONS: dict[str, Callable[..., float]] = {
    "sqrt": math.sqrt,
    "log": _log,
    "log10": math.log10,
    "log2": math.log2,
    "exp": math.exp,
    "sin": math.sin,
    "cos": math.cos,
    "tan": math.tan,
    "asin": math.asin,
    "acos": math.acos,
    "atan": math.atan,
    "floor": math.floor,
    "ceil": math.ceil,
    "round": round,
    "abs": abs,
    "min": min,
    "max": max,
    "factorial": _factorial,
}
CONSTANTS = {"pi": math.pi, "e": math.e}


def calculate(expression: str) -> str:
    """Evaluate an arithmetic expression and return the canonical text of its value."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ToolError(
            f"expression is {len(expression)} characters long; the limit is {MAX_EXPRESSION_CHARS}"
        )
    if not expression.strip():
        raise ToolError("expression is empty; write something like '17 * 23 + 5'")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise ToolError(f"could not parse {expression!r} as an arithmetic expression") from None
    return fmt_number(_eval(tree.body))


def _eval(node: ast.AST) -> float:
    if isinstance(node, ast.Constant):
        if isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return _bounded(node.value)
        raise ToolError(f"only numbers are allowed, got {node.value!r}")
    if isinstance(node, ast.Name):
        if node.id in CONSTANTS:
            return CONSTANTS[node.id]
        raise ToolError(f"unknown name '{node.id}'; the constants are pi and e")
    if isinstance(node, ast.BinOp):
        return _binary(node)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_eval(node.operand))
    if isinstance(node, ast.Call):
        return _call(node)
    raise ToolError(
        f"unsupported syntax '{type(node).__name__}'; use numbers, + - * / // % ** and math functions"
    )


def _binary(node: ast.BinOp) -> float:
    if isinstance(node.op, ast.BitXor):
        raise ToolError("'^' is not supported; write powers with ** (for example 2**10)")
    left, right = _eval(node.left), _eval(node.right)
    if isinstance(node.op, ast.Pow):
        return _power(left, right)
    op = _BINARY.get(type(node.op))
    if op is None:
        raise ToolError(f"unsupported operator '{type(node.op).__name__}'; use + - * / // % **")
    try:
        return _bounded(op(left, right))
    except ZeroDivisionError:
        raise ToolError("division by zero") from None


def _power(base: float, exponent: float) -> float:
    # Estimate the size first: 9**9**9 must be refused without being computed. log10|b**x| = x * log10|b|, so
    # 0.5**-2000 is huge and 2**-400 is tiny (it underflows towards 0, which is a fine answer).
    if base not in (0, 1, -1) and exponent * math.log10(abs(base)) > math.log10(MAX_MAGNITUDE):
        raise ToolError(f"result too large; results are limited to {MAX_MAGNITUDE:g}")
    try:
        result = base**exponent
    except ZeroDivisionError:
        raise ToolError("division by zero") from None
    except OverflowError:
        raise ToolError(f"result too large; results are limited to {MAX_MAGNITUDE:g}") from None
    if isinstance(result, complex):
        raise ToolError("a negative number to a fractional power has no real result")
    return _bounded(result)


def _call(node: ast.Call) -> float:
    if not isinstance(node.func, ast.Name):
        raise ToolError("only plain function calls such as sqrt(2) are allowed")
    if node.func.id not in FUNCTIONS:
        raise ToolError(f"unknown function '{node.func.id}'; the functions are {', '.join(FUNCTIONS)}")
    if node.keywords:
        raise ToolError(f"{node.func.id}() takes positional arguments only")
    args = [_eval(arg) for arg in node.args]
    try:
        return _bounded(FUNCTIONS[node.func.id](*args))
    except (ValueError, TypeError, OverflowError, ZeroDivisionError) as exc:
        raise ToolError(f"{node.func.id}() failed: {exc}") from None


def _bounded(value: float) -> float:
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        raise ToolError("the result is not a finite number")
    if abs(value) > MAX_MAGNITUDE:
        raise ToolError(f"result too large; results are limited to {MAX_MAGNITUDE:g}")
    return value
