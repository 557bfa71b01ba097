"""The pieces of ``bfcl-eval`` this package uses, imported on demand with an error that says how to install it.

``bfcl-eval`` pins heavy dependencies (vLLM extras, provider SDKs, numpy 1.26) that none of the modules used here
need, so it is installed without them (README, "BFCL"); importing anything outside these modules may fail.
"""

from __future__ import annotations

import importlib
import sys
import types
from functools import cache
from pathlib import Path
from typing import Any

BFCL_VERSION = "2026.3.23"
INSTALL_HINT = (
    f'pip install --no-deps bfcl-eval=={BFCL_VERSION} && pip install mpmath  (README, "BFCL"; its own pinned '
    "dependencies are not needed)"
)


class BFCLMissing(ImportError):
    """``bfcl-eval`` is not installed (or not the modules this package needs)."""


def _import(name: str) -> types.ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise BFCLMissing(
            f"BFCL tasks need the bfcl-eval package ({exc}); install it with: {INSTALL_HINT}"
        ) from exc


@cache
def data_dir() -> Path:
    """BFCL's data folder (tasks, possible answers, multi-turn function docs)."""
    return Path(_import("bfcl_eval").__file__).parent / "data"


@cache
def backend_config() -> types.ModuleType:
    """``CLASS_FILE_PATH_MAPPING``, ``MULTI_TURN_FUNC_DOC_FILE_MAPPING``, ``STATELESS_CLASSES``."""
    return _import("bfcl_eval.constants.executable_backend_config")


def backend_class(class_name: str) -> type:
    """A multi-turn backend class (``GorillaFileSystem``, ``TradingBot``, ...)."""
    return getattr(_import(backend_config().CLASS_FILE_PATH_MAPPING[class_name]), class_name)


@cache
def multi_turn_checker() -> types.ModuleType:
    """BFCL's multi-turn checker (``multi_turn_checker``: state and response checks after each turn)."""
    return _import("bfcl_eval.eval_checker.multi_turn_eval.multi_turn_checker")


@cache
def multi_turn_utils() -> types.ModuleType:
    """The module whose globals hold the checker's backend instances, keyed by model name and entry id."""
    return _import("bfcl_eval.eval_checker.multi_turn_eval.multi_turn_utils")


def step_limit() -> int:
    """BFCL's runner's limit on model steps per user turn."""
    return int(_import("bfcl_eval.constants.default_prompts").MAXIMUM_STEP_LIMIT)


@cache
def ast_checker() -> types.ModuleType:
    """BFCL's AST checker for the single-turn categories.

    It imports ``bfcl_eval.constants.model_config`` only to read one flag per model name
    (``underscore_to_dot``), and that module imports every provider SDK. When it cannot be imported, a stand-in
    holding just the mapping for the name this package passes (``AST_MODEL_NAME``, flag off: function names stay
    as written) is registered in its place.
    """
    name = "bfcl_eval.constants.model_config"
    if name not in sys.modules:
        try:
            importlib.import_module(name)
        except ImportError:
            stand_in = types.ModuleType(name)
            stand_in.MODEL_CONFIG_MAPPING = {AST_MODEL_NAME: types.SimpleNamespace(underscore_to_dot=False)}
            sys.modules[name] = stand_in
    module = _import("bfcl_eval.eval_checker.ast_eval.ast_checker")
    mapping: dict[str, Any] = module.MODEL_CONFIG_MAPPING
    mapping.setdefault(AST_MODEL_NAME, types.SimpleNamespace(underscore_to_dot=False))
    return module


AST_MODEL_NAME = "qwen-tool"


def language_python() -> Any:
    """The AST checker's ``Language.PYTHON``."""
    return _import("bfcl_eval.constants.enums").Language.PYTHON
