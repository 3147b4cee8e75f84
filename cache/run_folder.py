"""The run folder (SPEC "Run folder"): the one owner of its layout.

`musk train` writes it, `musk report` and the benchmarks read it; nobody else spells its file names.

    runs/<name>/config.yaml          resolved training config + the cache fingerprint it read
                metrics.jsonl        one record per optimizer step
                eval.jsonl           one record per evaluation (kind full | curve)
                eval_records.jsonl   one record per evaluated prompt, condition and sample (step, kind)
                completions.jsonl    sampled prompts with their completions, rewards, advantages
                checkpoints/step_K/  everything a bit-for-bit resume needs
                final/               PEFT adapter + context adapter
                summary.json         method, team, family, seed, steps, final accuracy
                eval/<name>/         `musk eval` folders: records.jsonl + summary.json

A killed process can leave the last line of a .jsonl cut short: readers drop that one line with a
warning (TornLineWarning); a broken line anywhere else is an error naming the file and line.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import yaml

from core.atomic import atomic_write_text
from core.config import dump_yaml
from core.errors import MuskError

CONFIG, SUMMARY, CHECKPOINTS, FINAL = "config.yaml", "summary.json", "checkpoints", "final"
METRICS, EVAL, COMPLETIONS = "metrics.jsonl", "eval.jsonl", "completions.jsonl"
EVAL_RECORDS, EVAL_DIR = "eval_records.jsonl", "eval"
LOGS = (METRICS, EVAL, COMPLETIONS, EVAL_RECORDS)  # append-only JSON lines, one record per step or event


class TornLineWarning(UserWarning):
    """The last line of a .jsonl was cut short (a crash mid-write) and was dropped."""


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSON-lines file ([] when it does not exist). A last line that does not parse
    is a torn write: dropped with a TornLineWarning. Raises MuskError for a broken line elsewhere."""
    path = Path(path)
    if not path.exists():
        return []
    lines = [(i, x) for i, x in enumerate(path.read_bytes().decode("utf-8", errors="replace").splitlines(), 1)
             if x.strip()]
    out = []
    for j, (i, x) in enumerate(lines):
        try:
            out.append(json.loads(x))
        except json.JSONDecodeError as e:
            if j == len(lines) - 1:
                warnings.warn(f"{path}: dropped its last line, cut short by a crash mid-write ({x[:60]!r}...)",
                              TornLineWarning, stacklevel=2)
                break
            raise MuskError(f"{str(path)!r}: line {i} is not valid JSON ({e}); only a torn last line is dropped, "
                            "so this file was edited or damaged: repair or remove that line") from None
    return out


def write_jsonl(path: Path, records: list[dict]) -> None:
    """Replace `path` with `records`, one per line, atomically."""
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))

# Keys of config.yaml that do not change what a run computes: a resume may change them, and the report
# does not split conditions on them (it also ignores seed and device, which a resume must keep).
NOT_SETTINGS = ("total_training_steps", "cache", "report_to", "log_freq", "save_freq", "log_completions_freq",
                "log_completions_prompts", "eval_completions", "eval_null_context", "rollout_engine", "vllm_memory",
                "decode_merged", "world_size", "micro_batches_per_rank")  # ranks split a step, not change it


@dataclass(frozen=True)
class RunFolder:
    path: Path

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))

    def __str__(self) -> str:
        return str(self.path)

    def __fspath__(self) -> str:
        return str(self.path)

    # ---- layout
    @property
    def config_path(self) -> Path:
        return self.path / CONFIG

    @property
    def final(self) -> Path:
        return self.path / FINAL

    def log_path(self, log: str) -> Path:
        assert log in LOGS, log
        return self.path / log

    def checkpoint(self, step: int) -> Path:
        return self.path / CHECKPOINTS / f"step_{step}"

    def latest_checkpoint(self) -> Path | None:
        root = self.path / CHECKPOINTS
        if not root.is_dir():
            return None
        steps = [int(p.name.split("_")[1]) for p in root.iterdir()
                 if p.is_dir() and p.name.startswith("step_") and p.name.split("_")[1].isdigit()]
        return self.checkpoint(max(steps)) if steps else None

    # ---- state
    def is_run(self) -> bool:
        """A finished or running run: config and metrics are there."""
        return self.config_path.is_file() and self.log_path(METRICS).is_file()

    def holds_anything(self) -> bool:
        return self.config_path.exists() or self.log_path(METRICS).exists()

    # ---- config and summary (written atomically: a kill leaves the old file or the new one)
    def read_config(self) -> dict:
        return yaml.safe_load(self.config_path.read_text())

    def write_config(self, resolved: dict) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.config_path, dump_yaml(resolved))

    def read_summary(self) -> dict:
        p = self.path / SUMMARY
        return json.loads(p.read_text()) if p.exists() else {}

    def write_summary(self, summary: dict) -> None:
        atomic_write_text(self.path / SUMMARY, json.dumps(summary, indent=2))

    # ---- JSON-lines logs
    def append(self, log: str, record: dict) -> None:
        with open(self.log_path(log), "a") as f:
            f.write(json.dumps(record) + "\n")

    def read(self, log: str) -> list[dict]:
        return read_jsonl(self.log_path(log))

    def truncate(self, max_step: int) -> None:
        """Drop log records past `max_step` (written after the checkpoint by a run that was killed) and
        a torn last line (with a warning): appends then start on a line of their own."""
        for log in LOGS:
            p = self.log_path(log)
            if p.exists():
                write_jsonl(p, [r for r in read_jsonl(p) if r.get("step", 0) <= max_step])
