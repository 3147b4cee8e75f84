"""Edge cases of files from elsewhere and of the cache: no file is unpickled, a completed cache keeps
each part's versions and no dead space, a lock failure says how to turn locking off, Ray runs get the
sweep's environment, eval refuses an adapter that loads nothing, the float32 LM head."""

from __future__ import annotations

import pickle
import random

import numpy as np
import pytest
import torch

from core.errors import MuskError
from train import checkpoint as ckpt


class _Plant:
    """A pickle that creates a file when it is loaded (what a crafted rng.pt does)."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_rng_state_round_trips_through_weights_only_load(tmp_path):
    torch.manual_seed(3), np.random.seed(4), random.seed(5)
    np.random.standard_normal()  # a cached Gaussian in numpy's state
    torch.save(ckpt.rng_state(), tmp_path / "rng.pt")
    want = (torch.rand(3), np.random.standard_normal(3), random.random(), random.gauss(0, 1))
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    ckpt.set_rng_state(ckpt.load_rng(tmp_path / "rng.pt"))
    got = (torch.rand(3), np.random.standard_normal(3), random.random(), random.gauss(0, 1))
    assert torch.equal(want[0], got[0]) and np.array_equal(want[1], got[1]) and want[2:] == got[2:]


@pytest.mark.parametrize("payload", ["crafted", "old"])
@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_crafted_or_old_rng_pt_is_refused_by_name_and_never_unpickled(tmp_path, payload):
    folder = tmp_path / "step_1"
    folder.mkdir()
    planted = tmp_path / "planted"
    if payload == "crafted":
        with open(folder / "rng.pt", "wb") as f:
            pickle.dump({"torch": _Plant(str(planted))}, f)
    else:  # what an older musk wrote: numpy and Python objects
        torch.save({"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                    "cuda": None}, folder / "rng.pt")
    lin = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(lin.parameters())
    torch.save(ckpt.trainable_state(lin.named_parameters()), folder / "lora.pt"), torch.save(lin.state_dict(), folder / "adapter.pt")
    torch.save(opt.state_dict(), folder / "optimizer.pt")
    with pytest.raises(MuskError, match="rng.pt") as e:
        ckpt.load_checkpoint(folder, lin, lin, opt)
    assert str(folder / "rng.pt") in str(e.value) and "start the run again" in str(e.value)
    assert not planted.exists()


def _tiny_lora():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2))
    return get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))


@pytest.mark.parametrize("rename", [False, True])
def test_eval_refuses_an_adapter_that_loads_no_trained_key(tmp_path, rename):

    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    from train.policy import Policy

    src = _tiny_lora()
    m = Policy(peft=_tiny_lora(), lm=None, tok=None, adapter=torch.nn.Linear(2, 2), spec=None, scale=1.0, eos=[])
    state = {k: v.contiguous() for k, v in get_peft_model_state_dict(src).items()}
    if rename:  # another model's module names: nothing matches
        state = {k.replace("layers.0", "blocks.0"): v for k, v in state.items()}
    save_file(state, str(tmp_path / "adapter_model.safetensors"))
    torch.save(m.adapter.state_dict(), tmp_path / "context_adapter.pt")
    if not rename:
        m.load(tmp_path, final=True)
        name = next(n for n, _ in m.peft.named_parameters() if "lora_B" in n)
        assert torch.equal(dict(m.peft.named_parameters())[name], dict(src.named_parameters())[name])
        return
    with pytest.raises(MuskError, match="adapter_model.safetensors") as e:
        m.load(tmp_path, final=True)
    assert "4 trained LoRA tensor(s) it does not set" in str(e.value)


def _cache(path, n=400):
    from cache.writer import assemble

    arrays = {"last_token": np.zeros((n, 8), np.float32), "solo": np.array(["x" * 40] * n, dtype=object),
              "solo_score": np.zeros(n)}
    assemble(path, prompts={"text": ["q"] * n}, experts=[("e", {"source": "x"}, arrays)], routers=[], root_attrs={})


def _recompute_solo(path, n=400):
    from cache.writer import assemble

    assemble(path, prompts=None, experts=[], routers=[], root_attrs={},
             updates=[("e", {"solo_source": "y"}, {"solo": np.array(["y" * 40] * n, dtype=object),
                                                   "solo_score": np.ones(n)})])


def test_recomputed_solo_answers_leave_no_dead_space(tmp_path):
    import h5py

    _cache(tmp_path / "c.h5")
    sizes = [(tmp_path / "c.h5").stat().st_size]
    for _ in range(3):
        _recompute_solo(tmp_path / "c.h5")
        sizes.append((tmp_path / "c.h5").stat().st_size)
    assert max(sizes) - min(sizes) < 4096, sizes  # old: grew by the solo datasets at each rewrite (~37 kB)
    with h5py.File(tmp_path / "c.h5", "r") as f:
        assert f["experts/e/solo"][0].decode() == "y" * 40 and f["experts/e"].attrs["solo_source"] == "y"
        assert f["experts/e/last_token"].shape == (400, 8) and bool(f.attrs["complete"])


def test_completing_a_cache_keeps_the_versions_its_parts_were_made_with(tmp_path, monkeypatch):
    import json

    import h5py

    from cache import writer

    monkeypatch.setattr(writer, "versions", lambda: json.dumps({"musk": "old"}))
    _cache(tmp_path / "c.h5")
    with h5py.File(tmp_path / "c.h5", "a") as f:  # a cache of an older musk: versions at the root only
        for k in ("versions", "solo_versions"):
            f["experts/e"].attrs.pop(k, None)
    monkeypatch.setattr(writer, "versions", lambda: json.dumps({"musk": "new"}))
    _recompute_solo(tmp_path / "c.h5")
    with h5py.File(tmp_path / "c.h5", "r") as f:
        assert json.loads(f.attrs["versions"]) == {"musk": "old"}
        assert json.loads(f["experts/e"].attrs["versions"]) == {"musk": "old"}  # the features'
        assert json.loads(f["experts/e"].attrs["solo_versions"]) == {"musk": "new"}  # the recomputed answers'


def test_a_cache_lock_failure_names_hdf5_use_file_locking(tmp_path, monkeypatch):
    import fcntl

    from cache.reader import Cache

    monkeypatch.delenv("HDF5_USE_FILE_LOCKING", raising=False)
    _cache(tmp_path / "c.h5")
    with open(tmp_path / "c.h5", "rb+") as held:  # a writer holds the file
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(MuskError, match="HDF5_USE_FILE_LOCKING=FALSE"):
            Cache(tmp_path / "c.h5")


class _FakeRay:
    """Ray's calls as RayExecutor makes them; a task runs at once, here, in a 'worker' whose
    environment is whatever os.environ is when it runs."""

    def __init__(self):
        self.options = {}

    def is_initialized(self):
        return True

    def remote(self, fn):
        fake = self

        class Task:
            def options(self, **kw):
                fake.options = kw
                return self

            def remote(self, *args):
                return fn(*args)
        return Task()


def test_ray_runs_receive_the_sweep_environment(tmp_path, monkeypatch):
    import sys

    from sweep.executors import Job, RayExecutor

    fake = _FakeRay()
    monkeypatch.setitem(sys.modules, "ray", fake)
    monkeypatch.setenv("MUSK_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ex = RayExecutor(address=None, cpus_per_run=1, gpus_per_run=0)
    assert fake.options["runtime_env"]["env_vars"]["MUSK_HOME"] == str(tmp_path / "home")
    monkeypatch.delenv("MUSK_HOME")  # the worker's own environment lacks them
    monkeypatch.delenv("HF_HUB_OFFLINE")
    code = "import os; print(os.environ.get('MUSK_HOME'), os.environ.get('HF_HUB_OFFLINE'))"
    rc = ex.start(Job("r", [sys.executable, "-c", code], tmp_path / "r.log", str(tmp_path)))
    assert ex.running["r"] == 0 and rc == "the Ray cluster"
    assert f"{tmp_path / 'home'} 1" in (tmp_path / "r.log").read_text()


def test_typer_and_click_floors_are_versions_that_work_together():
    """typer 0.12-0.15 with click >= 8.2 end `musk --help` in a TypeError (make_metavar); typer 0.16.0
    ran the CLI tests with click 8.0.0 to 8.5.1. The floors say so."""
    import re
    from pathlib import Path

    deps = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    floor = {m[0]: tuple(int(x) for x in m[1].split(".")) for m in re.findall(r'"(typer|click)>=([\d.]+)"', deps)}
    assert floor["typer"] >= (0, 16) and floor["click"] >= (8, 0)


@pytest.mark.slow
def test_musk_help_exits_0_with_the_installed_typer_and_click():
    import subprocess
    import sys
    from pathlib import Path

    p = subprocess.run([sys.executable, "-c", "import sys; sys.argv = ['musk', '--help']; import cli; cli.main()"],
                       capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert p.returncode == 0 and "Traceback" not in p.stderr and "extract" in p.stdout


def test_the_float32_head_computes_logits_from_float32_hidden_states_and_weight():
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.generation import lm_logits, set_head_fp32

    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2)).to(torch.bfloat16)
    h = torch.randn(3, 5, 32).to(torch.bfloat16)
    w = lm.get_output_embeddings().weight
    off = lm_logits(lm, h)
    assert torch.equal(off, (h @ w.T).float())  # the bf16 product, rounded to bf16, then widened
    set_head_fp32(lm, True)
    on = lm_logits(lm, h, head=lambda x: pytest.fail("the fused head is bypassed"))
    assert on.dtype == torch.float32 and on.shape == (3, 5, 96)
    torch.testing.assert_close(on, h.float() @ w.float().T, rtol=1e-6, atol=1e-6)
    assert (on - off).abs().max() > 0  # bf16 rounding of the logits, gone
    with torch.no_grad():
        w.mul_(2)  # a changed weight is copied again
    torch.testing.assert_close(lm_logits(lm, h), 2 * on, rtol=1e-6, atol=1e-6)
    set_head_fp32(lm, False)
    assert torch.equal(lm_logits(lm, h), (h @ w.T).float())


def test_lm_head_fp32_is_a_config_key_old_runs_resume_without(tiny_policy):
    from train.config import DEFAULTS_BEFORE_KEY, load_train_config
    from train.policy import load_policy

    assert load_train_config(None, {}).policy.lm_head_fp32 is False and DEFAULTS_BEFORE_KEY["lm_head_fp32"] is False
    with pytest.raises(MuskError, match="lm_head_fp32 needs rollout_engine musk"):
        load_train_config(None, {"lm_head_fp32": True, "rollout_engine": "vllm"})
    cfg = load_train_config(None, {"policy": str(tiny_policy), "lm_head_fp32": True})
    peft_model, _, _ = load_policy(cfg, torch.bfloat16, "cpu")
    assert peft_model.get_output_embeddings().musk_fp32 is True


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("name", ["lora.pt", "adapter.pt", "optimizer.pt"])
def test_every_checkpoint_file_is_loaded_safely_and_refused_by_name(tmp_path, name):
    lin = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(lin.parameters())
    torch.save(ckpt.trainable_state(lin.named_parameters()), tmp_path / "lora.pt")
    torch.save(lin.state_dict(), tmp_path / "adapter.pt"), torch.save(opt.state_dict(), tmp_path / "optimizer.pt")
    torch.save(ckpt.rng_state(), tmp_path / "rng.pt")
    with open(tmp_path / name, "wb") as f:
        pickle.dump({"w": _Plant(str(tmp_path / "planted"))}, f)
    with pytest.raises(MuskError, match=name):
        ckpt.load_checkpoint(tmp_path, lin, lin, opt)
    assert not (tmp_path / "planted").exists()
