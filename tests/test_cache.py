"""The cache: SPEC layout, fingerprints, resumability (SIGKILL), no silent mixing, bad input."""

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from cache.reader import Cache
from core.errors import MuskError
from pipeline.extract import load_extract_config, run_extract
from tests.helpers import ROOT, TINY_LLAMA, tiny_extract_config, write_yaml

QUIET = dict(progress=False, log=lambda *a: None)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _content(path: Path) -> dict:
    """Every dataset's values (and the root fingerprint) of a cache file."""
    out = {}
    with h5py.File(path, "r") as f:
        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                v = obj[()]
                out[name] = [x.decode() if isinstance(x, bytes) else x for x in v] if v.dtype == object else v
        f.visititems(visit)
        out["@fingerprint"] = f.attrs["fingerprint"]
    return out


def _assert_same(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k in a:
        if isinstance(a[k], np.ndarray):
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        else:
            assert a[k] == b[k], k


@pytest.mark.slow
def test_spec_layout(tiny_cache):
    with h5py.File(tiny_cache, "r") as f:
        assert f.attrs["musk_schema"] == 5 and bool(f.attrs["complete"]) is True
        assert int(f.attrs["split_overlap"]) == 0
        assert len(f.attrs["fingerprint"]) == 64
        assert "task:" in f.attrs["config"] and '"transformers"' in f.attrs["versions"]
        N = f["prompts/text"].shape[0]
        assert N == 16
        assert sorted(set(f["prompts/split"].asstr()[()])) == ["train", "val"]
        for name, d in (("tiny-llama", 32), ("tiny-gpt2", 24)):
            g = f["experts"][name]
            assert set(g.attrs) >= {"source", "weights_sha256", "hidden_size", "num_layers", "dtype", "prompt_format"}
            assert g.attrs["hidden_size"] == d and g.attrs["num_layers"] == 2 and g.attrs["prompt_format"] == "plain"
            for v in ("last_token", "first_token", "first_layer", "first_block"):
                assert g[v].shape == (N, d) and g[v].dtype == np.float32
            for v in ("random_token", "random_layer"):  # 3 seeded draws per prompt (pooling_draws)
                assert g[v].shape == (N, 3, d) and g[v].dtype == np.float32
            assert g["n_tokens"].shape == (N,) and (g["n_tokens"][()] > 5).all()
            rti, rli = g["random_token_index"][()], g["random_layer_index"][()]
            assert rti.shape == rli.shape == (N, 3)
            assert ((rti >= 0) & (rti < g["n_tokens"][()][:, None])).all()
            assert ((rli >= 0) & (rli <= 2)).all()
            assert g["hint"].shape == (N,)
        assert f["router/all-MiniLM-L6-v2/embedding"].shape == (N, 384)
        emb = f["router/all-MiniLM-L6-v2/embedding"][()]
        np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    with Cache(tiny_cache) as c:
        assert c.check_layout() == []
        assert c.experts == ["tiny-llama", "tiny-gpt2"]
        assert len(c.split_indices("train")) == 12 and len(c.split_indices("val")) == 4


def test_rerun_complete_cache_does_no_work(tiny_cache, tmp_path):
    before, mtime = _sha(tiny_cache), tiny_cache.stat().st_mtime_ns
    msgs = []
    cfg = load_extract_config(None, tiny_extract_config(tiny_cache))
    run_extract(cfg, progress=False, log=msgs.append)
    assert "nothing to do" in msgs[0]
    assert _sha(tiny_cache) == before and tiny_cache.stat().st_mtime_ns == mtime


@pytest.mark.slow
def test_adding_an_expert_computes_only_it(tiny_cache, tmp_path):
    out = tmp_path / "c.h5"
    shutil.copyfile(tiny_cache, out)
    old = _content(out)
    base = tiny_extract_config(out)
    base["experts"] = base["experts"] + [
        {"name": "tiny-llama-b", "kind": "random", "model": "llama", "config": TINY_LLAMA, "seed": 7}
    ]
    msgs = []
    run_extract(load_extract_config(None, base), progress=False, log=msgs.append)
    assert "computed ['tiny-llama-b']" in msgs[-1] and "router" not in msgs[-1]
    new = _content(out)
    for k, v in old.items():  # everything that was there is unchanged
        if k != "@fingerprint":
            np.testing.assert_array_equal(np.asarray(v), np.asarray(new[k])) if isinstance(v, np.ndarray) else None
    assert new["@fingerprint"] != old["@fingerprint"]
    with Cache(out) as c:
        assert c.experts == ["tiny-llama", "tiny-gpt2", "tiny-llama-b"]
        # a different seed gives different features
        assert not np.allclose(c.features("last_token")["tiny-llama"], c.features("last_token")["tiny-llama-b"])


@pytest.mark.parametrize("change", ["task", "expert_seed", "dtype", "dropped_expert"])
def test_cache_from_another_config_is_refused(tiny_cache, tmp_path, change):
    out = tmp_path / "c.h5"
    shutil.copyfile(tiny_cache, out)
    before = _sha(out)
    cfg = tiny_extract_config(out)
    if change == "task":
        cfg["task"]["train_size"] = 13
    elif change == "expert_seed":
        cfg["experts"][0]["seed"] = 99
    elif change == "dtype":
        cfg["dtype"] = "bfloat16"
    else:
        cfg["experts"] = cfg["experts"][:1]
    with pytest.raises(MuskError, match="refusing to mix|does not list|another task config"):
        run_extract(load_extract_config(None, cfg), **QUIET)
    assert _sha(out) == before  # the good cache is untouched


def test_reader_refuses_incomplete_and_foreign_files(tiny_cache, tmp_path):
    bad = tmp_path / "incomplete.h5"
    shutil.copyfile(tiny_cache, bad)
    with h5py.File(bad, "a") as f:
        f.attrs["complete"] = False
    with pytest.raises(MuskError, match="incomplete"):
        Cache(bad)
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = 1
    with pytest.raises(MuskError, match="not a musk cache"):
        Cache(foreign)
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"not hdf5 at all")
    with pytest.raises(MuskError, match="not a readable HDF5"):
        Cache(garbage)


def _extract_cmd(cfg_path: Path) -> list[str]:
    return [sys.executable, "-c", "import cli; cli.main()", "extract", "--config", str(cfg_path), "--no-progress"]


@pytest.mark.slow
def test_sigkill_midway_then_rerun_equals_uninterrupted(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # 32 prompts in batches of 4: 16 feature parts, then every hint; the kill comes after the third part
    cfg = tiny_extract_config(tmp_path / "killed.h5", train_size=24, val_size=8, router=False, batch_size=4,
                              hint_batch_size=4, hint_max_new_tokens=24)
    killed_cfg = write_yaml(tmp_path / "killed.yaml", cfg)
    parts = tmp_path / "killed.h5.parts"
    proc = subprocess.Popen(_extract_cmd(killed_cfg), env=env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if len(list(parts.glob("*/feat_*.npz"))) >= 3:  # mid-way: some features done, every hint pending
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"extraction ended before it could be killed: {proc.stderr.read()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed.h5").exists()
    n_parts = len(list(parts.glob("*/*.npz")))
    assert n_parts >= 2
    rerun = subprocess.run(_extract_cmd(killed_cfg), env=env, cwd=tmp_path, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert not parts.exists()

    cfg["out"] = str(tmp_path / "clean.h5")
    clean_cfg = write_yaml(tmp_path / "clean.yaml", cfg)
    clean = subprocess.run(_extract_cmd(clean_cfg), env=env, cwd=tmp_path, capture_output=True, text=True)
    assert clean.returncode == 0, clean.stderr[-2000:]
    _assert_same(_content(tmp_path / "killed.h5"), _content(tmp_path / "clean.h5"))


def _no_regeneration(monkeypatch):
    import pipeline.extract

    def boom(*a, **k):
        raise AssertionError("prompts were generated again")

    monkeypatch.setattr(pipeline.extract, "build_prompts", boom)


@pytest.mark.slow
def test_resume_reads_saved_prompts_not_regenerated(tmp_path, monkeypatch):
    """Some reasoning-gym generators differ across processes for one seed: a resumed extraction
    must use the prompts its finished batches were computed on."""
    import cache.writer
    import pipeline.extract

    cfg = load_extract_config(None, tiny_extract_config(tmp_path / "c.h5", router=False, hints=False))

    def killed(*a, **k):
        raise KeyboardInterrupt  # dies after every batch is finished, before the cache is written

    monkeypatch.setattr(pipeline.extract, "assemble", killed)
    with pytest.raises(KeyboardInterrupt):
        run_extract(cfg, **QUIET)
    assert (tmp_path / "c.h5.parts" / "prompts.json").exists() and not (tmp_path / "c.h5").exists()
    monkeypatch.setattr(pipeline.extract, "assemble", cache.writer.assemble)
    _no_regeneration(monkeypatch)
    run_extract(cfg, **QUIET)
    with Cache(tmp_path / "c.h5") as c:
        assert len(c) == 16 and c.check_layout() == []


def test_added_expert_reads_the_caches_prompts(tiny_cache, tmp_path, monkeypatch):
    out = tmp_path / "c.h5"
    shutil.copyfile(tiny_cache, out)
    base = tiny_extract_config(out)
    base["experts"] = base["experts"] + [
        {"name": "tiny-llama-c", "kind": "random", "model": "llama", "config": TINY_LLAMA, "seed": 8}
    ]
    _no_regeneration(monkeypatch)
    run_extract(load_extract_config(None, base), **QUIET)
    with Cache(out) as c:
        assert "tiny-llama-c" in c.experts


def test_random_pooling_draws(tiny_cache):
    """Draw 0 is the schema-1 draw; the others are new seeded draws; a training seed reads draw
    seed % D, and the draws differ from each other."""
    from pipeline.pooling import seeded_indices

    with Cache(tiny_cache) as c:
        n_tok = c.column("tiny-llama", "n_tokens")
        rti = c.column("tiny-llama", "random_token_index")
        for k in range(3):
            np.testing.assert_array_equal(rti[:, k], seeded_indices(0, "tiny-llama", n_tok, 2, k)[0])
        assert (rti[:, 0] != rti[:, 1]).any() and (rti[:, 1] != rti[:, 2]).any()
        assert c.draws("random_token", "tiny-llama") == 3 and c.draws("last_token", "tiny-llama") == 1
        f = {k: c.features("random_token", ["tiny-llama"], draw=k)["tiny-llama"] for k in range(4)}
        np.testing.assert_array_equal(f[3], f[0])  # seed 3 reads draw 3 % 3 = 0
        differ = rti[:, 0] != rti[:, 1]
        assert not np.allclose(f[0][differ], f[1][differ])
        with h5py.File(tiny_cache, "r") as h:
            np.testing.assert_array_equal(f[1], h["experts/tiny-llama/random_token"][:, 1])


def _as_schema_1(src: Path, dst: Path) -> Path:
    """A copy of a cache in the schema-1 layout: one random draw [N, d], no first_block."""
    shutil.copyfile(src, dst)
    with h5py.File(dst, "a") as f:
        f.attrs["musk_schema"] = 1
        for name in f["experts"]:
            g = f["experts"][name]
            del g["first_block"]
            for k in ("random_token", "random_layer", "random_token_index", "random_layer_index"):
                first = g[k][()][:, 0]
                del g[k]
                g.create_dataset(k, data=first)
    return dst


def test_schema_1_cache_reads_as_one_draw(tiny_cache, tmp_path):
    old = _as_schema_1(tiny_cache, tmp_path / "v1.h5")
    with Cache(old) as c, Cache(tiny_cache) as new:
        assert c.schema == 1 and c.check_layout() == []
        for draw in (0, 1, 2):  # every seed reads the one draw there is
            np.testing.assert_array_equal(c.features("random_layer", draw=draw)["tiny-gpt2"],
                                          new.features("random_layer", draw=0)["tiny-gpt2"])
        assert c.draws("random_layer", "tiny-gpt2") == 1
        with pytest.raises(MuskError, match="schema 1.*no 'first_block'.*musk extract"):
            c.features("first_block")
    cfg = tiny_extract_config(old)  # adding to it is refused with the reason, the file untouched
    before = _sha(old)
    with pytest.raises(MuskError, match="schema 1; this musk writes schema 5"):
        run_extract(load_extract_config(None, cfg), **QUIET)
    assert _sha(old) == before


def _kill_after(monkeypatch, n: int):
    import cache.writer

    real, saved = cache.writer.PartsStore.save, []

    def dies(self, *a, **k):
        if len(saved) == n:
            raise KeyboardInterrupt("killed")
        saved.append(a)
        return real(self, *a, **k)

    monkeypatch.setattr(cache.writer.PartsStore, "save", dies)


@pytest.mark.slow
def test_rerun_with_other_batch_layout_is_refused(tmp_path, monkeypatch):
    """Reused batches stand for the rows of the run that made them: another batch_size is refused
    by name, the cache is never written, and the same settings complete it."""
    cfg = tiny_extract_config(tmp_path / "c.h5", router=False, batch_size=5)
    _kill_after(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        run_extract(load_extract_config(None, cfg), **QUIET)
    monkeypatch.undo()
    with pytest.raises(MuskError, match="batch_size: 5 then, 4 now"):
        run_extract(load_extract_config(None, {**cfg, "batch_size": 4}), **QUIET)
    assert not (tmp_path / "c.h5").exists()
    run_extract(load_extract_config(None, cfg), **QUIET)
    with Cache(tmp_path / "c.h5") as c:
        assert all(np.abs(c.features("last_token")[n]).sum(1).min() > 0 for n in c.experts)  # no row left zero


def test_assembly_proves_every_row_computed(tmp_path):
    from cache.writer import PartsStore
    from pipeline.parts import gather_parts

    parts = PartsStore(tmp_path / "x.h5", "fp", {"batch_size": 2})
    plan = [np.array([3, 1]), np.array([0, 2])]
    parts.save("g", "feat", 0, rows=plan[0], last_token=np.ones((2, 3), np.float32))
    with pytest.raises(MuskError, match="feat batch 1 was never computed"):
        gather_parts(parts, "g", "feat", plan, N=4, name="e")
    parts.save("g", "feat", 1, rows=np.array([0, 1]), last_token=np.ones((2, 3), np.float32))  # other rows
    with pytest.raises(MuskError, match="batch 1 holds rows other than the plan's"):
        gather_parts(parts, "g", "feat", plan, N=4, name="e")
    parts.save("g", "feat", 1, rows=plan[1], last_token=np.full((2, 3), 2, np.float32))
    out = gather_parts(parts, "g", "feat", plan, N=4, name="e")
    np.testing.assert_array_equal(out["last_token"][:, 0], [2, 1, 2, 1])
    parts.save("h", "feat", 0, rows=np.array([4]), last_token=np.ones((1, 3), np.float32))
    with pytest.raises(MuskError, match="4 of 5 prompts have no feat"):  # a plan that misses rows
        gather_parts(parts, "h", "feat", [np.array([4])], N=5, name="e")


def test_non_finite_features_are_refused_naming_expert_and_prompt():
    from pipeline.parts import check_finite
    from pipeline.tasks import Prompt

    prompts = [Prompt(f"q{i}", "1", "t", "train", "{}") for i in range(3)]
    feats = {"last_token": np.ones((3, 2), np.float32)}
    check_finite(feats, "ok", prompts)
    feats["last_token"][1, 0] = np.inf
    with pytest.raises(MuskError, match=r"expert 'e': last_token is not finite for 1 prompts, e.g. rows 1 \('q1'\)"):
        check_finite(feats, "e", prompts)
