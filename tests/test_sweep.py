"""`musk sweep`: a grid of real `musk train` children on the tiny cache and policy: lanes, rerun,
resume of a killed run, a failing run, bad grids, the plan and its estimate, the Ray executor."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli import app
from core.errors import MuskError
from tests.helpers import ROOT, tiny_train_overrides, write_yaml
from sweep import executors as sweep_exec
from sweep.runner import makespan, plan_lines, plan_sweep, run_sweep
from sweep.grid import cell_name
from sweep.executors import lane_plan
from sweep.watch import RunWatcher, duration

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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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
    w = RunWatcher("perceiver-s0", run, 4, 2, test_freq=4, log=tmp_path / "r.log", quiet=60, clock=lambda: now[0])
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


@pytest.mark.slow
def test_presets_plan_the_paper_grids():
    """The paper's grids and the README's embedded evidence, as presets: the number of runs and their
    settings (caches that are not built yet are listed, not an error, in a plan)."""
    sweeps = ROOT / "configs" / "sweeps"
    counts = {"table1.yaml": 84, "table2.yaml": 15, "figure6.yaml": 21, "embedded-evidence.yaml": 18, "main-job.yaml": 6}
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
    assert {c.train.context.pooling for c in t2} == {"first_token", "first_layer", "random_token", "random_layer", "last_token"}
    _, f6 = plan_sweep(sweeps / "figure6.yaml")
    assert sorted({c.train.context.num_latents for c in f6}) == [2, 4, 8, 16, 32, 64, 128]
    folder, ev = plan_sweep(sweeps / "embedded-evidence.yaml")
    assert sorted({c.method for c in ev}) == ["ffn", "hard-routing", "output-collab", "perceiver", "prefix", "single"]
    assert all(c.train.optim.total_training_steps == 20 and c.config is None for c in ev)  # the README's embedded runs
    _, reads = plan_sweep(sweeps / "probe-reads.yaml")  # the sums probe's reading recipe: 5 seeds, matched prefix
    assert sorted((c.method, c.seed) for c in reads) == [(m, s) for m in ("perceiver", "prefix") for s in range(5)]
    assert {(c.train.recipe.sft_warmup_steps, c.train.recipe.sft_warmup_train, c.train.recipe.sft_reference,
             c.train.optim.router_lr, c.train.optim.total_training_steps) for c in reads} == {(600, "context", "warmup-end", 1e-3, 620)}


@pytest.mark.slow
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
    w = RunWatcher("single-s0", run, 4, 1, test_freq=2, log=tmp_path / "r.log")
    assert w.prefix() == "[single-s0 2/4]" and w.poll() == []
    (run / "metrics.jsonl").write_text("".join(rec(k) + "\n" for k in (1, 2, 3)))
    assert [x[:17] for x in w.poll()] == ["[single-s0 3/4] r"]


def test_one_sweep_at_a_time_drives_a_folder(tiny_cache, tiny_policy, tmp_path):
    from sweep.runner import sweep_lock

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


@pytest.mark.slow
def test_measure_times_steps_here_without_touching_the_sweep(tiny_cache, tiny_policy, tmp_path):
    from sweep.runner import MEASURE_STEPS, measure_step_seconds

    folder, cells = plan_sweep(_grid(tmp_path, tiny_cache, tiny_policy, methods=["single"]))
    now = measure_step_seconds(cells, 1, ENTRY)
    assert set(now) == {"single"} and 0 < now["single"] < 120
    line = plan_lines(folder, cells, 2, None, measured_now=now)[-1]
    assert line.startswith(f"estimated: 4 steps from step times measured just now, {MEASURE_STEPS} steps of each "
                           f"method one run at a time (single {now['single']:.1f} s)")
    assert not folder.exists()  # measured in a temporary folder


# ---------------------------------------------------------------------------------------------
# Lanes sized from the CPUs this process may use; cells named from typed values; the plan's checks.


def test_usable_cpus_is_the_fewest_of_affinity_and_cgroup_quota(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 128)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)  # SLURM: 8 of 128
    monkeypatch.setattr(sweep_exec, "CGROUP", tmp_path)  # no quota files: affinity alone
    assert sweep_exec.usable_cpus() == 8
    (tmp_path / "cpu.max").write_text("max 100000\n")  # v2, no quota
    assert sweep_exec.usable_cpus() == 8
    (tmp_path / "cpu.max").write_text("250000 100000\n")  # v2: 2.5 CPUs -> 2 threads
    assert sweep_exec.usable_cpus() == 2
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("400000\n")  # v1: 4 CPUs
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert sweep_exec.usable_cpus() == 4
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)  # taskset -c 0
    assert sweep_exec.usable_cpus() == 1
    # the executor's lanes split these, not os.cpu_count()
    from sweep.runner import make_executor
    monkeypatch.setattr(sweep_exec, "visible_gpus", lambda: [])
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert [ln.threads for ln in make_executor("local", 2, None, None, None).lanes] == [2, 2]


def _raw_grid(tmp_path, cache, policy, body: str, name="grid.yaml"):
    """A grid file with `body` written as is (YAML spellings matter), after out/cache/set."""
    import yaml
    head = {"out": str(tmp_path / "sweep"), "cache": str(cache), "seeds": [0],
            "set": tiny_train_overrides(policy)}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(head, sort_keys=False) + body)
    return path


def test_cells_are_named_from_the_typed_value(tiny_cache, tiny_policy, tmp_path):
    # YAML 1.1 reads 1e-3 as a string and `off` as false; the cell is named from what the config holds
    _, cells = plan_sweep(_raw_grid(tmp_path, tiny_cache, tiny_policy,
                                    "methods: [single]\ngrid:\n  lr: [1e-3, 2_000e-7]\n  decode_merged: [off]\n"))
    assert [c.name for c in cells] == ["single-lr-0.001-decode_merged-off-s0", "single-lr-0.0002-decode_merged-off-s0"]
    assert [c.train.optim.lr for c in cells] == [0.001, 0.0002] and cells[0].train.sampling.decode_merged == "off"
    # two spellings of one value: one configuration, refused before anything starts, naming both
    grid = _raw_grid(tmp_path, tiny_cache, tiny_policy, "methods: [single]\ngrid:\n  lr: [1e-3, 0.001]\n", "two.yaml")
    with pytest.raises(MuskError, match=r"two cells are named 'single-lr-0.001-s0'.*one value as the train config"):
        plan_sweep(grid)


def test_two_cells_of_one_resolved_configuration_are_refused(tiny_cache, tiny_policy, tmp_path):
    a = write_yaml(tmp_path / "a.yaml", tiny_train_overrides(tiny_policy))
    b = write_yaml(tmp_path / "b.yaml", tiny_train_overrides(tiny_policy))  # the same settings, another file
    grid = _grid(tmp_path, tiny_cache, tiny_policy, config=[str(a), str(b)], methods=["single"], seeds=[0])
    with pytest.raises(MuskError, match=r"cell single-b-s0 .* and cell single-a-s0 are one configuration"):
        plan_sweep(grid)
    code, out = _cli(["sweep", str(grid), "--dry-run"])
    assert code == 2 and "one configuration" in out and "Traceback" not in out


def test_keys_a_method_does_not_read_do_not_multiply_its_runs(tiny_cache, tiny_policy, tmp_path):
    grid = _grid(tmp_path, tiny_cache, tiny_policy, seeds=[0], grid={"router_lr": [0.001, 0.01], "lr": [0.1, 0.2]})
    folder, cells = plan_sweep(grid)
    assert sorted(c.name for c in cells) == sorted(
        ["single-lr-0.1-s0", "single-lr-0.2-s0"] +
        [f"perceiver-router_lr-{r}-lr-{lr}-s0" for r in (0.001, 0.01) for lr in (0.1, 0.2)])
    single = [c for c in cells if c.method == "single"]
    assert all(c.train.optim.router_lr == 1e-2 for c in single)  # the set value, not a grid one
    lines = plan_lines(folder, cells, 1, 1.0)
    assert "  note: router_lr is not read by single: one single run where the grid lists 2 values of it" in lines


def test_long_names_are_shortened_deterministically_at_plan_time(tiny_cache, tiny_policy, tmp_path, monkeypatch):
    from sweep import grid as sweep_grid
    from sweep.grid import shorten

    long = "perceiver-" + "-".join(f"key{i}-{i}" for i in range(40)) + "-s2"
    short = shorten(long, 60)
    assert len(short.encode()) <= 60 and short.startswith("perceiver-key0-0-") and short.endswith("-s2")
    assert short == shorten(long, 60) and short != shorten(long.replace("key39", "key40"), 60)
    assert shorten("single-s0", 60) == "single-s0"
    monkeypatch.setattr(sweep_grid, "name_max", lambda folder: 40)
    grid = _grid(tmp_path, tiny_cache, tiny_policy, methods=["perceiver"], seeds=[0],
                 grid={"num_latents": [2, 4], "router_warmup_steps": [0], "gate_lr": [0.001]})
    _, cells = plan_sweep(grid)
    assert len({c.name for c in cells}) == 2 and all(len(c.name.encode()) <= 40 - len(".yaml") for c in cells)
    assert all(c.name.startswith("perceiver-num_latents-") and c.name.endswith("-s0") for c in cells)
    assert sweep_grid.name_max(tmp_path / "not" / "yet") >= 40  # read from the nearest existing folder


def test_each_run_reads_the_config_the_plan_typed(tiny_cache, tiny_policy, tmp_path):
    from core.config import load_yaml as read
    from train.config import load_train_config
    from sweep.grid import train_command, write_resolved

    preset = write_yaml(tmp_path / "preset.yaml", tiny_train_overrides(tiny_policy))
    grid = _grid(tmp_path, tiny_cache, tiny_policy, config=str(preset), methods=["single"], seeds=[0])
    folder, [cell] = plan_sweep(grid)
    path = write_resolved(cell, folder)
    preset.write_text(preset.read_text().replace("lr: 0.01", "lr: 0.5"))  # edited while the sweep runs
    assert load_train_config(str(path)) == cell.train and read(path)["optim"]["lr"] == 0.01
    cmd = train_command(cell, False, 1, ENTRY, path)
    assert cmd[cmd.index("--config") + 1] == str(path) and "--set" not in cmd


def test_a_run_of_an_older_musk_resumes_when_its_missing_keys_take_their_old_defaults(tiny_cache, tiny_policy,
                                                                                        tmp_path):
    from cache.reader import Cache
    from train.config import flat_dict, keys_missing_from_old_run

    grid = _grid(tmp_path, tiny_cache, tiny_policy, methods=["single"], seeds=[0])
    folder, [cell] = plan_sweep(grid)
    with Cache(str(tiny_cache)) as c:
        fp = c.fingerprint
    full = {**flat_dict(cell.train), "cache_fingerprint": fp}  # flat: as an older musk wrote it
    cell.folder.mkdir(parents=True)
    old = {k: v for k, v in full.items() if k not in ("tis_cap", "min_p")}  # keys added later, old defaults now
    (cell.folder / "config.yaml").write_text(yaml_dump(old))
    _, [again] = plan_sweep(grid)
    assert again.state == "resume" and "['min_p', 'tis_cap'] taken as their defaults" in again.note
    assert "['min_p', 'tis_cap'] taken as their defaults" in "\n".join(plan_lines(folder, [again], 1, 1.0))
    old = {k: v for k, v in full.items() if k not in ("tis_cap", "lr")}  # lr has no "before it existed"
    (cell.folder / "config.yaml").write_text(yaml_dump(old))
    _, [blocked] = plan_sweep(grid)
    assert blocked.state == "blocked" and "without the keys ['lr']" in blocked.note
    assert keys_missing_from_old_run({"a": 1}, {"a": 1, "tis_cap": 2.0, "top_k": 0}) == ({"top_k": 0}, ["tis_cap"])
    (cell.folder / "config.yaml").write_text("a: [\n")  # not musk's: a message, not a traceback
    _, [bad] = plan_sweep(grid)
    assert bad.state == "blocked" and "config.yaml or summary.json that cannot be read" in bad.note


def yaml_dump(d):
    from core.config import dump_yaml
    return dump_yaml(d)


def test_the_docs_grids_plan_as_written():
    """Every fenced yaml grid of docs/sweeps.md, planned as written (caches not built: listed, not errors)."""
    import re

    from sweep.grid import expand, load_sweep_config

    text = (ROOT / "docs" / "sweeps.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", text, re.S)
    assert blocks
    for i, block in enumerate(blocks):
        path = ROOT / "docs" / "sweeps.md"  # paths in the docs are read from the project's root
        import tempfile
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
            f.write(block)
        try:
            top, grids = load_sweep_config(f.name)
            cells = expand(grids, Path(top.out))
        finally:
            os.unlink(f.name)
        assert cells, (path, i)
    # the example: 2 caches x 2 methods x 3 seeds, perceiver x 6 grid values, single x 2 (num_latents unread)
    assert len(cells) == 2 * 3 * (6 + 2) and {c.steps for c in cells} == {200, 233}


@pytest.mark.slow
def test_step_figures_give_the_compute_of_table1(tmp_path):
    figures = tmp_path / "gpu.json"
    figures.write_text(json.dumps({"paper_step_seconds": 13.7, "machine": "H200", "date": "2026-12-03"}))
    lines = []
    run_sweep(ROOT / "configs" / "sweeps" / "table1.yaml", dry_run=True, figures=figures, lanes=8, log=lines.append)
    # 63 x 500 + 21 x 233 = 36393 steps x 13.7 s = 498584.1 s = 138.50 h (the prefix baseline included)
    assert "compute: 84 runs, 36393 steps x 13.7 s a step = 138.5 GPU-hours of steps (one device a run)" in lines
    assert any(x.startswith(f"estimated: 36393 steps from 13.7 s a step (paper_step_seconds measured in {figures}: "
                            "H200, 2026-12-03) = 138h 29m") for x in lines), lines
    lines = []
    run_sweep(ROOT / "configs" / "sweeps" / "table1.yaml", dry_run=True, log=lines.append)
    assert "compute: 84 runs, 36393 steps; GPU-hours not measured (no step time)" in lines
    figures.write_text(json.dumps({"decode_ms": 9.0}))
    code, out = _cli(["sweep", str(ROOT / "configs" / "sweeps" / "table1.yaml"), "--dry-run", "--step-figures",
                      str(figures)])
    assert code == 2 and "no positive number 'paper_step_seconds'" in out and "Traceback" not in out


def test_a_sweep_folder_that_cannot_be_written_is_a_message(tiny_cache, tiny_policy, tmp_path):
    (tmp_path / "file").write_text("")
    grid = _grid(tmp_path, tiny_cache, tiny_policy, out=str(tmp_path / "file" / "sweep"), methods=["single"], seeds=[0])
    code, out = _cli(["sweep", str(grid)])
    assert code == 2 and "cannot write the sweep folder" in out and "Traceback" not in out, out


def test_train_resume_of_an_older_run_folder_takes_old_defaults_or_names_the_keys(tmp_path, capsys):
    """open_run (what `musk train --resume` and every resumed sweep run go through) on a config.yaml
    written before some keys existed."""
    from types import SimpleNamespace

    from cache.run_folder import RunFolder
    from core.config import dump_yaml
    from train.config import load_train_config
    from train.setup import open_run

    cfg = load_train_config(None, {"method": "single"})
    data = SimpleNamespace(cache_fingerprint="fp", family="arithmetic", prompt_set="p")
    run, resolved = open_run(cfg, Path("c.h5"), tmp_path / "r", False, data=data)
    (tmp_path / "r" / "config.yaml").write_text(dump_yaml({k: v for k, v in resolved.items() if k != "tis_cap"}))
    capsys.readouterr()
    open_run(cfg, Path("c.h5"), tmp_path / "r", True, data=data)
    assert "lacks ['tis_cap'] (made by an older musk); taken as their defaults from before they existed: " \
           "{'tis_cap': 0.0}" in capsys.readouterr().out
    assert RunFolder(tmp_path / "r").read_config()["grpo"]["tis_cap"] == 0.0  # whole again
    (tmp_path / "r" / "config.yaml").write_text(dump_yaml({k: v for k, v in resolved.items() if k != "lr"}))
    with pytest.raises(MuskError, match=r"older musk without the keys \['lr'\]"):
        open_run(cfg, Path("c.h5"), tmp_path / "r", True, data=data)
    changed = load_train_config(None, {"method": "single", "tis_cap": 2.0})  # not the old behaviour: refused
    (tmp_path / "r" / "config.yaml").write_text(dump_yaml({k: v for k, v in resolved.items() if k != "tis_cap"}))
    with pytest.raises(MuskError, match=r"older musk without the keys \['tis_cap'\]"):
        open_run(changed, Path("c.h5"), tmp_path / "r", True, data=data)
