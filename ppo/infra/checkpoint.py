"""Checkpoints: written atomically, read back to continue a run exactly.

Layout of an output directory::

    config.json                     the run's Config
    metrics.jsonl, tensorboard/     monitoring
    checkpoints/iter_000010/        one checkpoint: a PEFT adapter folder (the policy, at its root), critic/,
                                    value_head.safetensors, trainer_state.pt (optimizer, scheduler, KL controller,
                                    task sampler, next iteration)
    checkpoints/latest              the name of the newest complete checkpoint

A checkpoint is written into a temporary folder and renamed into place, and ``latest`` is replaced atomically
after that, so a crash at any moment leaves the previous checkpoint intact and pointed to.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch


def checkpoint_dir(output_dir: Path, iteration: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"iter_{iteration:06d}"


def save_checkpoint(
    output_dir: Path, iteration: int, actor_critic, trainer_state: dict, keep: int = 3
) -> Path:
    """Write checkpoint ``iteration`` (the number of iterations done) atomically; keep the newest ``keep``."""
    final = checkpoint_dir(output_dir, iteration)
    final.parent.mkdir(parents=True, exist_ok=True)

    def write(folder: Path) -> None:
        actor_critic.save_pretrained(folder)
        torch.save(trainer_state, folder / "trainer_state.pt")

    write_folder_atomically(final, write)
    _write_atomic(final.parent / "latest", final.name)
    _prune(final.parent, keep)
    return final


def write_folder_atomically(final: Path, write: Callable[[Path], None], keep_existing: bool = False) -> Path:
    """Fill a temporary sibling of ``final`` with ``write(folder)``, then rename it into place.

    A crash or an error mid-write leaves no partial ``final`` (and removes the temporary folder). With
    ``keep_existing``, a non-empty ``final`` that appeared meanwhile (another process built the same cache) is
    kept and ours discarded: replacing it could pull the files from under a process that is reading them.
    """
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        write(tmp)
        if keep_existing and final.is_dir() and any(final.iterdir()):
            shutil.rmtree(tmp, ignore_errors=True)
            return final
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


class CheckpointError(RuntimeError):
    """A checkpoint or run folder that cannot be read; the message names the broken file."""


class RunFolderError(RuntimeError):
    """A run folder that cannot be used as asked (it holds another run; resume flags that would change it)."""


def checkpoint_problem(folder: Path) -> str | None:
    """Why ``folder`` is not a complete, readable checkpoint (naming the file), or None when it is one.

    Every file is read in full: a truncated safetensors or ``trainer_state.pt`` is found here, not halfway
    through restoring a run.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    if not folder.is_dir():
        return f"{folder} does not exist"
    state = folder / "trainer_state.pt"
    if not state.is_file():
        return f"{state} is missing"
    try:
        load_trainer_state(folder)
    except Exception as err:  # any failure to read means broken: say which file and why
        return f"{state} cannot be read ({type(err).__name__}: {err})"
    tensors = sorted(folder.rglob("*.safetensors"))
    if not tensors:
        return f"{folder} holds no adapter weights (*.safetensors)"
    for path in tensors:
        try:
            load_file(str(path))
        except Exception as err:
            return f"{path} cannot be read ({type(err).__name__}: {err})"
    for path in sorted(folder.rglob("*.json")):
        try:
            json.loads(path.read_text())
        except (OSError, ValueError) as err:
            return f"{path} is not valid JSON ({err})"
    return None


def latest_checkpoint(path: str | Path, *, quiet: bool = False) -> Path:
    """The checkpoint to resume from: ``path`` itself, or the newest intact one of the output directory ``path``.

    In an output directory, the checkpoint ``latest`` names comes first; when it is missing or broken, the
    newest intact ``iter_*`` is used instead, with a warning that names what was skipped and why. A checkpoint
    folder given directly must be intact. Raises :class:`CheckpointError` (or ``FileNotFoundError`` when there
    is no checkpoint at all) with the reason.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist: give a run's output directory or a checkpoint folder"
        )
    if (path / "trainer_state.pt").exists():
        problem = checkpoint_problem(path)
        if problem:
            raise CheckpointError(f"checkpoint {path} is broken: {problem}")
        return path
    folder = path / "checkpoints"
    candidates = sorted((p for p in folder.glob("iter_*") if p.is_dir()), reverse=True)
    pointer = folder / "latest"
    if pointer.is_file():
        named = folder / pointer.read_text().strip()
        candidates = [named] + [c for c in candidates if c != named]
    skipped = []
    for candidate in candidates:
        problem = checkpoint_problem(candidate)
        if problem is None:
            if skipped and not quiet:
                print(
                    f"warning: skipped broken checkpoint(s): {'; '.join(skipped)}; using {candidate}",
                    flush=True,
                )
            return candidate
        skipped.append(problem)
    if skipped:
        raise CheckpointError(f"no intact checkpoint in {path}: {'; '.join(skipped)}")
    raise FileNotFoundError(f"no checkpoint in {path} (expected checkpoints/iter_* or trainer_state.pt)")


def output_dir_of(checkpoint: Path) -> Path:
    return checkpoint.parent.parent


def load_trainer_state(checkpoint: Path) -> dict:
    # weights_only=False: the state holds numpy RNG state and plain Python containers written by us.
    return torch.load(checkpoint / "trainer_state.pt", map_location="cpu", weights_only=False)


def save_config(output_dir: Path, config: dict) -> None:
    _write_atomic(Path(output_dir) / "config.json", json.dumps(config, indent=2, sort_keys=True))


def load_config(output_dir: Path) -> dict:
    """The run's ``config.json``; :class:`CheckpointError` naming the file when it is missing or broken."""
    path = Path(output_dir) / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path} is not valid JSON ({err})") from None


def run_config(checkpoint: Path) -> dict:
    """The config of the run ``checkpoint`` belongs to: its ``config.json``, or, when that file is broken, the
    copy every checkpoint keeps in its trainer state (with a warning)."""
    try:
        return load_config(output_dir_of(checkpoint))
    except CheckpointError as err:
        saved = load_trainer_state(checkpoint).get("config")
        if saved is None:
            raise
        print(f"warning: {err}; using the config saved in {checkpoint}", flush=True)
        return saved


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _prune(folder: Path, keep: int) -> None:
    done = sorted(p for p in folder.glob("iter_*") if p.is_dir())
    for old in done[: max(len(done) - keep, 0)]:
        shutil.rmtree(old, ignore_errors=True)
