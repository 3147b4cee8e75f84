"""Run setup shared by the training loop and the evaluations: the data read from the cache
(load_data, into train/data.RunData), the run folder (open_run), the policy (train/policy.Policy,
built by build_policy: what evaluation reads) and the training state around it (Models,
build_models: the optimizer, the trainable tensors and the vLLM engine)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from cache.reader import Cache
from cache.run_folder import NOT_SETTINGS, RunFolder
from core import dist
from core.errors import MuskError
from core.config import from_dict
from pipeline.experts import KINDS
from pipeline.generation import eos_ids
from pipeline.vllm_engine import make_llm, require_vllm, sync_weights
from pipeline.tasks import TaskConfig
from train.adapters import AdapterSpec, build_adapter, method_info
from train.data import CachedFeatures, RunData
from train.config import TrainConfig, flat_dict, flatten, keys_missing_from_old_run, sectioned
from train.policy import Policy, load_policy, merged_lora_weights, policy_spec


def data_order(seed: int, n: int, cursor: int, count: int) -> list[int]:
    """Prompts cursor..cursor+count of an endless stream of seeded per-epoch permutations."""
    out = []
    for c in range(cursor, cursor + count):
        epoch, offset = divmod(c, n)
        out.append(int(np.random.default_rng([seed, epoch]).permutation(n)[offset]))
    return out


def step_prompts(cfg: TrainConfig, train_idx, cursor: int, block: int) -> list[int]:
    """Cache rows of block `block` of train_batch_size prompts from data position `cursor` on: round r of
    micro-batch g of a step reads block r * gradient_accumulation_steps + g (GRPO steps and warm-up
    steps alike), so the prompts do not depend on the number of ranks."""
    B = cfg.optim.train_batch_size
    return [int(train_idx[i]) for i in data_order(cfg.seed, len(train_idx), cursor + block * B, B)]


# ---------------------------------------------------------------------------------------------
# Data: everything a run needs, read from the cache once into memory (no per-row HDF5 reads on
# the hot path).


def load_data(cfg: TrainConfig, cache_path: Path) -> RunData:
    info = method_info(cfg.method)
    with Cache(cache_path) as cache:
        cache_cfg = yaml.safe_load(cache.config_yaml)
        if (overlap := cache.split_overlap()) > 0:
            raise MuskError(f"cache {str(cache_path)!r}: {overlap} of its held-out prompts are also in its training "
                            "split, so its validation numbers would be training accuracy. Rebuild it with this "
                            "musk's `musk extract` (held-out splits by construction).")
        prompts = cache.prompts()
        train_idx, val_idx, val_split = cache.split_indices("train"), cache.split_indices("val"), "val"
        if len(val_idx) == 0:
            val_idx, val_split = cache.split_indices("test"), "test"  # GSM8K evaluates on its test split
        experts = list(cfg.experts) if cfg.experts is not None else cache.experts
        features, draw = None, 0
        if info.needs_features or info.needs_hints:
            if not experts:
                raise MuskError(f"method {cfg.method!r} needs experts, but cache {str(cache_path)!r} has none")
        else:
            experts = []
        if info.needs_features:
            feats = cache.features(cfg.context.pooling, experts, draw=cfg.seed)  # raises on an unknown expert
            features = CachedFeatures([torch.from_numpy(feats[n]).float() for n in experts])
            draw = cfg.seed % cache.draws(cfg.context.pooling, experts[0])
        router_emb = torch.from_numpy(cache.router_embedding(cfg.context.router)).float() if info.needs_router else None
        hints = {n: cache.hints(n) for n in experts} if info.needs_hints else {}
        prompt_tokens = np.stack([cache.column(n, "n_tokens") for n in experts]) if experts else None
        hint_tokens = None
        if info.needs_hints and all(cache.has_column(n, "hint_n_tokens") for n in experts):
            hint_tokens = np.stack([cache.column(n, "hint_n_tokens") for n in experts])
        fingerprint, prompt_set = cache.fingerprint, cache.data_fingerprint
    if len(train_idx) == 0 or len(val_idx) == 0:
        raise MuskError(f"cache {str(cache_path)!r} needs a train and a val (or test) split")
    system = from_dict(TaskConfig, cache_cfg["task"], "cache task config").system_prompt()
    return RunData(family=cache_cfg["task"]["family"], system=system, cache_fingerprint=fingerprint, prompts=prompts,
                   train_idx=train_idx, val_idx=val_idx, val_split=val_split, experts=experts, features=features,
                   router_emb=router_emb, hints=hints, prompt_tokens=prompt_tokens, hint_tokens=hint_tokens,
                   pooling_draw=draw, prompt_set=prompt_set)


def micro_batches_per_rank(accumulation: int, world: int) -> int:
    """A step's gradient_accumulation_steps micro-batches split over `world` ranks; raises MuskError
    when they do not divide (a step would otherwise take more or fewer prompts than the config says)."""
    if accumulation % world:
        raise MuskError(f"gradient_accumulation_steps {accumulation} does not split over {world} ranks: a step takes "
                        f"gradient_accumulation_steps x train_batch_size prompts whatever the rank count. Use a "
                        f"multiple of {world} (--set optim.gradient_accumulation_steps=...) or another rank count.")
    return accumulation // world


def open_run(cfg: TrainConfig, cache_path: Path, out: Path | None, resume: bool, *, data: RunData,
             dtype: torch.dtype | None = None) -> tuple[RunFolder, dict]:
    """The run folder and its resolved config, flat (`train.config.flatten`; config.yaml holds it in
    sections). Refuses to overwrite a run and to resume one made with other settings. dtype: the policy's dtype as resolved on this machine,
    stored as dtype_resolved beside `dtype` (auto resolves per machine); --resume refuses another one."""
    run = RunFolder(Path(out) if out is not None else Path("runs") / f"{cfg.method}-{data.family}-s{cfg.seed}")
    resolved = {**flat_dict(cfg), "cache": str(cache_path), "cache_fingerprint": data.cache_fingerprint,
                "task_family": data.family, "prompt_set": data.prompt_set, "world_size": dist.world(),
                "micro_batches_per_rank": micro_batches_per_rank(cfg.optim.gradient_accumulation_steps, dist.world()),
                "prompts_per_step": cfg.optim.gradient_accumulation_steps * cfg.optim.train_batch_size}
    if dtype is not None:
        resolved["dtype_resolved"] = str(dtype).removeprefix("torch.")
    if resume:
        if not run.config_path.exists():
            raise MuskError(f"--resume: {str(run)!r} holds no run (no config.yaml)")
        old = flatten(run.read_config())  # sectioned, or flat from an older musk
        if "dtype_resolved" in old and old["dtype_resolved"] != resolved.get("dtype_resolved", old["dtype_resolved"]):
            raise MuskError(f"--resume: the run in {str(run)!r} trained in {old['dtype_resolved']}, and dtype "
                            f"{cfg.policy.dtype!r} resolves to {resolved['dtype_resolved']} here; set policy.dtype: "
                            f"{old['dtype_resolved']} to continue it in its own precision")
        if "dtype_resolved" not in old:  # made before the resolved dtype was recorded: nothing to compare
            resolved.pop("dtype_resolved", None)
        taken, lacking = keys_missing_from_old_run(old, resolved, NOT_SETTINGS)
        if lacking:
            raise MuskError(f"--resume: the run in {str(run)!r} was made by an older musk without the keys {lacking}, "
                            "whose values here are not what it did before they existed; start a new run")
        if taken:
            print(f"resume: {run.config_path} lacks {sorted(taken)} (made by an older musk); "
                  f"taken as their defaults from before they existed: {taken}", flush=True)
        diff = sorted(k for k in resolved if k not in NOT_SETTINGS and k not in taken and old.get(k) != resolved[k])
        if diff:
            raise MuskError(f"--resume: the run in {str(run)!r} was made with other settings: {diff}")
    elif run.holds_anything():
        raise MuskError(f"run folder {str(run)!r} already holds a run; use --resume or another --out")
    dist.barrier()  # every rank has checked the folder before rank 0 writes into it
    if dist.is_main():
        run.write_config(sectioned(resolved, strict=False))
    dist.barrier()
    return run, resolved


# ---------------------------------------------------------------------------------------------
# The policy (LM with LoRA, g_phi, tokenizer) and the training state around it (AdamW, the trainable
# tensors, the vLLM engine). The reference is the same weights with LoRA disabled.


@dataclass(kw_only=True)
class Models(Policy):
    """The policy (train/policy.Policy: its methods) and its training state."""

    optimizer: torch.optim.Optimizer
    trainable: list[torch.Tensor]
    vllm: object | None = None  # rollout_engine vllm: the engine, its weights synced after each step


def _param_groups(cfg: TrainConfig, lora: list, adapter: torch.nn.Module) -> list[dict]:
    """LoRA at lr; g_phi at router_lr (warmed up over router_warmup_steps); the gate at gate_lr."""
    gate = [p for n, p in adapter.named_parameters() if n.endswith("out.gate")]
    rest = [p for n, p in adapter.named_parameters() if not n.endswith("out.gate")]
    groups = [{"name": "lora", "params": lora, "lr": cfg.optim.lr, "base_lr": cfg.optim.lr, "warmup": 0}]
    if rest:
        groups.append({"name": "router", "params": rest, "lr": cfg.optim.router_lr, "base_lr": cfg.optim.router_lr,
                       "warmup": cfg.optim.router_warmup_steps})
    if gate:
        groups.append({"name": "gate", "params": gate, "lr": cfg.optim.gate_lr, "base_lr": cfg.optim.gate_lr, "warmup": 0})
    return groups


def build_policy(cfg: TrainConfig, data: RunData, device: str, dtype: torch.dtype) -> Policy:
    """The policy LM with fresh LoRA (load_policy) and g_phi built for the run's experts, every RNG
    seeded with cfg.seed first (the initial weights are the seed's)."""
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    peft_model, tok, scale = load_policy(cfg, dtype, device)
    lm = peft_model.get_base_model()
    if cfg.run.gradient_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    emb = lm.get_input_embeddings().weight
    feats = data.features.feats if data.features is not None else []
    spec = AdapterSpec(
        method=cfg.method, expert_dims=tuple(int(f.shape[1]) for f in feats), expert_names=tuple(data.experts),
        d_latent=cfg.context.d_latent, d_out=int(emb.shape[1]), num_latents=cfg.context.num_latents, num_heads=cfg.context.num_heads,
        router_dim=int(data.router_emb.shape[1]) if data.router_emb is not None else 0, init_std=cfg.context.init_std,
        gumbel_tau=cfg.context.gumbel_tau, pooling=cfg.context.pooling, context_scale=scale, context_gate=cfg.context.context_gate,
        embed_rms=float(emb.detach().float().pow(2).mean().sqrt()), feature_norm=cfg.context.feature_norm,
        context_rms=cfg.context.context_rms, context_anchor=cfg.context.context_anchor,
    )
    adapter = build_adapter(spec).to(device)
    if adapter.caps.context:
        adapter.out.set_anchor(emb.detach())
    if adapter.caps.reads_experts:
        adapter.experts.set_feature_stats([f[data.train_idx] for f in feats])
    return Policy(peft=peft_model, lm=lm, tok=tok, adapter=adapter, spec=spec, scale=scale, eos=eos_ids(lm, tok),
                  base=policy_spec(cfg.policy.name))


def build_models(cfg: TrainConfig, data: RunData, device: str, dtype: torch.dtype) -> Models:
    """The policy (build_policy) with AdamW over LoRA and g_phi (param_groups) and, for rollout_engine
    vllm, the engine holding the merged weights."""
    p = build_policy(cfg, data, device, dtype)
    lora = [t for t in p.peft.parameters() if t.requires_grad]
    optimizer = torch.optim.AdamW(_param_groups(cfg, lora, p.adapter), weight_decay=cfg.optim.weight_decay, eps=cfg.optim.epsilon)
    return Models(**{f: getattr(p, f) for f in p.__dataclass_fields__}, optimizer=optimizer,
                  trainable=lora + list(p.adapter.parameters()), vllm=_rollout_engine(cfg, p.peft, dtype))


def _rollout_engine(cfg: TrainConfig, peft_model, dtype: torch.dtype):
    """rollout_engine vllm: an engine over the policy's folder, holding the current merged weights."""
    if cfg.sampling.rollout_engine != "vllm":
        return None
    require_vllm("rollout_engine vllm")
    spec = policy_spec(cfg.policy.name)
    if KINDS[spec.kind].folder is None:
        raise MuskError(f"rollout_engine vllm needs a policy with a model folder; {cfg.policy.name!r} is built in code")
    llm = make_llm(KINDS[spec.kind].folder(spec), dtype, cfg.sampling.vllm_memory, prompt_embeds=True, seed=cfg.seed)
    sync_weights(llm, merged_lora_weights(peft_model))
    return llm

