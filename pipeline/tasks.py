"""Task families: the paper's Reasoning Gym composites (Listings 2-4), GSM8K, and small presets.

A family is a registry entry. Reasoning Gym families are composites of datasets with weights and
per-dataset configs; the train split is generated from seed 1 and validation from seed 2, as
reasoning-gym's own training configs do. GSM8K is read from the hub id when online or from a local
parquet/jsonl file (train and test splits; the numeric answer after `####`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from core.errors import MuskError

# ---------------------------------------------------------------------------------------------
# Registry. Each Reasoning Gym family maps dataset name -> {"weight": w, "config": {...}}.

ARITHMETIC = {
    name: {"weight": 1.0, "config": {}}
    for name in [
        "complex_arithmetic",
        "intermediate_integration",
        "polynomial_equations",
        "polynomial_multiplication",
        "simple_geometry",
        "bitwise_arithmetic",
        "chain_sum",
        "decimal_arithmetic",
        "decimal_chain_sum",
    ]
}

ALGORITHMIC = {
    "ab": {"weight": 1.0, "config": {}},
    "base_conversion": {"weight": 1.0, "config": {}},
    "binary_alternation": {"weight": 1.0, "config": {"p_solvable": 0.9}},
    "binary_matrix": {"weight": 1.0, "config": {"min_n": 2, "max_n": 6}},
    "caesar_cipher": {"weight": 1.0, "config": {"max_words": 10}},
    "cryptarithm": {"weight": 1.0, "config": {}},
    "isomorphic_strings": {"weight": 1.0, "config": {"max_string_length": 8}},
    "jugs": {"weight": 1.0, "config": {"difficulty": 6}},
    "rotate_matrix": {"weight": 1.0, "config": {"min_n": 2, "max_n": 6}},
    "string_manipulation": {"weight": 1.0, "config": {"max_string_length": 15, "max_num_rules": 6}},
}

LOGIC = {
    name: {"weight": 1.0, "config": {}}
    for name in [
        "aiw",
        "circuit_logic",
        "knights_knaves",
        "propositional_logic",
        "self_reference",
        "syllogism",
        "zebra_puzzles",
    ]
}

# Not in the paper: one-digit sums a 135M model can learn on a CPU in minutes (embedded default).
EASY_ARITHMETIC = {
    "chain_sum": {
        "weight": 1.0,
        "config": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1},
    },
}

# Not in the paper: the probe team's task (configs/extract/probe.yaml). Answers are one digit, a
# single token for SmolLM2, which scores ~13% alone: whether C can carry the answer is then visible.
LETTER_COUNTING = {"letter_counting": {"weight": 1.0, "config": {}}}

FAMILIES: dict[str, dict | None] = {
    "arithmetic": ARITHMETIC,
    "algorithmic": ALGORITHMIC,
    "logic": LOGIC,
    "easy-arithmetic": EASY_ARITHMETIC,
    "letter-counting": LETTER_COUNTING,
    "gsm8k": None,  # not a Reasoning Gym composite
    "secret-digit": None,  # built in code: the probe task (see secret_digit_split)
}

GSM8K_HUB_ID = "openai/gsm8k"


@dataclass(frozen=True)
class TaskConfig:
    family: str = "easy-arithmetic"
    """Registry name of the task family: arithmetic, algorithmic, logic, gsm8k, easy-arithmetic, letter-counting,
    secret-digit."""
    train_size: int = 16000
    """Number of training prompts (GSM8K: at most this many of the train split)."""
    val_size: int = 4000
    """Number of validation prompts (GSM8K: at most this many of the test split)."""
    train_seed: int = 1
    """Reasoning Gym seed of the train split (reasoning-gym's training configs use 1)."""
    val_seed: int = 2
    """Reasoning Gym seed of the validation split (reasoning-gym's training configs use 2)."""
    developer_prompt: str = "DeepSeekZero"
    """Name of reasoning-gym's SYSTEM_PROMPTS entry used as the policy's system prompt."""
    datasets: dict | None = None
    """Override of the family's datasets: {name: {weight: w, config: {...}}}; None keeps the registry's."""
    gsm8k_path: str | None = None
    """GSM8K only: a local folder (train*/test* .jsonl/.parquet) or file with a split column; None reads the hub."""
    balance_answers: bool = False
    """Reasoning Gym only: draw each split from a pool 8x its size, taking the answers in turn, so every
    answer is about equally frequent (a probe's no-information baseline is then 1/K, not the mode's share)."""

    def validate(self) -> None:
        if self.family not in FAMILIES:
            raise MuskError(f"unknown task family {self.family!r}; choices: {sorted(FAMILIES)}")
        if self.train_size < 1 or self.val_size < 1:
            raise MuskError("task.train_size and task.val_size must be at least 1")
        from reasoning_gym.utils import SYSTEM_PROMPTS

        if self.developer_prompt not in SYSTEM_PROMPTS:
            raise MuskError(
                f"unknown developer_prompt {self.developer_prompt!r}; choices: {sorted(SYSTEM_PROMPTS)}"
            )
        if FAMILIES[self.family] is not None:
            self.dataset_specs()  # raises on unknown dataset names

    def dataset_specs(self) -> dict:
        specs = self.datasets if self.datasets is not None else FAMILIES[self.family]
        import reasoning_gym.factory as factory

        known = set(factory.DATASETS)
        for name, spec in specs.items():
            if name not in known:
                raise MuskError(
                    f"unknown reasoning-gym dataset {name!r} in family {self.family!r}; "
                    f"choices include: {sorted(known)}"
                )
            if not isinstance(spec, dict) or set(spec) - {"weight", "config"}:
                raise MuskError(f"dataset {name!r}: expected {{weight: w, config: {{...}}}}, got {spec!r}")
        return specs

    def system_prompt(self) -> str:
        from reasoning_gym.utils import SYSTEM_PROMPTS

        return SYSTEM_PROMPTS[self.developer_prompt]


@dataclass(frozen=True)
class Prompt:
    text: str
    answer: str
    task: str
    split: str
    entry: str = field(repr=False)  # JSON of what the scorer needs


BALANCE_POOL = 8


def balanced(entries: list[dict], size: int) -> list[dict]:
    """`size` entries taking the answers in turn (sorted), each answer's entries in their order: as
    uniform over answers as the pool allows. Deterministic."""
    by_answer: dict[str, list[dict]] = {}
    for e in entries:
        by_answer.setdefault(str(e["answer"]), []).append(e)
    queues = [by_answer[a] for a in sorted(by_answer)]
    out, i = [], 0
    while len(out) < size and any(queues):
        q = queues[i % len(queues)]
        if q:
            out.append(q.pop(0))
        i += 1
    return out


def _rg_split(cfg: TaskConfig, split: str, size: int, seed: int) -> list[Prompt]:
    import reasoning_gym
    from reasoning_gym.composite import DatasetSpec

    specs = [
        DatasetSpec(name=name, weight=float(s.get("weight", 1.0)), config=dict(s.get("config") or {}))
        for name, s in cfg.dataset_specs().items()
    ]
    pool = size * BALANCE_POOL if cfg.balance_answers else size
    try:
        ds = list(reasoning_gym.create_dataset("composite", size=pool, seed=seed, datasets=specs))
    except Exception as e:  # reasoning-gym raises assorted errors on bad dataset configs
        raise MuskError(f"reasoning-gym could not build family {cfg.family!r}: {e}") from None
    if cfg.balance_answers:
        ds = balanced(ds, size)
    out = []
    for entry in ds:
        task = entry["metadata"].get("source_dataset", cfg.family)
        out.append(
            Prompt(
                text=entry["question"],
                answer=str(entry["answer"]),
                task=task,
                split=split,
                entry=json.dumps(entry, default=str, sort_keys=True),
            )
        )
    return out


def gsm8k_answer(solution: str) -> str:
    """The numeric answer after `####` in a GSM8K solution, commas removed."""
    if "####" not in solution:
        raise MuskError(f"GSM8K answer without '####': {solution[:80]!r}")
    return solution.split("####")[-1].strip().replace(",", "")


def _read_table(path: Path) -> list[dict]:
    import polars as pl

    try:
        if path.suffix == ".parquet":
            return pl.read_parquet(path).to_dicts()
        if path.suffix in (".jsonl", ".json"):
            return pl.read_ndjson(path).to_dicts()
    except Exception as e:
        raise MuskError(f"cannot read GSM8K file {str(path)!r}: {e}") from None
    raise MuskError(f"GSM8K file {str(path)!r}: expected .parquet or .jsonl")


def _gsm8k_rows(cfg: TaskConfig) -> dict[str, list[dict]]:
    if cfg.gsm8k_path is None:
        try:
            import datasets

            d = datasets.load_dataset(GSM8K_HUB_ID, "main")
            return {"train": list(d["train"]), "test": list(d["test"])}
        except Exception as e:
            raise MuskError(
                f"GSM8K could not be read from the hub ({GSM8K_HUB_ID}): {type(e).__name__}. "
                "Offline, set task.gsm8k_path to a local folder holding train and test .jsonl/.parquet files."
            ) from None
    p = Path(cfg.gsm8k_path)
    if not p.exists():
        raise MuskError(f"task.gsm8k_path {str(p)!r} does not exist")
    rows: dict[str, list[dict]] = {}
    if p.is_dir():
        for split in ("train", "test"):
            files = sorted(
                f for f in p.iterdir() if f.name.startswith(split) and f.suffix in (".jsonl", ".json", ".parquet")
            )
            if not files:
                raise MuskError(f"GSM8K folder {str(p)!r} has no {split}*.jsonl or {split}*.parquet file")
            rows[split] = [r for f in files for r in _read_table(f)]
    else:
        table = _read_table(p)
        if not table or "split" not in table[0]:
            raise MuskError(f"GSM8K file {str(p)!r} needs a 'split' column (train/test) or use a folder")
        for split in ("train", "test"):
            rows[split] = [r for r in table if r["split"] == split]
    for split, rs in rows.items():
        if not rs or "question" not in rs[0] or "answer" not in rs[0]:
            raise MuskError(f"GSM8K {split} split needs 'question' and 'answer' columns")
    return rows


def _gsm8k_split(rows: list[dict], split: str, size: int) -> list[Prompt]:
    out = []
    for r in rows[:size]:
        ans = gsm8k_answer(str(r["answer"]))
        entry = {"question": r["question"], "answer": ans, "metadata": {"source_dataset": "gsm8k"}}
        out.append(Prompt(r["question"], ans, "gsm8k", split, json.dumps(entry, sort_keys=True)))
    return out


SECRET_DIGIT = "Card {card} hides a digit from 0 to 9. What is the digit?"


def secret_digit_split(split: str, size: int, seed: int) -> list[Prompt]:
    """The probe task: each prompt's answer is a uniformly drawn digit that nothing in its text
    reveals (the card name is random letters). The policy alone can only guess (10%); only an expert
    that knows the answer (probe-oracle) can lift it, and only through C. Scored as a number."""
    import numpy as np

    rng = np.random.default_rng([seed, 7919])
    letters = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ"))
    out = []
    for _ in range(size):
        card = "".join(rng.choice(letters, 6))
        digit = str(int(rng.integers(0, 10)))
        text = SECRET_DIGIT.format(card=card)
        entry = {"question": text, "answer": digit, "metadata": {"source_dataset": "secret-digit"}}
        out.append(Prompt(text, digit, "secret-digit", split, json.dumps(entry, sort_keys=True)))
    return out


def build_prompts(cfg: TaskConfig, limit: int | None = None) -> list[Prompt]:
    """All prompts of a family: train split then validation (GSM8K: test) split.

    `limit` keeps the first `limit` prompts of each split (quick runs); it is part of the config.
    """
    train_n = min(cfg.train_size, limit) if limit else cfg.train_size
    val_n = min(cfg.val_size, limit) if limit else cfg.val_size
    if cfg.family == "gsm8k":
        rows = _gsm8k_rows(cfg)
        return _gsm8k_split(rows["train"], "train", train_n) + _gsm8k_split(rows["test"], "test", val_n)
    if cfg.family == "secret-digit":
        return secret_digit_split("train", train_n, cfg.train_seed) + secret_digit_split("val", val_n, cfg.val_seed)
    return _rg_split(cfg, "train", train_n, cfg.train_seed) + _rg_split(cfg, "val", val_n, cfg.val_seed)
