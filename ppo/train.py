"""PPO for tool calling: ``python -m ppo.train`` (``--help`` lists every setting).

The loop is ``ppo.trainer.loop.main(cfg)``; this module is its command line: flags to a ``Config``, one-line
errors for bad input, and on Ctrl-C which checkpoint a resume would continue from.
"""

from __future__ import annotations

import sys

from ppo.infra.checkpoint import CheckpointError, latest_checkpoint, output_dir_of
from ppo.infra.config import parse_args
from ppo.infra.setup import input_errors
from ppo.trainer.loop import main


def cli(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    try:
        main(cfg)
    except input_errors() as err:
        # Errors about the user's inputs: one clear sentence, not a stack trace from deep inside.
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print(f"interrupted: {_resume_hint(cfg.resume or cfg.output_dir)}", file=sys.stderr)
        raise SystemExit(130) from None


def _resume_hint(run: str | None) -> str:
    """What an interrupted run left to continue from, in one sentence."""
    try:
        checkpoint = latest_checkpoint(run, quiet=True) if run else None
    except (CheckpointError, FileNotFoundError):
        checkpoint = None
    if checkpoint is None:
        return "no checkpoint was written yet, so there is nothing to resume; start the run again"
    return f"checkpoint {checkpoint.name} is intact; continue with --resume {output_dir_of(checkpoint)}"


if __name__ == "__main__":
    cli()

__all__ = ["cli", "main"]
