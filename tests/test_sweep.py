"""`musk sweep`: a grid of real `musk train` children on the tiny cache and policy: lanes, rerun,
resume of a killed run, a failing run, bad grids, the plan and its estimate, the Ray executor."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from typer.testing import CliRunner

from cli import app
from core.errors import MuskError
from tests.helpers import ROOT, tiny_train_overrides, write_yaml
from train import sweep_exec
from train.sweep import makespan, plan_lines, plan_sweep, run_sweep
from train.sweep_grid import cell_name
from train.sweep_exec import lane_plan
from train.sweep_watch import RunWatcher, duration

ENTRY = [sys.executable, "-m", "tests.dp_entry"]  # `musk` with the parity reward: random policies get variance
QUIET = dict(poll=0.1, entry=ENTRY)
TIMING = ("step_seconds", "tokens_per_second")


@pytest.fixture(autouse=True)
def _at_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # children import tests.dp_entry from here
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _grid(tmp_path, cache, policy, name="grid.yaml", steps=2, **keys):
    g = {"out": str(tmp_path / "sweep"), "cache": str(cache), "methods": ["single", "perceiver"], "seeds": [0, 1],
         "set": tiny_train_overrides(policy, total_training_steps=steps)}
    g.update(keys)
    return write_yaml(tmp_path / name, g)


def _metrics(run):
    return [{k: v for k, v in json.loads(x).items() if k not in TIMING and not k.startswith("time/")}
            for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_grid_with_two_lanes_completes_and_a_rerun_does_nothing(tiny_cache, tiny_policy, tmp_path):
    grid = _grid(tmp_path, tiny_cache, tiny_policy)
    lines = []
    res = run_sweep(grid, lanes=2, log=lines.append, **QUIET)
    names = ["single-s0", "perceiver-s0", "single-s1", "perceiver-s1"]  # seed outermost
    assert sorted(res.finished) == sorted(names) and not res.failed and not res.remaining
    for n in names:
        run = tmp_path / "sweep" / n
        summary = json.loads((run / "summary.json").read_text())
        assert (summary["method"], summary["seed"], summary["steps"]) == (n.split("-")[0], int(n[-1]), 2)
        assert [r["step"] for r in _metrics(run)] == [1, 2]
        # one line per step and one per evaluation, each naming its run and how far it is
        assert any(x.startswith(f"[{n} 1/2] reward ") for x in lines), lines
        assert any(x.startswith(f"[{n} 2/2] eval at step 2 (val, 4 prompts): accuracy ") for x in lines)
    assert "lane 1" in "\n".join(lines) and "lane 2" in "\n".join(lines)
    assert lines[-1].startswith(f"results: {tmp_path / 'sweep'}/<run>/") and "musk report" in lines[-1]
    assert f"sweep {tmp_path / 'sweep'}: 4 of 4 runs finished (0 before this command), 0 failed" in "\n".join(lines)
    # different seeds and methods are different runs
    assert _metrics(tmp_path / "sweep" / "perceiver-s0") != _metrics(tmp_path / "sweep" / "perceiver-s1")

    logs = {p: p.stat().st_mtime_ns for p in (tmp_path / "sweep" / "logs").iterdir()}
    again = []
    res = run_sweep(grid, lanes=2, log=again.append, **QUIET)
    assert res.finished == [] and sorted(res.before) == sorted(names)
    assert not any("started" in x or "resuming" in x for x in again), again
    assert {p: p.stat().st_mtime_ns for p in logs} == logs  # no child ran

    plan = []
    run_sweep(grid, dry_run=True, log=plan.append)
    assert plan[0].endswith("4 runs: 4 finished, 0 to resume, 0 to start") and plan[-1] == "nothing to run"


class _Recorded(subprocess.Popen):
    started: list = []

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        _Recorded.started.append(self)


def test_killed_run_is_resumed_and_equals_an_uninterrupted_run(tiny_cache, tiny_policy, tmp_path, monkeypatch):
    """Two runs of the same computation side by side (log_freq only changes what is printed); one child
    is killed (SIGKILL) after step 2 of 3 and reported failed, the other finishes. The rerun resumes the
    killed one from its last checkpoint, and its metrics equal those of the one never interrupted."""
    grid = _grid(tmp_path, tiny_cache, tiny_policy, methods=["perceiver"], seeds=[0], grid={"log_freq": [1, 2]},
                 set=tiny_train_overrides(tiny_policy, total_training_steps=3, save_freq=1))
    ref, run = tmp_path / "sweep" / "perceiver-log_freq-1-s0", tmp_path / "sweep" / "perceiver-log_freq-2-s0"
    monkeypatch.setattr(sweep_exec.subprocess, "Popen", _Recorded)
    _Recorded.started = []

    def kill_after_step_2():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            m = run / "metrics.jsonl"
            if m.exists() and len(m.read_text().splitlines()) >= 2:
                os.kill(_Recorded.started[1].pid, signal.SIGKILL)  # the second cell's child
                return
            time.sleep(0.02)

    killer = threading.Thread(target=kill_after_step_2)
    killer.start()
    lines = []
    first = run_sweep(grid, lanes=2, log=lines.append, **QUIET)
    killer.join()
    assert first.finished == [ref.name] and first.failed and first.failed[0][:2] == (run.name, -signal.SIGKILL)
    assert not (run / "summary.json").exists()
    assert any(f"failed: {run.name} (exit -9)" in x and "log: " in x for x in lines), lines

    plan = []
    run_sweep(grid, dry_run=True, step_seconds=10, log=plan.append)
    assert plan[1].split()[:2] == ["done", ref.name]
    assert plan[2].split()[:2] == ["resume", run.name] and "(last checkpoint)" in plan[2]

    lines = []
    second = run_sweep(grid, lanes=2, log=lines.append, **QUIET)
    assert second.finished == [run.name] and second.before == [ref.name] and not second.failed
    assert any(x.startswith(f"[{run.name} ") and "resuming on lane 1" in x for x in lines), lines
    assert _metrics(run) == _metrics(ref) and len(_metrics(run)) == 3
    assert json.loads((run / "summary.json").read_text())["steps"] == 3


def _cli(args):
    res = CliRunner().invoke(app, args)
    return res.exit_code, res.output + (res.stderr if res.stderr_bytes is not None else "")


def test_failing_run_is_reported_and_the_others_finish(tiny_cache, tiny_policy, tmp_path):
    """One cell fails at run time (its team names an expert the cache lacks); the other finishes, the
    end says which failed with its log, and the exit code is 1."""
    grid = _grid(tmp_path, tiny_cache, tiny_policy, methods=["perceiver"], seeds=[0], steps=1,
                 grid={"experts": [["tiny-llama"], ["nope"]]})
    code, out = _cli(["sweep", str(grid), "--lanes", "2", "--quiet", "600"])
    assert code == 1, out
    bad, good = "perceiver-experts-nope-s0", "perceiver-experts-tiny-llama-s0"
    log = tmp_path / "sweep" / "logs" / f"{bad}.log"
    assert "has no expert 'nope'" in log.read_text()
    assert f"failed: {bad} (exit 2): musk: error: " in out and f"log: {log}" in out
    assert (tmp_path / "sweep" / good / "summary.json").exists()
    assert "1 of 2 runs finished (0 before this command), 1 failed, 0 not run" in out
    assert "Traceback" not in out


@pytest.mark.parametrize("keys,message", [
    (dict(methods=["single", "nope"]), "cell nope-s0 (method=nope, seed=0"),
    (dict(grid={"learning_rate": [0.1, 0.2]}), "cell single-learning_rate-0.1-s0"),
    (dict(grid={"lr": ["fast"]}), "cell single-lr-fast-s0"),
    (dict(also=[{"cache": "/no/such/cache.h5", "methods": ["ffn"]}]), "cell ffn-s0 (method=ffn, seed=0, cache=/no/such"),
    (dict(grid={"seed": [1, 2]}), "goes in `methods:` / `seeds:`"),
])
def test_bad_grid_stops_before_any_run_naming_the_cell(tiny_cache, tiny_policy, tmp_path, keys, message):
    grid = _grid(tmp_path, tiny_cache, tiny_policy, seeds=[0], **keys)
    code, out = _cli(["sweep", str(grid)])
    assert code == 2 and message in out and "Traceback" not in out, out
    assert not (tmp_path / "sweep").exists()  # nothing started, nothing written


def test_unknown_method_names_the_choices(tiny_cache, tiny_policy, tmp_path):
    with pytest.raises(MuskError, match=r"cell nope-s0 .*unknown method 'nope'; choices: \['single'"):
        plan_sweep(_grid(tmp_path, tiny_cache, tiny_policy, methods=["nope"], seeds=[0]))


def test_plan_estimate_is_hand_worked(tiny_cache, tiny_policy, tmp_path):
    """4 cells x 2 steps at 10 s a step: 80 s of steps; on 2 lanes 2 x 20 s each = 40 s."""
    folder, cells = plan_sweep(_grid(tmp_path, tiny_cache, tiny_policy))
    lines = plan_lines(folder, cells, 2, 10.0)
    assert lines[0] == f"sweep {folder}: 4 runs: 0 finished, 0 to resume, 4 to start"
    assert [x.split()[:2] for x in lines[1:5]] == [["todo", "single-s0"], ["todo", "perceiver-s0"],
                                                  ["todo", "single-s1"], ["todo", "perceiver-s1"]]
    assert lines[-1].startswith("estimated: 8 steps from 10 s a step (given) = 1m 20s of steps, about 40s on 2 lane(s)")
    unknown = plan_lines(folder, cells, 2, None)[-1]
    assert "estimated time unknown" in unknown and "--step-seconds" in unknown


def test_makespan_and_durations_hand_worked():
    assert makespan([3, 3, 2, 2, 2], 2) == 7  # 3|3, 3+2|3+2, 5+2|5
    assert makespan([5, 1], 4) == 5 and makespan([1, 1, 1], 1) == 3
    assert (duration(7), duration(95), duration(7300)) == ("7s", "1m 35s", "2h 01m")


def test_lanes_split_threads_and_give_each_a_gpu():
    cpu = lane_plan(2, 2, [])
    assert [(ln.threads, ln.env.get("CUDA_VISIBLE_DEVICES")) for ln in cpu] == [(1, None), (1, None)]
    assert cpu[0].env["OMP_NUM_THREADS"] == "1"
    gpu = lane_plan(2, 16, ["0", "1", "2"])
    assert [(ln.threads, ln.env["CUDA_VISIBLE_DEVICES"]) for ln in gpu] == [(8, "0"), (8, "1")]
    assert lane_plan(3, 2, [])[2].threads == 1 and lane_plan(2, 8, [], threads=3)[1].threads == 3
    with pytest.raises(MuskError, match="--lanes 3 but 2 GPU"):
        lane_plan(3, 16, ["0", "1"])
    with pytest.raises(MuskError, match="at least 1"):
        lane_plan(0, 2, [])


def test_names_are_deterministic_from_settings():
    assert cell_name("perceiver", 2, None, None, {}) == "perceiver-s2"
    assert cell_name("ffn", 0, "caches/logic-default.h5", None, {"num_latents": 16, "experts": ["a", "b"]}) == \
        "ffn-logic-default-num_latents-16-experts-a_b-s0"
    assert cell_name("single", 1, None, "configs/train/paper.yaml", {"lr": 1e-4}) == "single-paper-lr-0.0001-s1"


def test_watcher_prints_steps_evals_and_a_heartbeat(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    now = [0.0]
    w = RunWatcher("perceiver-s0", run, 4, 2, 4, tmp_path / "r.log", quiet=60, clock=lambda: now[0])
    assert w.poll() == []
    now[0] = 61
    assert w.poll() == [f"[perceiver-s0 0/4] still running (loading the policy and the cache, or the first step), "
                        f"1m 01s since its last line; its log: {tmp_path / 'r.log'}"]
    with open(run / "metrics.jsonl", "w") as f:
        for k in (1, 2, 3):
            f.write(json.dumps({"step": k, "reward/mean": 0.5, "accuracy": 0.25, "kl": 0.001, "step_seconds": 2.0}) + "\n")
        f.write('{"step": 4, "rew')  # being written: read next time
    lines = w.poll()  # step 1 (the first), step 2 (log_freq 2); 3 is throttled
    assert lines == ["[perceiver-s0 1/4] reward 0.500 acc 0.250 kl 0.0010 | 2.0 s/step, ~6s of steps left",
                     "[perceiver-s0 2/4] reward 0.500 acc 0.250 kl 0.0010 | 2.0 s/step, ~4s of steps left"]
    with open(run / "metrics.jsonl", "a") as f:
        f.write('ard/mean": 1.0, "accuracy": 1.0, "kl": 0.5, "step_seconds": 6.0}\n')
    with open(run / "eval.jsonl", "w") as f:
        f.write(json.dumps({"step": 4, "split": "val", "n": 64, "kind": "full", "accuracy": 0.453125,
                            "accuracy_without_context": 0.40625}) + "\n")
    assert w.poll() == ["[perceiver-s0 4/4] reward 1.000 acc 1.000 kl 0.5000 | 6.0 s/step, ~0s of steps left",
                        "[perceiver-s0 4/4] eval at step 4 (val, 64 prompts): accuracy 45.3%, C removed 40.6%"]


def test_presets_plan_the_paper_grids():
    """The paper's grids and the README's embedded evidence, as presets: the number of runs and their
    settings (caches that are not built yet are listed, not an error, in a plan)."""
    sweeps = ROOT / "configs" / "sweeps"
    counts = {"table1.yaml": 84, "table2.yaml": 15, "figure6.yaml": 21, "embedded-evidence.yaml": 12, "main-job.yaml": 6}
    for name, n in counts.items():
        folder, cells = plan_sweep(sweeps / name)
        assert len(cells) == n, name
        assert name in ("table2.yaml", "figure6.yaml") or "prefix" in {c.method for c in cells}, name
        assert len({c.seed for c in cells}) == (1 if name == "main-job.yaml" else 3)
    folder, t1 = plan_sweep(sweeps / "table1.yaml")
    # 63 runs x 500 steps + 21 GSM8K runs x 233 = 36393 steps; x 13.7 s = 498584.1 s = 138h 29m
    # (caches not built yet count: the plan is for before extraction too)
    assert plan_lines(folder, t1, 8, 13.7)[-1].startswith("estimated: 36393 steps from 13.7 s a step (given) = 138h 29m")
    gsm = [c for c in t1 if "gsm8k" in c.name]
    assert len(gsm) == 21 and {c.steps for c in gsm} == {233} and {c.steps for c in t1 if c not in gsm} == {500}
    assert sorted({c.method for c in t1 if "generalist" in c.cache}) == ["perceiver"]
    _, t2 = plan_sweep(sweeps / "table2.yaml")
    assert {c.train.pooling for c in t2} == {"first_token", "first_layer", "random_token", "random_layer", "last_token"}
    _, f6 = plan_sweep(sweeps / "figure6.yaml")
    assert sorted({c.train.num_latents for c in f6}) == [2, 4, 8, 16, 32, 64, 128]
    folder, ev = plan_sweep(sweeps / "embedded-evidence.yaml")
    assert sorted({c.method for c in ev}) == ["ffn", "perceiver", "prefix", "single"]
    assert all(c.train.total_training_steps == 20 and c.config is None for c in ev)  # the README's embedded runs


def test_ray_executor_runs_the_grid(tiny_cache, tiny_policy, tmp_path):
    """The Ray executor against a real Ray head started here (one node, 2 CPUs)."""
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[ray]')")
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"a local Ray head could not start here: {e}")
    try:
        grid = _grid(tmp_path, tiny_cache, tiny_policy, methods=["single"], seeds=[0, 1], steps=1)
        lines = []
        res = run_sweep(grid, executor="ray", log=lines.append, **QUIET)
        assert sorted(res.finished) == ["single-s0", "single-s1"] and not res.failed, lines
        assert "ray cluster (2 CPUs" in lines[0]
        assert any(x.startswith("[single-s1 1/1] eval at step 1") for x in lines)
    finally:
        ray.shutdown()


def test_watcher_of_a_resumed_run_starts_at_its_checkpoint(tmp_path):
    """Resumed from step_2: steps and evaluations up to 2 were printed by the earlier attempt; a step 3
    logged after the checkpoint (then dropped by the resume) is printed once, when it is redone."""
    run = tmp_path / "r"
    (run / "checkpoints" / "step_2").mkdir(parents=True)
    rec = lambda k: json.dumps({"step": k, "reward/mean": 0.0, "accuracy": 0.0, "kl": 0.0, "step_seconds": 1.0})  # noqa: E731
    (run / "metrics.jsonl").write_text("".join(rec(k) + "\n" for k in (1, 2)))
    (run / "eval.jsonl").write_text(json.dumps({"step": 2, "n": 4, "accuracy": 0.5}) + "\n")
    w = RunWatcher("single-s0", run, 4, 1, 2, tmp_path / "r.log")
    assert w.prefix() == "[single-s0 2/4]" and w.poll() == []
    (run / "metrics.jsonl").write_text("".join(rec(k) + "\n" for k in (1, 2, 3)))
    assert [x[:17] for x in w.poll()] == ["[single-s0 3/4] r"]


def test_one_sweep_at_a_time_drives_a_folder(tiny_cache, tiny_policy, tmp_path):
    from train.sweep import sweep_lock

    grid = _grid(tmp_path, tiny_cache, tiny_policy)
    with sweep_lock(tmp_path / "sweep"):
        with pytest.raises(MuskError, match=f"another musk sweep is running on {tmp_path / 'sweep'} \\(pid {os.getpid()}"):
            run_sweep(grid, log=lambda *a: None, **QUIET)
    assert not list((tmp_path / "sweep").glob("*-s*"))  # no run was started


def test_help_lists_sweep():
    code, out = _cli(["--help"])
    assert code == 0 and "sweep" in out
    code, out = _cli(["sweep", "--help"])
    assert code == 0 and all(k in out for k in ("--lanes", "--executor", "--dry-run", "--step-seconds"))


def test_measure_times_steps_here_without_touching_the_sweep(tiny_cache, tiny_policy, tmp_path):
    from train.sweep import MEASURE_STEPS, measure_step_seconds

    folder, cells = plan_sweep(_grid(tmp_path, tiny_cache, tiny_policy, methods=["single"]))
    now = measure_step_seconds(cells, 1, ENTRY)
    assert set(now) == {"single"} and 0 < now["single"] < 120
    line = plan_lines(folder, cells, 2, None, now)[-1]
    assert line.startswith(f"estimated: 4 steps from step times measured just now, {MEASURE_STEPS} steps of each "
                           f"method one run at a time (single {now['single']:.1f} s)")
    assert not folder.exists()  # measured in a temporary folder
