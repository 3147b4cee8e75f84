"""The policy's input, assembled in one place: the prompt's text (system turn, question, the experts'
hints for output-collab), its tokens, context tokens C from g_phi and C with its information removed,
spliced into the policy's input embeddings. Shared by the rollouts (train/loop.py) and the
evaluations (evaluate/records.py).

An `ExpertView` says which experts are read and from which prompt: evaluation-time ablations
(`musk eval --ablate`) take an expert out (keep False) or feed it another prompt's features (source).
Training always reads ALL: every expert, each prompt's own row.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import torch

from core.errors import MuskError
from pipeline.chat import PLAIN_FORMAT, render_system_user
from train.adapters import method_info
from train.gphi import AdapterOut
from train.config import HINT_FORMATS, TrainConfig

if TYPE_CHECKING:
    from train.data import RunData


class PolicyParts(Protocol):
    """What the input builder reads of a policy (train/policy.Policy, which calls it)."""

    lm: Any  # the causal LM: its input embeddings and dtype
    tok: Any  # its tokenizer (left padding)
    adapter: torch.nn.Module  # g_phi (train/gphi.py)
    scale: float  # the embedding scale C is multiplied by
    reference: Any  # train/policy.KLReference or None: what GRPO's reference reads as C


# ---------------------------------------------------------------------------------------------
# The prompt as text and tokens (no C yet): the [Expert Hints] block, the chat or plain format
# split where C may go, tokenization with left padding, and the splice of C (Eq. 3).
#
# Sequence layout of a batch (left padding, so every prompt ends at the same column):
#   suffix:         [pad.. | prompt x | C (m) | completion y]          ([x || C], Eq. 3)
#   prefix:         [C (m) | pad.. | prompt x | completion y]          (pads are masked; positions skip them)
#   after-question: [pad.. | system, question | C | end of turn, "assistant:" | completion y]
# Position ids are the running count of real tokens, so padding never shifts a sequence.

_SENTINEL = "\x00musk-question\x00"


def hint_block_text(hints: list[tuple[str, str]], fmt: str = "literal") -> str:
    """The [Expert Hints] block. literal (Eq. 12 as written): each expert's decoded text verbatim, one
    after the other, unlabelled. labelled: one "- <expert name>: <stripped text>" line per expert."""
    if fmt == "literal":
        return "[Expert Hints]\n" + "\n".join(text for _, text in hints)
    if fmt == "labelled":
        return "[Expert Hints]\n" + "\n".join(f"- {name}: {text.strip()}" for name, text in hints)
    raise MuskError(f"unknown hint_format {fmt!r}; choices: {list(HINT_FORMATS)}")


def build_prompt_parts(tok, system: str, question: str, hints: list[tuple[str, str]] | None = None,
                       hint_format: str = "labelled") -> tuple[str, str]:
    """The policy's prompt as (head, tail): head runs through the end of the user's content (the
    question and, when given, an [Expert Hints] block in the user turn), tail is what the format adds
    after it (the chat template's end of turn and generation prompt, or the plain format's "Answer:")."""
    user = question
    if hints:
        user = f"{question}\n\n{hint_block_text(hints, hint_format)}"
    if getattr(tok, "chat_template", None):  # the date fixed; a refused system turn opens the user turn
        full = render_system_user(tok, system, _SENTINEL)
    else:
        full = system + "\n\n" + PLAIN_FORMAT.format(question=_SENTINEL)
    before, after = full.split(_SENTINEL)
    return before + user, after


def build_prompt_text(tok, system: str, question: str, hints: list[tuple[str, str]] | None = None,
                      hint_format: str = "labelled") -> str:
    """The policy's prompt: developer prompt as system turn, question (+ [Expert Hints]) as user."""
    return "".join(build_prompt_parts(tok, system, question, hints, hint_format))


def encode_blocks(tok, texts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [N, H] of free-standing text blocks (no special tokens), padded on the right, and
    their mask [N, H]: the hint blocks that go where C would (Eq. 12)."""
    ids = [tok(t, add_special_tokens=False)["input_ids"] or [tok.pad_token_id] for t in texts]
    H = max(len(x) for x in ids)
    out = torch.full((len(ids), H), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(ids), H), dtype=torch.long)
    for i, x in enumerate(ids):
        out[i, :len(x)], mask[i, :len(x)] = torch.tensor(x), 1
    return out.to(device), mask.to(device)


class PromptBatch(NamedTuple):
    ids: torch.Tensor  # [N, P] left padded
    mask: torch.Tensor  # [N, P]
    tail: int  # tokens after the user's content, the same in every row (C goes before them: after-question)


def encode_prompts(tok, parts: list[tuple[str, str]], device) -> PromptBatch:
    """Tokenize (head, tail) prompts, head and tail separately, so the boundary where C may go is a
    token boundary in every row; left padding puts it in one column for the whole batch."""
    tails = {t for _, t in parts}
    if len(tails) != 1:
        raise ValueError("prompts of one batch must share their tail (the format after the question)")
    add_special = not getattr(tok, "chat_template", None)
    enc = tok([h for h, _ in parts], padding=True, add_special_tokens=add_special, return_tensors="pt")
    tail_ids = tok(tails.pop(), add_special_tokens=False, return_tensors="pt")["input_ids"]  # [1, Pt]
    n = enc["input_ids"].shape[0]
    ids = torch.cat([enc["input_ids"], tail_ids.expand(n, -1)], 1)
    mask = torch.cat([enc["attention_mask"], torch.ones(n, tail_ids.shape[1], dtype=enc["attention_mask"].dtype)], 1)
    return PromptBatch(ids.to(device), mask.to(device), int(tail_ids.shape[1]))


def splice(embeds: torch.Tensor, mask: torch.Tensor, context: torch.Tensor | None, position: str, *, tail: int = 0,
           context_mask: torch.Tensor | None = None):
    """Insert C [N, m, d] into left-padded prompt embeddings [N, P, d] -> ([N, P+m, d], [N, P+m]).

    suffix: after the whole prompt ([x || C], Eq. 3, right before the answer); prefix: before it
    (and before the padding); after-question: after the user's content, before the last `tail`
    tokens (the end of turn and generation prompt), where an LM reads a hint.
    context_mask [N, m]: some of C's slots are padding (hint blocks of different lengths); the
    result is then left-aligned again (every row's padding moved to its front, real tokens in
    order), so decoding sees the usual left-padded layout.
    """
    if context is None:
        return embeds, mask
    at = {"suffix": embeds.shape[1], "prefix": 0, "after-question": embeds.shape[1] - tail}[position]
    context = context.to(embeds.dtype)
    ones = torch.ones(context.shape[:2], dtype=mask.dtype, device=mask.device)
    cm = ones if context_mask is None else context_mask.to(mask.dtype)
    e = torch.cat([embeds[:, :at], context, embeds[:, at:]], 1)
    mk = torch.cat([mask[:, :at], cm, mask[:, at:]], 1)
    if context_mask is None:
        return e, mk
    order = torch.sort(mk, dim=1, stable=True).indices  # [N, L]: padding (0) first, each group in order
    return torch.gather(e, 1, order[..., None].expand_as(e)), torch.gather(mk, 1, order)

# ---------------------------------------------------------------------------------------------
# A batch of cache rows: which experts are read (ExpertView), C from g_phi, the policy's input.


class ExpertView(NamedTuple):
    keep: torch.Tensor | None = None  # [n] bool over data.experts; None: all
    source: dict[int, dict[int, int]] | None = None  # expert index -> {cache row: row it reads instead}

    def row(self, expert: int, row: int) -> int:
        return self.source.get(expert, {}).get(row, row) if self.source else row

    def kept(self, expert: int) -> bool:
        return self.keep is None or bool(self.keep[expert])


ALL = ExpertView()


def decode_merged(cfg: TrainConfig, m: PolicyParts) -> bool:
    """Whether rollouts and evaluations decode through merged LoRA weights (cfg.sampling.decode_merged)."""
    return cfg.sampling.decode_merged == "on" or (cfg.sampling.decode_merged == "auto" and m.lm.dtype == torch.float32)


def expert_features(data: RunData, idx: list[int], view: ExpertView = ALL) -> list[torch.Tensor]:
    """n tensors [b, d_i]: each expert's features of prompts idx (or of the rows the view maps them to)."""
    feats = data.features(idx)
    for i in (view.source or {}):
        feats[i] = data.features([view.row(i, r) for r in idx])[i]
    return feats


def context_tokens(m: PolicyParts, data: RunData, idx: list[int], device: str, view: ExpertView = ALL, *,
                   adapter: torch.nn.Module | None = None) -> AdapterOut:
    """g_phi (or `adapter`, another copy of it) on prompts idx: C [b, m, d_out] (scaled like the policy's
    token embeddings) with grad, expert attention [b, m, n] and the routed expert [b] where the method has them."""
    g = adapter if adapter is not None else m.adapter
    feats = [f.to(device) for f in expert_features(data, idx, view)] if data.features is not None else []
    rb = data.router_emb[idx].to(device) if data.router_emb is not None else None
    o = g(feats, rb, keep=view.keep) if view.keep is not None else g(feats, rb)
    if o.context is not None and o.context.shape[0] != len(idx):  # prefix: one C [1, m, d] for every prompt
        o = o._replace(context=o.context.expand(len(idx), -1, -1))
    return o._replace(context=o.context * m.scale if o.context is not None else None)


def null_context_tokens(m: PolicyParts, C: torch.Tensor) -> torch.Tensor:
    """C with its information removed (the gate closed: the anchor, or zeros), scaled like C: what the
    reference reads in training and the policy reads in the null-context evaluation. [.., m, d_out]"""
    return m.adapter.out.null_context(C) * m.scale


def expert_hints(data: RunData, i: int, view: ExpertView = ALL) -> list[tuple[str, str]]:
    """(expert, hint) of every kept expert for cache row i, each read from the row the view maps i to."""
    return [(n, data.hints[n][view.row(e, i)]) for e, n in enumerate(data.experts) if view.kept(e)]


def prompt_batch(m: PolicyParts, data: RunData, idx: list[int], with_hints: bool, device: str, *,
                 view: ExpertView = ALL, hint_format: str = "labelled") -> PromptBatch:
    """The prompts idx, left padded [b, P]; with_hints: each kept expert's hint in the user turn."""
    parts = [build_prompt_parts(m.tok, data.system, data.prompts["text"][i],
                                expert_hints(data, i, view) if with_hints else None, hint_format)
             for i in idx]
    return encode_prompts(m.tok, parts, device)


class PolicyInputs(NamedTuple):
    """What the policy and the reference read for b prompts, C or the hint block spliced in."""

    embeds: torch.Tensor  # [b, L, d] the policy's input (differentiable into g_phi)
    ref_embeds: torch.Tensor  # [b, L, d] the reference's: C with its gate closed (after a warm-up: the
    #                           warm-up's C), or zeros at the hints
    mask: torch.Tensor  # [b, L] left padded
    ctx: AdapterOut | None  # g_phi's output (None with C removed)


def policy_inputs(cfg: TrainConfig, m: PolicyParts, data: RunData, idx: list[int], device: str, *, mode: str = "with",
                  view: ExpertView = ALL) -> PolicyInputs:
    """The policy's input for prompts idx under `mode`: with (C, or output-collab's hints), removed
    (the bare prompt: Figure 5), null (C's information removed, its slots kept).

    output-collab's hints go in the user turn (hint_position user-turn) or as a block of tokens
    where C goes (context: Eq. 12), the reference then reading zero-valued tokens at their positions
    (hint_reference zeros) or the hints themselves (reads)."""
    hints = method_info(cfg.method).needs_hints and mode != "removed"
    block = hints and cfg.context.hint_position == "context"
    pb = prompt_batch(m, data, idx, hints and not block, device, view=view, hint_format=cfg.context.hint_format)  # [b, P]
    emb = m.lm.get_input_embeddings()(pb.ids)  # [b, P, d]
    ctx = context_tokens(m, data, idx, device, view) if mode != "removed" else None
    extra, ref_extra, extra_mask = None, None, None
    if ctx is not None and ctx.context is not None:  # C [b, m, d]
        extra = ref_extra = null_context_tokens(m, ctx.context)
        if mode == "with":
            extra = ctx.context
            if m.reference is not None:  # after a warm-up: C as the warm-up left g_phi and its gate
                with torch.no_grad():
                    ref_extra = context_tokens(m, data, idx, device, view, adapter=m.reference.adapter).context
    elif block:
        texts = [hint_block_text(expert_hints(data, i, view), cfg.context.hint_format) for i in idx]
        ids, extra_mask = encode_blocks(m.tok, texts, device)  # [b, H]
        extra = m.lm.get_input_embeddings()(ids)  # [b, H, d]
        ref_extra = torch.zeros_like(extra) if cfg.context.hint_reference == "zeros" else extra
    e_in, m_in = splice(emb, pb.mask, extra, cfg.context.context_position, tail=pb.tail, context_mask=extra_mask)
    ref_e = splice(emb, pb.mask, ref_extra, cfg.context.context_position, tail=pb.tail,
                   context_mask=extra_mask)[0] if extra is not None else emb
    return PolicyInputs(e_in, ref_e, m_in, ctx)


class RolloutInputs(NamedTuple):
    ctx: AdapterOut  # C [B, m, d_out] with grad, attention, choice
    embeds: torch.Tensor  # [B*G, L, d] C (or the hint block) spliced in
    ref_embeds: torch.Tensor  # [B*G, L, d] what the reference reads
    mask: torch.Tensor  # [B*G, L]


def rollout_inputs(cfg: TrainConfig, m: PolicyParts, data: RunData, idx: list[int], device: str) -> RolloutInputs:
    """policy_inputs for prompts idx, each row repeated G times, with C made by g_phi as it is now
    (num_iterations > 1 rebuilds them after each update)."""
    pi = policy_inputs(cfg, m, data, idx, device)  # [B, L, d]
    G = cfg.grpo.group_size
    return RolloutInputs(pi.ctx, *(x.repeat_interleave(G, 0) for x in (pi.embeds, pi.ref_embeds, pi.mask)))
