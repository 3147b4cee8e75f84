"""The shared core (core/) and the run-folder owner (cache/run_folder.py)."""

import os

import pytest

from cache.run_folder import COMPLETIONS, EVAL, METRICS, RunFolder
from core.atomic import atomic_path, atomic_write_text


def test_atomic_write_replaces_and_fsyncs_file_and_folder(tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real(fd)))
    target = tmp_path / "a.json"
    target.write_text("old")
    atomic_write_text(target, "new")
    assert target.read_text() == "new"
    assert str(target.parent) in synced  # the rename is made durable
    assert any(s.startswith(str(target) + ".tmp") for s in synced)  # the content before the rename
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]  # no temporary left


def test_atomic_path_failure_leaves_target_untouched(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("good")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "good" and sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_atomic_folder_replace_and_first_writer_wins(tmp_path):
    target = tmp_path / "ckpt"
    for content in ("one", "two"):
        with atomic_path(target, directory=True) as tmp:
            (tmp / "f").write_text(content)
    assert (target / "f").read_text() == "two"
    with atomic_path(target, directory=True, replace=False) as tmp:
        (tmp / "f").write_text("three")
    assert (target / "f").read_text() == "two"  # kept: another process converted it first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_run_folder_logs_truncate_and_state(tmp_path):
    run = RunFolder(tmp_path / "r")
    assert not run.holds_anything() and not run.is_run() and run.latest_checkpoint() is None
    run.write_config({"method": "single", "seed": 0})
    for step in (1, 2, 3):
        run.append(METRICS, {"step": step, "reward/mean": step / 10})
        run.append(EVAL, {"step": step, "accuracy": 0.5})
    run.append(COMPLETIONS, {"step": 2, "prompt": "p"})
    assert run.is_run() and run.read_config() == {"method": "single", "seed": 0}
    run.truncate(1)  # what a resume from step 1 drops
    assert [r["step"] for r in run.read(METRICS)] == [1] and run.read(COMPLETIONS) == []
    for step in (2, 10):
        run.checkpoint(step).mkdir(parents=True)
    (run.path / "checkpoints" / "step_x").mkdir()
    assert run.latest_checkpoint() == run.checkpoint(10)
    run.write_summary({"steps": 3})
    assert run.read_summary() == {"steps": 3}
    with pytest.raises(AssertionError):
        run.log_path("other.jsonl")


def test_parse_sets_types_values_by_the_field():
    from core.config import from_dict, parse_sets
    from pipeline.extract import ExtractConfig
    from train.config import TrainConfig, parse_train_sets

    got = parse_train_sets(["decode_merged=off", "policy=123", "router=null", "experts=[a, b]", "grpo.beta=1e-3",
                            "eval_null_context=yes", "context.pooling='first_token'"])
    assert got == {"sampling": {"decode_merged": "off"}, "policy": {"name": "123"}, "context": {"router": None,
                   "pooling": "first_token"}, "experts": ["a", "b"], "grpo": {"beta": "1e-3"},
                   "eval": {"eval_null_context": True}}
    assert parse_sets(ExtractConfig, ["task.train_size=5", "task.val_size=2", "task.train_size=6"]) == {
        "task": {"train_size": 6, "val_size": 2}}
    cfg = from_dict(TrainConfig, {k: v for k, v in got.items() if k not in ("experts", "policy")})
    assert parse_train_sets(["sampling.decode_merged=off"]) == parse_train_sets(["decode_merged=off"])
    assert (cfg.grpo.beta, cfg.sampling.decode_merged, cfg.context.router, cfg.context.pooling) == (1e-3, "off", None, "first_token")


def test_progress_bar_writes_plain_lines_where_stderr_is_not_a_terminal():
    """In a log file or a pipe, the bar is whole lines (no carriage returns), the last at 100%."""
    import io

    from core.progress import bar

    out = io.StringIO()  # not a terminal
    with bar(4, "extract", "prompt", every=0, stream=out) as b:
        for _ in range(4):
            b.update(1)
    text = out.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert lines[0].startswith("extract:   0%") and "0/4" in lines[0]
    assert lines[-1].startswith("extract: 100%") and "4/4" in lines[-1]
    assert len(lines) == len(set(lines)) >= 3  # progress in between, no repeated line
    quiet = io.StringIO()
    with bar(4, "extract", "prompt", disable=True, stream=quiet) as b:
        b.update(4)
    assert quiet.getvalue() == ""
