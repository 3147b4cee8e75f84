"""musk under torchrun (2 gloo processes on the CPU): the files are the same as one process's."""

import os
import subprocess
import sys

import h5py
import numpy as np
import pytest

from cache.reader import Cache
from pipeline.extract import load_extract_config, run_extract
from tests.helpers import tiny_extract_config, write_yaml

QUIET = dict(progress=False, log=lambda *a: None)


def _torchrun(args, tmp_path, nproc=2):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
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


def test_extract_under_torchrun_equals_one_process(tmp_path):
    one = run_extract(load_extract_config(str(write_yaml(tmp_path / "a.yaml", tiny_extract_config(tmp_path / "one.h5")))),
                      **QUIET)
    cfg = write_yaml(tmp_path / "b.yaml", tiny_extract_config(tmp_path / "two.h5"))
    res = _torchrun(["extract", "--config", str(cfg), "--no-progress"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    _same_cache(one, tmp_path / "two.h5")
    assert not (tmp_path / "two.h5.parts").exists()
    with Cache(tmp_path / "two.h5") as c:
        assert c.experts == ["tiny-llama", "tiny-gpt2"] and len(c.hints("tiny-llama")) == 16


def test_killed_extraction_is_completed_by_a_run_with_another_process_count(tmp_path, monkeypatch):
    """Batches finished before a kill are kept; a rerun under torchrun (2 ranks) completes the same cache."""
    import cache.writer

    one = run_extract(load_extract_config(str(write_yaml(tmp_path / "a.yaml", tiny_extract_config(tmp_path / "one.h5")))),
                      **QUIET)
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
