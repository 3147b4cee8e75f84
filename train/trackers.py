"""Experiment trackers: every metrics.jsonl record mirrored to TensorBoard, W&B or trackio.

metrics.jsonl stays the record of truth; a tracker is a window on it. Each is a registry entry with
the extra that installs it. A tracker named but not installed stops the run before any work; a
tracker that fails mid-run (disk full, network) is reported once and dropped, and the run goes on.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from core.errors import MuskError


@dataclass(frozen=True)
class TrackerInfo:
    module: str  # what must be importable
    extra: str  # pip install -e '.[extra]'
    open: Callable[[Path, dict], "Tracker"]


def scalars(record: dict) -> dict[str, float]:
    """The record's numbers under their slash names; a list [n] becomes name/0..n-1 (u_i per expert).
    Nested lists (the [m][n] attention matrix) are left to `matrices`."""
    out = {}
    for k, v in record.items():
        if isinstance(v, bool):
            out[k] = float(v)
        elif isinstance(v, (int, float)):
            out[k] = float(v)
        elif isinstance(v, list) and v and all(isinstance(x, (int, float)) for x in v):
            out.update({f"{k}/{i}": float(x) for i, x in enumerate(v)})
    return out


def matrices(record: dict) -> dict[str, np.ndarray]:
    return {k: np.asarray(v, dtype=np.float32) for k, v in record.items()
            if isinstance(v, list) and v and isinstance(v[0], list)}


class Tracker:
    def log(self, record: dict, step: int) -> None: ...

    def close(self) -> None: ...


class TensorBoard(Tracker):
    def __init__(self, run: Path, config: dict):
        from tensorboardX import SummaryWriter

        self.w = SummaryWriter(logdir=str(run / "tensorboard"))
        self.w.add_text("config", "\n".join(f"    {k}: {v}" for k, v in config.items()), 0)

    def log(self, record: dict, step: int) -> None:
        for k, v in scalars(record).items():
            self.w.add_scalar(k, v, step)
        for k, a in matrices(record).items():  # attention [m, n] as a grey image, 1 = white
            self.w.add_image(k, a[None], step, dataformats="CHW")
        self.w.flush()

    def close(self) -> None:
        self.w.close()


class WandB(Tracker):
    def __init__(self, run: Path, config: dict):
        import wandb

        self.wandb = wandb
        self.r = wandb.init(project="musk", name=run.name, dir=str(run), config=config)

    def log(self, record: dict, step: int) -> None:
        data = dict(scalars(record))
        for k, a in matrices(record).items():
            data[k] = self.wandb.Table(data=a.tolist(), columns=[f"expert {i}" for i in range(a.shape[1])])
        self.r.log(data, step=step)

    def close(self) -> None:
        self.r.finish()


class Trackio(Tracker):
    def __init__(self, run: Path, config: dict):
        import trackio

        self.t = trackio
        trackio.init(project="musk", name=run.name, config=config)

    def log(self, record: dict, step: int) -> None:
        self.t.log(scalars(record), step=step)

    def close(self) -> None:
        self.t.finish()


TRACKERS: dict[str, TrackerInfo] = {
    "tensorboard": TrackerInfo("tensorboardX", "tensorboard", TensorBoard),
    "wandb": TrackerInfo("wandb", "wandb", WandB),
    "trackio": TrackerInfo("trackio", "trackio", Trackio),
}


def check_trackers(names: tuple[str, ...]) -> None:
    """Before any work: every name known and installed."""
    for n in names:
        if n == "none":
            continue
        if n not in TRACKERS:
            raise MuskError(f"unknown tracker {n!r}; choices: {['none', *TRACKERS]}")
        if importlib.util.find_spec(TRACKERS[n].module) is None:
            raise MuskError(f"report_to {n!r} needs the {TRACKERS[n].module} package: "
                            f"pip install -e '.[{TRACKERS[n].extra}]'")


class Trackers:
    """The run's trackers as one: a failing tracker is reported once (via `log`) and dropped."""

    def __init__(self, names: tuple[str, ...], run: Path, config: dict, log=print):
        self.log_fn, self.active = log, {}
        for n in names:
            if n != "none":
                self._guard(n, lambda n=n: self.active.__setitem__(n, TRACKERS[n].open(Path(run), config)))

    def _guard(self, name: str, fn) -> None:
        try:
            fn()
        except Exception as e:  # a tracker's failure must never stop training
            self.active.pop(name, None)
            self.log_fn(f"tracker {name} failed and is switched off for this run ({type(e).__name__}: {e}); "
                        "metrics.jsonl is complete")

    def log(self, record: dict, step: int) -> None:
        for n, t in list(self.active.items()):
            self._guard(n, lambda t=t: t.log(record, step))

    def close(self) -> None:
        for n, t in list(self.active.items()):
            self._guard(n, t.close)
        self.active = {}
