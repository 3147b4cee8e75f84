"""The command line end to end on tiny data: exit codes and one-paragraph messages, no tracebacks."""

import json
import shutil

import pytest
from typer.testing import CliRunner

from cli import app
from tests.helpers import tiny_extract_config, tiny_train_overrides, write_yaml

runner = CliRunner()


def _run(args):
    res = runner.invoke(app, args)
    return res.exit_code, res.output + (res.stderr if res.stderr_bytes is not None else "")


def test_help_lists_commands():
    code, out = _run(["--help"])
    assert code == 0 and all(c in out for c in ("extract", "train", "report"))


@pytest.mark.parametrize("mutate,message", [
    (lambda c: c.update(experts=["no-such-expert"]), "unknown expert 'no-such-expert'; choices: "),
    (lambda c: c["task"].update(family="nope"), "unknown task family 'nope'; choices: "),
    (lambda c: c.update(experts=[{"name": "x", "kind": "hf", "model": "/no/such/folder"}]), "is not a model folder"),
    (lambda c: c.update(batchsize=3), "unknown key(s) ['batchsize']"),
    (lambda c: c["task"].update(family="gsm8k", gsm8k_path="/no/such/gsm8k.jsonl"), "does not exist"),
])
def test_extract_bad_input(tmp_path, mutate, message):
    cfg = tiny_extract_config(tmp_path / "c.h5")
    mutate(cfg)
    code, out = _run(["extract", "--config", str(write_yaml(tmp_path / "x.yaml", cfg))])
    assert code == 2, out
    assert message in out and "Traceback" not in out
    assert not (tmp_path / "c.h5").exists()


def test_extract_missing_config_file(tmp_path):
    code, out = _run(["extract", "--config", str(tmp_path / "missing.yaml")])
    assert code == 2 and "does not exist" in out


def test_extract_refuses_cache_of_other_config(tiny_cache, tmp_path):
    out_path = tmp_path / "c.h5"
    shutil.copyfile(tiny_cache, out_path)
    cfg = tiny_extract_config(out_path, train_size=5)
    code, out = _run(["extract", "--config", str(write_yaml(tmp_path / "x.yaml", cfg))])
    assert code == 2 and "refusing to mix" in out


def test_train_cli_and_bad_input(tiny_cache, tiny_policy, tmp_path, monkeypatch):
    import train.loop

    monkeypatch.setattr(train.loop, "score", lambda e, t, m: float(len(t) % 2))
    ov = tiny_train_overrides(tiny_policy, total_training_steps=1)
    ov.pop("method", None)
    cfg_path = write_yaml(tmp_path / "t.yaml", ov)
    code, out = _run(["train", "--cache", str(tiny_cache), "--method", "nope", "--config", str(cfg_path)])
    assert code == 2 and "unknown method 'nope'; choices: ['single'" in out
    code, out = _run(["train", "--cache", str(tmp_path / "none.h5"), "--method", "single", "--config", str(cfg_path)])
    assert code == 2 and "does not exist" in out
    code, out = _run(["train", "--cache", str(tiny_cache), "--method", "ffn", "--config", str(cfg_path),
                      "--seeds", "3,4", "--out", str(tmp_path / "runs"), "--no-progress"])
    assert code == 0, out
    for s in (3, 4):
        summary = json.loads((tmp_path / "runs" / f"ffn-s{s}" / "summary.json").read_text())
        assert summary["seed"] == s and summary["method"] == "ffn"


def test_threads_option(tiny_cache, tmp_path, monkeypatch):
    import torch

    seen = []
    monkeypatch.setattr(torch, "set_num_threads", lambda n: seen.append(n))
    code, out = _run(["extract", "--threads", "0", "--out", str(tmp_path / "x.h5")])
    assert code == 2 and "--threads must be at least 1" in out and seen == []
    code, out = _run(["train", "--cache", str(tmp_path / "none.h5"), "--method", "single", "--threads", "1"])
    assert seen == [1] and code == 2 and "does not exist" in out  # threads are set before the work starts
