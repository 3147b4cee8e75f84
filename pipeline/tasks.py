"""Task families: the paper's Reasoning Gym composites (Listings 2-4), GSM8K, and small presets.

A family is a registry entry. Reasoning Gym families are composites of datasets with weights and
per-dataset configs; GSM8K is read from the hub id when online or from a local parquet/jsonl file
(train and test splits; the numeric answer after `####`).

Held out means never trained on. Every Reasoning Gym family partitions its question space: a
question belongs to the validation split iff the SHA-256 of its problem (`core.heldout.problem_key`:
the whitespace-normalised text, a chain sum's terms in canonical order, so `3 + 8` and `8 + 3` are
one problem) falls in the first `val_partition` share of the hash range (0.25 by default); training
never draws from that share, validation draws only from it. Each dataset of a composite is drawn
from its own generator stream, and a split holds each dataset's configured share of its prompts
exactly (largest-remainder rounding), so a dataset whose question space is small is not
under-weighted in validation. reasoning-gym builds item i of a dataset from `Random(seed + i)`
(a composite's j-th dataset from `seed + j + 1 + i`), so two splits seeded 1 and 2 would be the
same stream shifted by one: musk starts split s's stream at `seed_s * STREAM_STRIDE`, and a
validation question whose problem is in the training split is skipped as well.

Prompts do not depend on PYTHONHASHSEED: some generators (polynomial_multiplication) order terms
through a Python set of strings, so `build_prompts` generates them in a child process with
PYTHONHASHSEED=0 unless this process already runs with it.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from core.errors import MuskError
from core.heldout import count_overlap, normalize_question, problem_key

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
# single token for SmolLM2, which rarely answers it alone (docs/context-path.md): whether C can carry
# the answer is then visible.
LETTER_COUNTING = {"letter_counting": {"weight": 1.0, "config": {}}}

FAMILIES: dict[str, dict | None] = {
    "arithmetic": ARITHMETIC,
    "algorithmic": ALGORITHMIC,
    "logic": LOGIC,
    "easy-arithmetic": EASY_ARITHMETIC,
    "letter-counting": LETTER_COUNTING,
    "gsm8k": None,  # not a Reasoning Gym composite
    "secret-digit": None,  # built in code: the probe task (see secret_digit_split)
    "secret-label": None,  # built in code: the probe only C can answer (see secret_label_split)
}

GSM8K_HUB_ID = "openai/gsm8k"

# The share of a Reasoning Gym family's question space (by problem hash) held out for validation.
# 0.25 keeps the generation cost of the paper's 16,000/4,000 splits near its minimum (16k/0.75 +
# 4k/0.25 items scanned). GSM8K (official splits) and secret-digit (a 26^6 space, disjoint streams
# plus the content filter) do not partition.
DEFAULT_VAL_PARTITION = 0.25

STREAM_STRIDE = 10**9  # split s's generator stream starts at seed_s * STREAM_STRIDE
SCAN_FACTOR = 50  # a split may scan this many stream items per prompt it keeps before giving up


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
    val_partition: float | None = None
    """Share of the question space (by SHA-256 of the problem: whitespace-normalised, a chain sum's terms
    in canonical order) reserved for validation; training never draws from it. None: 0.25 for Reasoning
    Gym families, 0 for gsm8k and secret-digit (held out by their official splits / disjoint streams).
    0 on a Reasoning Gym family: disjoint generator streams and the content filter alone."""
    balance_answers: bool = False
    """Reasoning Gym only: draw each split from a pool 8x its size, taking the answers in turn, so every
    answer is about equally frequent (a probe's no-information baseline is then 1/K, not the mode's share)."""
    labels: int = 4
    """secret-label only: k, the options named in every question (the digits 0..k-1, one token each),
    2 <= k <= 10. Chance is 1/k."""
    label_seed: int = 0
    """secret-label only: the salt of the hash that draws each prompt's label from its text."""

    def validate(self) -> None:
        if self.family not in FAMILIES:
            raise MuskError(f"unknown task family {self.family!r}; choices: {sorted(FAMILIES)}")
        if self.train_size < 1 or self.val_size < 1:
            raise MuskError("task.train_size and task.val_size must be at least 1")
        if self.train_seed == self.val_seed:
            raise MuskError(f"task.train_seed and task.val_seed are both {self.train_seed}: the validation split "
                            "would be the training split; give them different seeds")
        if self.family == "secret-label" and not 2 <= self.labels <= MAX_LABELS:
            raise MuskError(f"task.labels must be in [2, {MAX_LABELS}] for secret-label (each label one digit, one "
                            f"answer token), got {self.labels}")
        if self.val_partition is not None and not 0.0 <= self.val_partition < 1.0:
            raise MuskError(f"task.val_partition must be in [0, 1), got {self.val_partition}")
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

    def partition(self) -> float:
        """The validation share of the question space in use (see val_partition)."""
        if self.val_partition is not None:
            return self.val_partition
        return DEFAULT_VAL_PARTITION if FAMILIES[self.family] is not None else 0.0

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


def in_val_partition(text: str, share: float) -> bool:
    """Whether a question's problem (`problem_key`) falls in the validation share of the question
    space (hash-partitioned): commutative rewordings of one chain sum fall on one side together."""
    if share <= 0:
        return False
    h = int.from_bytes(hashlib.sha256(problem_key(text).encode()).digest()[:8], "big")
    return h < share * 2**64


def _take(stream: Iterable[dict], keep: Callable[[dict], bool], n: int, cap: int, what: str) -> list[dict]:
    """The first `n` items of `stream` that `keep` accepts, scanning at most `cap` items."""
    out = []
    for scanned, item in enumerate(stream):
        if len(out) == n or scanned >= cap:
            break
        if keep(item):
            out.append(item)
    if len(out) < n:
        raise MuskError(
            f"{what}: only {len(out)} of {n} prompts found in {cap} generated items; the question space is "
            "too small for this split size and the held-out constraint. Lower the split size, or raise "
            "task.val_partition for a small family."
        )
    return out


def mix(cfg: TaskConfig) -> dict[str, float]:
    """Each dataset's configured share of a split (weights normalised), in registry order."""
    if FAMILIES[cfg.family] is None:
        return {cfg.family: 1.0}
    specs = cfg.dataset_specs()
    weights = {name: float(s.get("weight", 1.0)) for name, s in specs.items()}
    total = sum(weights.values())
    if total <= 0 or any(w < 0 for w in weights.values()):
        raise MuskError(f"family {cfg.family!r}: dataset weights must be non-negative and not all 0, got {weights}")
    return {name: w / total for name, w in weights.items()}


def allocate(shares: dict[str, float], size: int) -> dict[str, int]:
    """`size` prompts split by `shares` with largest-remainder rounding: each count is within one of
    size x share, and the counts sum to `size`. Ties go to the dataset listed first."""
    exact = {name: size * w for name, w in shares.items()}
    counts = {name: int(x) for name, x in exact.items()}
    order = sorted(shares, key=lambda n: -(exact[n] - counts[n]))  # stable: listed order breaks ties
    for name in order[: size - sum(counts.values())]:
        counts[name] += 1
    return counts


def _rg_stream(name: str, index: int, spec: dict, seed: int, cap: int) -> Iterator[dict]:
    """Dataset `name`'s own generator stream, seeded as reasoning-gym's composite seeds its
    index-th dataset (split seed x STREAM_STRIDE + index + 1)."""
    import reasoning_gym

    config = dict(spec.get("config") or {})
    try:  # lazy: items are generated as the stream is read
        ds = reasoning_gym.create_dataset(name, **{**config, "size": cap, "seed": seed * STREAM_STRIDE + index + 1})
    except Exception as e:  # reasoning-gym raises assorted errors on bad dataset configs
        raise MuskError(f"reasoning-gym could not build dataset {name!r}: {e}") from None
    return iter(ds)


def interleave(groups: dict[str, list]) -> list:
    """One list of every group's items, evenly mixed: item k of a group of n sits at (k + 0.5) / n
    of the way through (ties in group order). Deterministic; a prefix holds about each share."""
    keyed = [((k + 0.5) / len(items), g, item) for g, items in enumerate(groups.values())
             for k, item in enumerate(items)]
    return [item for _, _, item in sorted(keyed, key=lambda x: (x[0], x[1]))]


def reference_answer(entry: dict) -> str:
    """The entry's reference answer. Some datasets (propositional_logic) accept many answers and
    store None; reasoning-gym keeps a valid one in metadata.example_answer, which is used instead."""
    answer = entry.get("answer")
    if answer is None:
        answer = entry.get("metadata", {}).get("example_answer")
    if answer is None:
        source = entry.get("metadata", {}).get("source_dataset", "?")
        raise MuskError(f"reasoning-gym dataset {source!r} gave an entry without an answer or example_answer")
    return str(answer)


def has_reference(entry: dict) -> bool:
    """Whether the entry has a reference answer the verifier accepts. An entry without `answer`
    (propositional_logic) is kept only if its example_answer scores 1.0: reasoning-gym sometimes
    offers one its own verifier rejects (premises that are tautologies entail nothing), and such a
    prompt has no known correct answer to train or evaluate on."""
    if entry.get("answer") is not None:
        return True
    from pipeline.rewards import score

    example = entry.get("metadata", {}).get("example_answer")
    return example is not None and score(json.dumps(entry, default=str), f"<answer>{example}</answer>") == 1.0


def _rg_split(cfg: TaskConfig, split: str, size: int, seed: int, keep: Callable[[str], bool]) -> list[Prompt]:
    """`size` prompts, each dataset's share of them exact (`allocate`), each drawn from its own stream."""
    specs = cfg.dataset_specs()
    per_dataset = {}
    for index, (name, n) in enumerate(allocate(mix(cfg), size).items()):
        if n == 0:
            continue
        pool = n * BALANCE_POOL if cfg.balance_answers else n
        cap = SCAN_FACTOR * pool + 1000
        entries = _take(_rg_stream(name, index, specs[name], seed, cap),
                        lambda e: keep(e["question"]) and has_reference(e), pool, cap,
                        f"family {cfg.family!r}, dataset {name!r}, {split} split")
        per_dataset[name] = balanced(entries, n) if cfg.balance_answers else entries
    out = []
    for entry in interleave(per_dataset):
        task = entry["metadata"].setdefault("source_dataset", cfg.family)
        answer = reference_answer(entry)
        out.append(Prompt(text=entry["question"], answer=answer, task=task, split=split,
                          entry=json.dumps({**entry, "answer": answer}, default=str, sort_keys=True)))
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


def _read_split_files(files: list[Path], split: str) -> list[dict]:
    """The rows of one split's files (shards of one format). A split in two formats (`train.jsonl`
    beside `train.parquet`, a common download-and-convert leftover) or two files holding the same
    questions would read the split twice: refused, naming the files."""
    formats = {".parquet" if f.suffix == ".parquet" else ".jsonl" for f in files}
    if len(formats) > 1:
        raise MuskError(f"GSM8K {split} split is in {len(formats)} formats: {[f.name for f in files]} in "
                        f"{str(files[0].parent)!r}; the split would be read twice. Keep one format.")
    tables = [_read_table(f) for f in files]
    questions = [sorted(normalize_question(r.get("question", "")) for r in t) for t in tables]
    for i in range(len(files)):
        for j in range(i + 1, len(files)):
            if questions[i] and questions[i] == questions[j]:
                raise MuskError(f"GSM8K files {files[i].name!r} and {files[j].name!r} in {str(files[0].parent)!r} "
                                f"hold the same {split} questions; the split would be read twice. Keep one.")
    return [r for t in tables for r in t]


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
            rows[split] = _read_split_files(files, split)
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


def _cards(seed: int, salt: int) -> Iterator[tuple]:
    """Endless (random six-letter card name, the generator that drew it) from default_rng([seed, salt])."""
    import numpy as np

    rng = np.random.default_rng([seed, salt])
    letters = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ"))
    while True:
        yield "".join(rng.choice(letters, 6)), rng


def _secret_digit_stream(seed: int) -> Iterator[dict]:
    for card, rng in _cards(seed, 7919):
        digit = str(int(rng.integers(0, 10)))
        text = SECRET_DIGIT.format(card=card)
        yield {"question": text, "answer": digit, "metadata": {"source_dataset": "secret-digit"}}


def secret_digit_split(split: str, size: int, seed: int, keep: Callable[[str], bool] = lambda t: True) -> list[Prompt]:
    """The probe task: each prompt's answer is a uniformly drawn digit that nothing in its text
    reveals (the card name is random letters). The policy alone can only guess (10%); only an expert
    that knows the answer (probe-oracle) can lift it, and only through C. Scored as a number."""
    entries = _take(_secret_digit_stream(seed), lambda e: keep(e["question"]), size, SCAN_FACTOR * size + 1000,
                    f"secret-digit, {split} split")
    return [Prompt(e["question"], e["answer"], "secret-digit", split, json.dumps(e, sort_keys=True)) for e in entries]


MAX_LABELS = 10  # the labels are the digits 0..k-1: one token each in every tokenizer musk ships
SECRET_LABEL = "Card {card} hides one of the digits {options}. Which digit does it hide? Answer with the digit only."


def secret_label(card: str, k: int, salt: int) -> str:
    """The label of card `card`: SHA-256 of (salt, card) mod k, as a digit. A function of the prompt's text
    alone, so a prompt has one label in every split and process; the text carries no clue to it."""
    digest = hashlib.sha256(f"secret-label|{salt}|{card}".encode()).digest()
    return str(int.from_bytes(digest[:8], "little") % k)


def _secret_label_stream(seed: int, k: int, salt: int) -> Iterator[dict]:
    options = ", ".join(str(d) for d in range(k - 1)) + f" or {k - 1}"
    for card, _ in _cards(seed, 104729):
        text = SECRET_LABEL.format(card=card, options=options)
        yield {"question": text, "answer": secret_label(card, k, salt),
               "metadata": {"source_dataset": "secret-label", "labels": k}}


def secret_label_split(split: str, size: int, seed: int, k: int, *, salt: int,
                       keep: Callable[[str], bool] = lambda t: True) -> list[Prompt]:
    """The probe only C can answer: every question names the same k options (digits 0..k-1) and a random
    six-letter card; the answer is the card's label (`secret_label`, a seeded hash of the card). The
    question carries no clue, so single, prefix and C removed sit at chance 1/k by construction (each
    split holds the k labels equally often, so even a constant answer scores 1/k); only an
    expert that encodes the label (probe-oracle) can lift a policy above it, and only through C. The
    answer format is one digit: a soft prompt can learn the format and nothing more. Scored as a number."""
    quota = {str(d): size // k + (d < size % k) for d in range(k)}  # balanced: a constant answer scores 1/k

    def wanted(e: dict) -> bool:
        if not keep(e["question"]) or quota[e["answer"]] == 0:
            return False
        quota[e["answer"]] -= 1
        return True

    entries = _take(_secret_label_stream(seed, k, salt), wanted, size, SCAN_FACTOR * size + 1000,
                    f"secret-label, {split} split")
    return [Prompt(e["question"], e["answer"], "secret-label", split, json.dumps(e, sort_keys=True)) for e in entries]


def split_overlap(prompts: list[Prompt]) -> int:
    """Held-out prompts (val/test) whose whitespace-normalised question is in the training split."""
    return count_overlap([p.text for p in prompts], [p.split for p in prompts])


def _build_here(cfg: TaskConfig, limit: int | None) -> list[Prompt]:
    train_n = min(cfg.train_size, limit) if limit else cfg.train_size
    val_n = min(cfg.val_size, limit) if limit else cfg.val_size
    if cfg.family == "gsm8k":  # the official splits; a test question also in train is dropped
        rows = _gsm8k_rows(cfg)
        train = _gsm8k_split(rows["train"], "train", train_n)
        seen = {normalize_question(p.text) for p in train}
        test = [p for p in _gsm8k_split(rows["test"], "test", len(rows["test"]))
                if normalize_question(p.text) not in seen][:val_n]
        return train + test
    share = cfg.partition()
    train_keep = lambda t: not in_val_partition(t, share)  # noqa: E731
    if cfg.family == "secret-digit":
        train = secret_digit_split("train", train_n, cfg.train_seed, train_keep)
    elif cfg.family == "secret-label":
        train = secret_label_split("train", train_n, cfg.train_seed, cfg.labels, salt=cfg.label_seed, keep=train_keep)
    else:
        train = _rg_split(cfg, "train", train_n, cfg.train_seed, train_keep)
    seen = {problem_key(p.text) for p in train}
    val_keep = lambda t: problem_key(t) not in seen and (share <= 0 or in_val_partition(t, share))  # noqa: E731
    if cfg.family == "secret-digit":
        return train + secret_digit_split("val", val_n, cfg.val_seed, val_keep)
    if cfg.family == "secret-label":
        return train + secret_label_split("val", val_n, cfg.val_seed, cfg.labels, salt=cfg.label_seed, keep=val_keep)
    return train + _rg_split(cfg, "val", val_n, cfg.val_seed, val_keep)


def build_prompts(cfg: TaskConfig, limit: int | None = None) -> list[Prompt]:
    """All prompts of a family: train split then validation (GSM8K: test) split, held out from it.

    `limit` keeps the first `limit` prompts of each split (quick runs); it is part of the config.
    Generated with PYTHONHASHSEED=0 (a child process when this one runs with another hash seed), so
    every process gets the same prompts. Raises MuskError when a split cannot be filled.
    """
    if os.environ.get("PYTHONHASHSEED") == "0" or cfg.family in ("gsm8k", "secret-digit", "secret-label"):
        return _build_here(cfg, limit)
    from core.config import to_dict

    code = ("import json, sys; from core.config import from_dict; from core.errors import MuskError\n"
            "from pipeline.tasks import TaskConfig, _build_here\n"
            "a = json.loads(sys.stdin.read())\n"
            "try:\n    ps = _build_here(from_dict(TaskConfig, a['cfg'], 'task'), a['limit'])\n"
            "except MuskError as e:\n    print(json.dumps({'error': str(e)})); sys.exit(0)\n"
            "print(json.dumps({'prompts': [p.__dict__ for p in ps]}))\n")
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONHASHSEED": "0", "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code], input=json.dumps({"cfg": to_dict(cfg), "limit": limit}),
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"prompt generation failed in its child process:\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    if "error" in out:
        raise MuskError(out["error"])
    return [Prompt(**p) for p in out["prompts"]]
