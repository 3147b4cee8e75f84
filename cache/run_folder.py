"""The run folder (SPEC "Run folder"): the one owner of its layout.

`musk train` writes it, `musk report` and the benchmarks read it; nobody else spells its file names.

    runs/<name>/config.yaml          resolved training config + the cache fingerprint it read
                metrics.jsonl        one record per optimizer step
                eval.jsonl           one record per evaluation (kind full | curve)
                completions.jsonl    sampled prompts with their completions, rewards, advantages
                checkpoints/step_K/  everything a bit-for-bit resume needs
                final/               PEFT adapter + context adapter
                summary.json         method, team, family, seed, steps, final accuracy
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from core.atomic import atomic_write_text
from core.config import dump_yaml

CONFIG, SUMMARY, CHECKPOINTS, FINAL = "config.yaml", "summary.json", "checkpoints", "final"
METRICS, EVAL, COMPLETIONS = "metrics.jsonl", "eval.jsonl", "completions.jsonl"
LOGS = (METRICS, EVAL, COMPLETIONS)  # append-only JSON lines, one record per step or event

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
        p = self.log_path(log)
        return [json.loads(x) for x in p.read_text().splitlines() if x.strip()] if p.exists() else []

    def truncate(self, max_step: int) -> None:
        """Drop log records past `max_step` (written after the checkpoint by a run that was killed)."""
        for log in LOGS:
            p = self.log_path(log)
            if p.exists():
                keep = [x for x in p.read_text().splitlines() if x.strip() and json.loads(x)["step"] <= max_step]
                atomic_write_text(p, "".join(line + "\n" for line in keep))
