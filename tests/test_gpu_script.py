"""benchmarks/gpu.sh --tiny end to end on a CPU: the GPU check's path (GPU-marked tests, a cache from
experts of the team's shapes, single and perceiver trained through the fixed-shape decoder, decode
and step timings) runs with tiny shapes, so the script cannot rot between GPU loans."""

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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


def test_every_file_with_gpu_marked_tests_is_run_by_gpu_sh():
    """gpu.sh collects a fixed list of test files (others import what a bare GPU machine lacks)."""
    listed = re.search(r'^gpu_tests="([^"]*)"', (ROOT / "benchmarks/gpu.sh").read_text(), re.M).group(1).split()
    marked = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                    if re.search(r"^@pytest\.mark\.gpu$", p.read_text(), re.M))
    assert marked and sorted(listed) == marked


def test_gpu_sh_refuses_an_unknown_option():
    p = subprocess.run(["bash", "benchmarks/gpu.sh", "--bogus"], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 2 and "unknown option --bogus" in p.stderr
