"""The `eval` section of the train config: the evaluations a training run makes on the validation
split, and what they write (read by train/loop.py and evaluate/; `--set eval.KEY=VALUE`). Declared in
train/, below evaluate/, because the training run holds it."""

from __future__ import annotations

from dataclasses import dataclass

from core.config import bound, check_bounds


@dataclass(frozen=True)
class EvalConfig:
    val_batch_size: int = bound(4, ge=1)
    """Prompts per evaluation batch."""
    test_freq: int = bound(1000, ge=1)
    """Evaluate on the validation split every K steps (and at the end)."""
    eval_batches: int = bound(1000, ge=1)
    """Evaluation batches (x val_batch_size prompts, capped at the split's size)."""
    eval_without_context: bool = True
    """Also evaluate the same policy with C removed (Figure 5)."""
    eval_null_context: bool = False
    """Also evaluate with C's information removed but its m slots kept (the gate closed: C = its anchor,
    or zeros without one): separates what the experts' states add from what the policy learned to do
    with m extra tokens (accuracy_null_context)."""
    curve_freq: int = bound(0, ge=0, note="0: off")
    """Every K steps, evaluate with and without C on a fixed subset of the validation split (the
    Figure 5 curve when test_freq is too rare for one); 0: off."""
    curve_prompts: int = bound(64, ge=1)
    """Validation prompts of the Figure 5 curve (the first ones of the split, the same at every point)."""
    eval_completions: int = 4
    """Each full evaluation writes the greedy completions of its first N prompts, with C and with C
    removed, to completions.jsonl (kind eval): what C changed, side by side. 0: none."""

    def validate(self) -> None:
        """Raises MuskError naming eval.KEY for a value outside its bounds."""
        check_bounds(self, "eval")
