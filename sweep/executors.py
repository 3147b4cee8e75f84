"""Where the runs of a sweep go: `local` lanes on this machine, or a Ray cluster.

An executor starts jobs (one `musk train` child process each, its output appended to its log file),
says how many more it can take now (`capacity`) and which have ended (`poll`, with exit codes). The
sweep (sweep/runner.py) decides what to run; an executor only places it.

- LocalExecutor: K lanes. Each lane gets its share of the CPU threads (`--threads`, OMP_NUM_THREADS)
  and, where GPUs are visible, a GPU of its own (CUDA_VISIBLE_DEVICES), so two runs never share cores
  or a device.
- RayExecutor: each run is a Ray task asking for its CPUs and GPUs; Ray's scheduler places it on a
  node that has them (and sets CUDA_VISIBLE_DEVICES there). Connects to `address` (a running
  cluster, e.g. `ray start --head` on one node, `ray start --address` on the others) or starts a
  local head. The sweep folder must be on a filesystem every node sees.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import NamedTuple

from core.errors import MuskError


class Job(NamedTuple):
    name: str
    cmd: list[str]  # the child process, without the lane's share (added by the executor: `--threads`)
    log: Path  # its stdout and stderr, appended
    cwd: str  # where relative cache / preset / out paths are read from


class Lane(NamedTuple):
    index: int
    threads: int  # CPU threads of a run on this lane
    env: dict  # what the lane adds to the child's environment


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES names them (ids or UUIDs)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and g.strip() != "-1"]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


CGROUP = Path("/sys/fs/cgroup")  # cgroup v2 (cpu.max) or v1 (cpu/cpu.cfs_quota_us, cpu.cfs_period_us)


def _cgroup_cpus() -> float | None:
    """The CPU quota of this process's cgroup in CPUs (quota / period), or None where there is none or
    it is unreadable. v2: cpu.max of its own cgroup (/proc/self/cgroup "0::/path"), else the root's."""
    root = CGROUP
    try:
        own = [ln[3:].strip() for ln in Path("/proc/self/cgroup").read_text().splitlines() if ln.startswith("0::")]
    except OSError:
        own = []
    here = root / own[0].strip("/") if own and own[0].strip("/") else root
    quotas = []  # the cgroup's and its ancestors' (each limits it), up to the mounted root
    for where in [here, *here.parents]:
        if where != root and root not in where.parents:
            break
        try:
            quota, period = (where / "cpu.max").read_text().split()[:2]  # "max 100000" or "200000 100000"
            if quota != "max":
                quotas.append(int(quota) / int(period))
        except (OSError, ValueError):
            pass
        if where == root:
            break
    if quotas:
        return min(quotas)
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None  # v1 without a quota, or no cgroup files


def usable_cpus() -> int:
    """The CPUs this process may use: the cores it may run on (affinity, cpusets: SLURM, taskset) and
    the container's CPU quota, the fewer of them (os.cpu_count() counts every core of the node)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    quota = _cgroup_cpus()
    if quota is not None:
        n = min(n, max(1, int(quota)))
    return max(1, n)


def lane_plan(lanes: int, cpus: int, gpus: list[str], threads: int | None = None) -> list[Lane]:
    """K lanes over `cpus` cores and `gpus`: each lane threads = cpus // K (at least 1) unless given,
    and GPU k for lane k where there are GPUs. Raises MuskError for K < 1 or more lanes than GPUs."""
    if lanes < 1:
        raise MuskError(f"--lanes must be at least 1, got {lanes}")
    if gpus and lanes > len(gpus):
        raise MuskError(f"--lanes {lanes} but {len(gpus)} GPU(s) visible ({','.join(gpus)}): each lane "
                        "gets a GPU of its own; use at most that many lanes")
    n = threads if threads else max(1, cpus // lanes)
    out = []
    for k in range(lanes):
        env = {"OMP_NUM_THREADS": str(n), "MKL_NUM_THREADS": str(n)}
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = gpus[k]
        out.append(Lane(k, n, env))
    return out


def _die_with_parent() -> None:
    """Linux: the child gets SIGTERM when the process that started it dies (a killed sweep leaves no
    orphan run writing into a folder that the next sweep resumes)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _start(cmd: list[str], log: Path, env: dict, cwd: str) -> tuple[subprocess.Popen, object]:
    log.parent.mkdir(parents=True, exist_ok=True)
    f = open(log, "ab")
    f.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n".encode())
    f.flush()
    p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=cwd,
                         env={**os.environ, **env}, preexec_fn=_die_with_parent if os.name == "posix" else None)
    return p, f


class LocalExecutor:
    def __init__(self, lanes: list[Lane]):
        self.lanes = lanes
        self.free = list(lanes)
        self.running: dict[str, tuple[subprocess.Popen, object, Lane]] = {}

    def describe(self) -> str:
        gpu = lambda ln: f", GPU {ln.env['CUDA_VISIBLE_DEVICES']}" if "CUDA_VISIBLE_DEVICES" in ln.env else ""  # noqa: E731
        return f"local, {len(self.lanes)} lane(s): " + "; ".join(
            f"lane {ln.index + 1}: {ln.threads} thread(s){gpu(ln)}" for ln in self.lanes)

    def capacity(self) -> int:
        return len(self.free)

    def start(self, job: Job) -> str:
        lane = self.free.pop(0)
        p, f = _start(job.cmd + ["--threads", str(lane.threads)], job.log, lane.env, job.cwd)
        self.running[job.name] = (p, f, lane)
        return f"lane {lane.index + 1}"

    def poll(self) -> list[tuple[str, int]]:
        ended = []
        for name, (p, f, lane) in list(self.running.items()):
            rc = p.poll()
            if rc is not None:
                f.close()
                self.free.append(lane)
                self.free.sort()
                del self.running[name]
                ended.append((name, rc))
        return ended

    def stop(self) -> None:
        """Interrupt every running child (SIGINT: `musk train` exits 130) and wait for it."""
        for p, f, _ in self.running.values():
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p, f, _ in self.running.values():
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            f.close()
        self.running.clear()

    def close(self) -> None:
        pass


# What a run reads from the sweep's environment: musk's own settings, the hub's and transformers'
# (offline mode, caches, tokens), thread counts and the trackers'. A Ray worker starts with the
# environment of the node's raylet, not the sweep's, so these travel with each task.
FORWARDED_PREFIXES = ("MUSK_", "HF_", "HUGGINGFACE_", "TRANSFORMERS_", "TOKENIZERS_", "WANDB_", "TRACKIO_",
                      "HDF5_", "PYTHONHASHSEED", "CUBLAS_WORKSPACE_CONFIG", "PYTORCH_")


def sweep_env(environ=None) -> dict[str, str]:
    """The variables of `environ` (default os.environ) that a run on another node must see."""
    environ = os.environ if environ is None else environ
    return {k: v for k, v in environ.items() if k.startswith(FORWARDED_PREFIXES)}


def _ray_job(cmd: list[str], log: str, cwd: str, env: dict | None = None) -> int:
    """Runs on a Ray worker: the child, with the sweep's `env` over the worker's environment and its
    output appended to the log; a cancelled task stops it."""
    p, f = _start(cmd, Path(log), env or {}, cwd)
    try:
        return p.wait()
    except BaseException:  # ray.cancel raises KeyboardInterrupt in the task
        p.send_signal(signal.SIGINT)
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
        raise
    finally:
        f.close()


def require_ray():
    try:
        import ray
    except ImportError:
        raise MuskError("--executor ray needs Ray: pip install -e '.[ray]' (on every node of the cluster)") from None
    return ray


class RayExecutor:
    def __init__(self, address: str | None, cpus_per_run: int, gpus_per_run: float | None, num_cpus: int | None = None):
        ray = self.ray = require_ray()
        self.owned = False
        if not ray.is_initialized():
            try:
                ray.init(address=address, num_cpus=num_cpus if address is None else None, include_dashboard=False,
                         log_to_driver=False, logging_level="ERROR", configure_logging=True)
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise MuskError(f"could not reach a Ray cluster at {address or 'a new local head'}: {e}") from None
            self.owned = True
        if gpus_per_run is None:  # one GPU a run where the cluster has GPUs
            gpus_per_run = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        self.cpus, self.gpus = cpus_per_run, gpus_per_run
        self.env = sweep_env()  # also the task's runtime_env, so Ray's own worker process sees it
        self.task = ray.remote(_ray_job).options(num_cpus=cpus_per_run, num_gpus=gpus_per_run, max_retries=0,
                                                 runtime_env={"env_vars": self.env})
        self.running: dict[str, object] = {}  # name -> ObjectRef

    def describe(self) -> str:
        res = self.ray.cluster_resources()
        return (f"ray cluster ({int(res.get('CPU', 0))} CPUs, {int(res.get('GPU', 0))} GPUs, "
                f"{len(self.ray.nodes())} node(s)), {self.cpus} CPU(s) and {self.gpus} GPU(s) a run")

    def capacity(self) -> int:
        return 1 << 30  # Ray queues tasks until a node has their resources

    def start(self, job: Job) -> str:
        self.running[job.name] = self.task.remote(job.cmd + ["--threads", str(self.cpus)], str(job.log), job.cwd,
                                                  self.env)
        return "the Ray cluster"

    def poll(self) -> list[tuple[str, int]]:
        if not self.running:
            return []
        refs = list(self.running.values())
        done, _ = self.ray.wait(refs, num_returns=len(refs), timeout=0)
        ended = []
        for name, ref in list(self.running.items()):
            if ref in done:
                del self.running[name]
                try:
                    ended.append((name, int(self.ray.get(ref))))
                except Exception as e:  # the task itself died (node lost, worker killed)
                    ended.append((name, f"Ray task failed: {type(e).__name__}"))
        return ended

    def stop(self) -> None:
        for ref in self.running.values():
            self.ray.cancel(ref)
        self.running.clear()

    def close(self) -> None:
        if self.owned:
            self.ray.shutdown()
