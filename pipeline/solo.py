"""Solo answers: each expert's own greedy answer to every prompt, in the task's answer format, scored.

The expert reads the prompt the policy reads without hints (the task's developer prompt as system
turn, the question as user turn; plain tokenizers: "system\\n\\nQuestion: ...\\nAnswer:"), decodes
greedily within `solo_max_new_tokens`, and the completion is scored by the task's own verifier
(pipeline/rewards.py `score`, the answer inside <answer> tags). What an expert knows alone is then
in the cache beside its features: each expert's accuracy, the best expert, any-expert-correct and the
experts' vote (analyze/baselines.py) come from these datasets.

Stored per expert (cache schema 5):
    solo           [N] str      the completion
    solo_score     [N] float32  its score in [0, 1] by the task's scorer
    solo_n_tokens  [N] int64    tokens decoded (EOS counted), the decode's cost
attrs:
    solo_source            "decode" (its own greedy decode) or "hint" (the hint decode reused: same
                           token ids in, same budget, same decoder, so the same greedy text)
    solo_fingerprint       expert fingerprint + the solo settings (a rerun recomputes a stale one)
    solo_max_new_tokens, solo_answer_extraction, solo_seconds (wall seconds of the decode on the
    machine that extracted; NaN when reused from the hint, whose time is not recorded), solo_machine
"""

from __future__ import annotations

import platform
import time

import numpy as np
import torch

from core import dist
from core.hashing import sha256_of
from core.machine import cpu_name
from pipeline.chat import PLAIN_FORMAT, render_system_user
from pipeline.generation import decode, eos_ids
from pipeline.rewards import score
from pipeline.tasks import Prompt

SOLO_DATASETS = ("solo", "solo_score", "solo_n_tokens")
SOLO_SOURCES = ("decode", "hint")


def solo_prompt_text(tok, system: str, question: str) -> str:
    """The policy's prompt without hints: `system` as system turn, `question` as user turn (a chat
    template), else `system` + blank line + the plain question format."""
    if getattr(tok, "chat_template", None):
        return render_system_user(tok, system, question)
    return system + "\n\n" + PLAIN_FORMAT.format(question=question)


def solo_ids(tok, system: str, prompts: list[Prompt]) -> list[list[int]]:
    """Token ids of every prompt's solo prompt (the template holds the special tokens it needs)."""
    add = not getattr(tok, "chat_template", None)
    return [tok(solo_prompt_text(tok, system, p.text), add_special_tokens=add)["input_ids"] for p in prompts]


def solo_fingerprint(expert_fp: str, system: str, max_new_tokens: int, mode: str) -> str:
    """What decides an expert's solo answers beyond its own fingerprint (kept apart from it, so
    adding solo answers to a cache never changes, or recomputes, its features)."""
    return sha256_of({"expert": expert_fp, "system": system, "max_new_tokens": max_new_tokens, "mode": mode})


def score_solo(prompts: list[Prompt], texts: list[str], mode: str = "strict") -> np.ndarray:
    """[N] float32: each completion's score by its prompt's own scorer (`pipeline.rewards.score`);
    a completion without a parseable answer scores 0. Raises MuskError for a dataset without a scorer."""
    if len(prompts) != len(texts):
        raise ValueError(f"{len(prompts)} prompts but {len(texts)} completions")
    return np.array([score(p.entry, t, mode) for p, t in zip(prompts, texts)], dtype=np.float32)


def reuses_hint(hint_ids: list[list[int]] | None, ids: list[list[int]], hint_budget: int, budget: int,
                hint_engine: str) -> bool:
    """Whether the hint decode already is the solo decode: hints on, the same token ids in for every
    prompt, the same budget, and musk's own decoder (the one the solo decode uses)."""
    return hint_ids is not None and hint_budget == budget and hint_engine == "musk" and hint_ids == ids


def solo_batches(model, tok, ids: list[list[int]], batches: list[np.ndarray], *, max_new_tokens: int, parts,
                 group: str, device, greedy_fn, bar=None) -> None:
    """This rank's share of the solo decodes, stored batch by batch in the parts folder (kind "solo"):
    rows, text, n_tokens, seconds. A batch already stored is skipped (a resumed run decodes nothing
    twice). `greedy_fn(model, tok, batch_ids, max_new_tokens, *, eos, device) -> (tokens, live)`."""
    eos = eos_ids(model, tok)
    for b, rows in enumerate(batches):
        if not dist.mine(b):
            continue
        if not parts.has(group, "solo", b):
            t0 = time.perf_counter()
            gen, live = greedy_fn(model, tok, [ids[i] for i in rows], max_new_tokens, eos=eos, device=device)
            if torch.cuda.is_available() and str(device).startswith("cuda"):
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0  # the batch's wall time, spread over its rows (they sum to it)
            parts.save(group, "solo", b, rows=rows, text=np.array(decode(tok, gen, live), dtype=str),
                       n_tokens=live.sum(1).cpu().numpy(), seconds=np.full(len(rows), dt / len(rows)))
        if bar is not None:
            bar.update(len(rows))


def machine(device) -> str:
    """The machine a decode ran on, in words (host, CPU or GPU name)."""
    d = str(device)
    if d.startswith("cuda") and torch.cuda.is_available():
        what = torch.cuda.get_device_name(torch.device(d))
    else:
        what = cpu_name()
    return f"{platform.node()}: {d} ({what}), {torch.get_num_threads()} threads"


def solo_result(prompts: list[Prompt], texts: np.ndarray, n_tokens: np.ndarray, seconds: float, *, source: str,
                max_new_tokens: int, mode: str, device) -> tuple[dict, dict]:
    """(attrs, arrays) of one expert's solo answers, scored, for the cache (the caller adds
    solo_fingerprint)."""
    arrays = {"solo": np.array([str(t) for t in texts], dtype=object),
              "solo_score": score_solo(prompts, [str(t) for t in texts], mode),
              "solo_n_tokens": np.asarray(n_tokens, dtype=np.int64)}
    attrs = {"solo_source": source, "solo_max_new_tokens": int(max_new_tokens),
             "solo_answer_extraction": mode, "solo_seconds": float(seconds), "solo_machine": machine(device)}
    return attrs, arrays
