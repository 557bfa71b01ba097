"""Run folders and checkpoints as a careless or hostile user meets them: nothing lost, every error one line.

Checkpoints here are written by hand in the layout of ``ppo.infra.checkpoint`` (no model is trained), so each test
runs in well under a second; the trainer's own checkpoints are exercised by tests/test_train.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ppo import train
from ppo.infra.checkpoint import CheckpointError, RunFolderError, latest_checkpoint, run_config
from ppo.infra.config import Config, parse_args, to_dict
from ppo.trainer import loop

REPO = Path(__file__).resolve().parents[1]


def _write_checkpoint(run: Path, iteration: int, config: dict) -> Path:
    folder = run / "checkpoints" / f"iter_{iteration:06d}"
    (folder / "critic").mkdir(parents=True)
    save_file({"w": torch.ones(2)}, str(folder / "adapter_model.safetensors"))
    save_file({"w": torch.ones(2)}, str(folder / "critic" / "adapter_model.safetensors"))
    save_file({"w": torch.ones(2)}, str(folder / "value_head.safetensors"))
    (folder / "adapter_config.json").write_text("{}")
    torch.save({"iteration": iteration, "config": config}, folder / "trainer_state.pt")
    (run / "checkpoints" / "latest").write_text(folder.name)
    return folder


@pytest.fixture
def run(tmp_path) -> Path:
    """A run folder with checkpoints after iterations 1 and 2, ``latest`` naming the second."""
    folder = tmp_path / "run"
    config = to_dict(Config(output_dir=str(folder), learning_rate=3e-4, iterations=2))
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "metrics.jsonl").write_text('{"iteration": 0}\n{"iteration": 1}\n')
    _write_checkpoint(folder, 1, config)
    _write_checkpoint(folder, 2, config)
    return folder


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize(
    ("damage", "named"),
    [
        (lambda ckpt: _truncate(ckpt / "adapter_model.safetensors"), "adapter_model.safetensors"),
        (lambda ckpt: _truncate(ckpt / "critic" / "adapter_model.safetensors"), "critic"),
        (lambda ckpt: _truncate(ckpt / "trainer_state.pt"), "trainer_state.pt"),
        (lambda ckpt: (ckpt / "adapter_config.json").write_text("{broken"), "adapter_config.json"),
    ],
)
def test_a_broken_newest_checkpoint_falls_back_to_the_previous_one_and_says_why(run, capsys, damage, named):
    damage(run / "checkpoints" / "iter_000002")
    assert latest_checkpoint(run) == run / "checkpoints" / "iter_000001"
    warning = capsys.readouterr().out
    assert "skipped broken checkpoint" in warning and named in warning and "iter_000002" in warning
    with pytest.raises(CheckpointError, match=named):  # named directly, a broken checkpoint is refused
        latest_checkpoint(run / "checkpoints" / "iter_000002")


def test_latest_naming_a_missing_folder_falls_back_to_the_newest_intact(run, capsys):
    (run / "checkpoints" / "latest").write_text("iter_000009")
    assert latest_checkpoint(run) == run / "checkpoints" / "iter_000002"
    assert "iter_000009 does not exist" in capsys.readouterr().out


def test_no_intact_checkpoint_is_one_error_naming_every_broken_file(run):
    for name in ("iter_000001", "iter_000002"):
        _truncate(run / "checkpoints" / name / "trainer_state.pt")
    with pytest.raises(CheckpointError, match="no intact checkpoint") as err:
        latest_checkpoint(run)
    assert str(err.value).count("trainer_state.pt") == 2


def test_a_broken_config_json_falls_back_to_the_config_in_the_checkpoint(run, capsys):
    (run / "config.json").write_text('{"learning_rate": ')
    assert run_config(latest_checkpoint(run))["learning_rate"] == 3e-4
    assert "config.json is not valid JSON" in capsys.readouterr().out


def test_a_new_run_refuses_a_folder_that_holds_a_run_and_leaves_it_untouched(run):
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(RunFolderError, match="--resume"):
        train.main(Config(output_dir=str(run), tasks="/no/such/tasks.jsonl"))
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_a_new_run_refuses_a_folder_of_other_files_even_with_overwrite(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(RunFolderError, match="holds no run"):
        train.main(Config(output_dir=str(tmp_path), overwrite=True))
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_a_run_that_cannot_start_leaves_no_folder(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(Exception, match="no-such"):
        train.main(Config(output_dir=str(out), tasks=str(tmp_path / "no-such.jsonl")))
    assert not out.exists()


def test_overwrite_deletes_the_old_run_before_the_new_one_writes(run, monkeypatch):
    cfg = Config(output_dir=str(run), overwrite=True)
    _, output_dir, resume = loop._prepare_run(cfg)
    assert resume is None and (run / "checkpoints").is_dir()  # nothing is deleted before the run can start
    loop._open_run_folder(cfg, output_dir)
    assert sorted(p.name for p in run.iterdir()) == ["config.json"]
    assert json.loads((run / "config.json").read_text())["overwrite"] is True


def test_resume_applies_the_flags_that_may_change_and_refuses_the_others(run, capsys):
    cfg = parse_args(["--resume", str(run), "--iterations", "30", "--eval-every", "2"])
    saved, output_dir, checkpoint = loop._prepare_run(cfg)
    assert (saved.iterations, saved.eval_every, saved.learning_rate) == (30, 2, 3e-4)
    assert checkpoint.name == "iter_000002" and output_dir == run
    assert "resume: --iterations 30 (was 2)" in capsys.readouterr().out
    # The default learning rate is 7e-4: written on the command line, it is a change, and refused.
    for flags, named in (
        (["--learning-rate", "7e-4"], "--learning-rate 0.0007 (the run's: 0.0003)"),
        (["--tasks", "other.jsonl", "--seed", "3"], "--seed 3"),
        (["--output-dir", str(run.parent / "elsewhere")], "--output-dir"),
    ):
        with pytest.raises(RunFolderError, match="would change it") as err:
            loop._prepare_run(parse_args(["--resume", str(run), *flags]))
        assert named in str(err.value)
    # Written but equal to the run's value: nothing changes, nothing is refused.
    saved, _, _ = loop._prepare_run(parse_args(["--resume", str(run), "--learning-rate", "3e-4"]))
    assert saved.learning_rate == 3e-4


def test_the_interrupt_message_says_whether_there_is_anything_to_resume(run, tmp_path):
    assert f"continue with --resume {run}" in train._resume_hint(str(run))
    assert "iter_000002 is intact" in train._resume_hint(str(run))
    assert "nothing to resume" in train._resume_hint(str(tmp_path / "never-started"))
    assert "nothing to resume" in train._resume_hint(None)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--call-timeout", "0"], "call_timeout must be > 0"),
        (["--call-timeout", "-1"], "call_timeout must be > 0"),
        (["--learning-rate", "-1"], "learning_rate"),
        (["--max-turns", "0"], "max_turns must be >= 1"),
        (["--lora-r", "0"], "lora_r must be >= 1"),
        (["--kl-horizon", "0"], "kl_horizon must be > 0"),
        (["--save-every", "-1"], "save_every"),
        (["--ppo-epochs", "0"], "ppo_epochs"),
        (["--resume", "x", "--overwrite"], "exclude each other"),
    ],
)
def test_bad_settings_are_one_line_before_anything_loads(flags, message):
    with pytest.raises(SystemExit, match=message):
        parse_args(flags)


def test_an_output_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(SystemExit, match="is a file"):
        parse_args(["--output-dir", str(tmp_path / "f")])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_asking_for_cuda_without_one_is_refused():
    with pytest.raises(SystemExit, match="no CUDA device"):
        parse_args(["--device", "cuda"])


def _cli(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )


def test_train_cli_names_the_broken_file_in_one_line(run):
    for name in ("iter_000001", "iter_000002"):
        _truncate(run / "checkpoints" / name / "value_head.safetensors")
    proc = _cli("ppo.train", "--resume", str(run))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: no intact checkpoint") and "value_head.safetensors" in proc.stderr


@pytest.mark.parametrize(
    ("module", "flags", "message"),
    [
        ("ppo.evaluate", ["--batch-size", "0"], "--batch-size must be >= 1"),
        ("ppo.evaluate", ["--limit", "-1"], "--limit must be >= 0"),
        ("ppo.evaluate", ["--max-new-tokens", "-1"], "argument --max-new-tokens: must be >= 0"),
        ("ppo.chat", ["--max-context", "-2"], "argument --max-context: must be >= 0"),
        ("ppo.evaluate", ["--json", "."], "is a folder"),
        ("ppo.evaluate", ["--checkpoint", "/no/such/run"], "does not exist"),
        ("ppo.plot", ["/no/such/run"], "does not exist"),
        ("mcp_mock", ["--http", "--port", "99999"], "--port must be between 1 and 65535"),
        ("mcp_mock.bfcl", ["--http", "--port", "0"], "--port must be between 1 and 65535"),
        *([] if torch.cuda.is_available() else [("ppo.bench", ["--gpu-only"], "no CUDA device")]),
    ],
)
def test_command_lines_refuse_bad_input_in_one_line(module, flags, message):
    proc = _cli(module, *flags)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert message in proc.stderr
