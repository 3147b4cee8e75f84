"""The command line end to end on tiny data: exit codes and one-paragraph messages, no tracebacks."""

import json
import shutil

import pytest
from typer.testing import CliRunner

from cli import app
from tests.helpers import parity_score, tiny_extract_config, tiny_train_overrides, write_yaml

runner = CliRunner()


def _run(args):
    res = runner.invoke(app, args, obj={"scorer": parity_score})  # random policies: a reward with variance
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
@pytest.mark.slow
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


@pytest.mark.slow
def test_train_cli_and_bad_input(tiny_cache, tiny_policy, tmp_path, monkeypatch):
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


# --- --set KEY=VALUE --------------------------------------------------------------------------------


@pytest.mark.slow
def test_train_set_values_land_in_the_saved_config(tiny_cache, tiny_policy, tmp_path, monkeypatch):
    import yaml

    from train.config import flatten

    cfg_path = write_yaml(tmp_path / "t.yaml", tiny_train_overrides(tiny_policy, total_training_steps=1))
    code, out = _run(["train", "--cache", str(tiny_cache), "--method", "single", "--config", str(cfg_path),
                      "--out", str(tmp_path / "run"), "--no-progress", "--lr", "0.5",
                      "--set", "beta=0.01", "--set", "loss_type=dr_grpo", "--set", "num_iterations=2",
                      "--set", "clip_eps_high=0.28", "--set", "lora_target_modules=[q_proj, v_proj]",
                      "--set", "decode_merged=off", "--set", "top_k=20", "--set", "optim.lr=1e-3",
                      "--set", "grpo.beta=0.02"])
    assert code == 0, out
    written = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert written["grpo"]["beta"] == 0.02 and written["optim"]["lr"] == 1e-3  # saved in sections
    saved = flatten(written)
    assert saved["beta"] == 0.02  # later --set wins, flat or dotted
    assert saved["lr"] == 1e-3  # --set wins over the named flag
    assert (saved["loss_type"], saved["num_iterations"], saved["clip_eps_high"]) == ("dr_grpo", 2, 0.28)
    assert saved["top_k"] == 20
    assert saved["lora_target_modules"] == ["q_proj", "v_proj"]
    assert saved["decode_merged"] == "off"  # the text typed, not YAML's reading of off as false
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 1


@pytest.mark.parametrize("item,message", [
    ("betta=0.1", "--set 'betta': unknown key 'betta'; nearest valid keys: ['grpo.beta'"),
    ("loss=dapo", "--set 'loss': unknown key 'loss'; nearest valid keys: ['grpo.loss_type']"),
    ("group_size=abc", "--set grpo.group_size: expected an integer, got 'abc' (field type int; nearest "
                       "valid keys: ['grpo.group_size'"),
    ("beta=[1]", "--set grpo.beta: expected a number, got [1]"),
    ("experts=3", "--set experts: expected a list, got 3"),
    ("beta", "--set 'beta': expected KEY=VALUE"),
    ("loss_type=ppo", "unknown loss_type 'ppo'; choices: ['grpo', 'dr_grpo', 'dapo', 'bnpo']"),
    ("lr.x=1", "'lr' is not a nested config"),
])
def test_train_bad_set_stops_before_writing(tiny_cache, tiny_policy, tmp_path, item, message):
    cfg_path = write_yaml(tmp_path / "t.yaml", tiny_train_overrides(tiny_policy, total_training_steps=1))
    code, out = _run(["train", "--cache", str(tiny_cache), "--method", "single", "--config", str(cfg_path),
                      "--out", str(tmp_path / "run"), "--no-progress", "--set", item])
    assert code == 2, out
    assert message in out and "Traceback" not in out
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_extract_set_values_land_in_the_cache_config(tmp_path):
    import h5py
    import yaml

    out_path = tmp_path / "c.h5"
    cfg = tiny_extract_config(out_path, hints=False, router=False)
    cfg["experts"] = cfg["experts"][:1]
    code, out = _run(["extract", "--config", str(write_yaml(tmp_path / "x.yaml", cfg)), "--no-progress",
                      "--set", "task.train_size=5", "--set", "task.val_size=2", "--set", "batch_size=3"])
    assert code == 0, out
    with h5py.File(out_path, "r") as f:
        saved = yaml.safe_load(f.attrs["config"])
        n = len(f["prompts/text"])
    assert (saved["task"]["train_size"], saved["task"]["val_size"], saved["batch_size"]) == (5, 2, 3)
    assert n == 7


@pytest.mark.parametrize("item,message", [
    ("task.trainsize=5", "--set 'task.trainsize': unknown key 'trainsize' for task; nearest valid keys: "
                         "['task.train_size'"),
    ("tsk.train_size=5", "unknown key 'tsk'; nearest valid keys: ['task'"),
    ("task.train_size=five", "--set task.train_size: expected an integer, got 'five'"),
])
def test_extract_bad_set_stops_before_writing(tmp_path, item, message):
    out_path = tmp_path / "c.h5"
    cfg = tiny_extract_config(out_path)
    code, out = _run(["extract", "--config", str(write_yaml(tmp_path / "x.yaml", cfg)), "--set", item])
    assert code == 2, out
    assert message in out and "Traceback" not in out
    assert not out_path.exists()
