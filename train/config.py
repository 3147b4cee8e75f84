"""The training config: a frozen dataclass of typed sections, each declared beside the code that reads it.

    method, seed, experts   top level
    policy    train/policy_config.py    the LM, LoRA, dtype
    context   train/context_config.py   g_phi, where C goes, output-collab's hint block
    grpo      train/grpo.py             the objective and its estimator
    optim     train/optim_config.py     steps, batch, AdamW
    sampling  train/sampling_config.py  decoding and answer reading
    eval      train/eval_config.py      evaluations during training
    run       train/run_config.py       execution, logging, checkpoints
    recipe    train/recipe_config.py    recipes beyond the paper

A key is `SECTION.KEY` (`--set grpo.beta=0`, or `grpo: {beta: 0}` in YAML). The flat spelling of older
configs and run folders (`beta: 0`) is an alias: each flat name is unique across the sections
(`FLAT`), so `sectioned` maps it to its section and `flatten` maps back. Everything that compares
configs (resume, the sweep's plan and run names, the report) compares the flat form, so an old flat
run folder and a new sectioned one give the same answers.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import get_args, get_type_hints

from core.config import from_dict, load_yaml, merge, parse_sets, to_dict
from core.errors import MuskError
from train.adapters import method_info
from train.context_config import ContextConfig
from train.eval_config import EvalConfig
from train.grpo import GrpoConfig
from train.optim_config import OptimConfig
from train.policy_config import PolicyConfig
from train.recipe_config import RecipeConfig
from train.run_config import RunConfig
from train.sampling_config import SamplingConfig


@dataclass(frozen=True)
class TrainConfig:
    method: str = "perceiver"
    """single | perceiver | ffn | hard-routing | output-collab | prefix (m trainable context tokens, no experts)."""
    seed: int = 0
    """Seed of initialisation, data order and sampling."""
    experts: tuple[str, ...] | None = None
    """Subset of the cache's experts (in this order); null uses every expert in the cache."""
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    context: ContextConfig = field(default_factory=ContextConfig)
    grpo: GrpoConfig = field(default_factory=GrpoConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)
    recipe: RecipeConfig = field(default_factory=RecipeConfig)

    def validate(self) -> None:
        """The rules across sections (each section has checked itself), by dotted key and with the reason."""
        method_info(self.method)
        if self.policy.lm_head_fp32 and self.sampling.rollout_engine != "musk":
            raise MuskError("policy.lm_head_fp32 needs rollout_engine musk (sampling.rollout_engine; vLLM computes its own "
                            "logits)")
        g, r = self.grpo, self.recipe
        if g.filter_groups and g.num_iterations > 1 and self.method == "hard-routing":
            raise MuskError("grpo.filter_groups with num_iterations > 1 is not offered for hard-routing: passes 2.. "
                            "redraw the Gumbel routing per micro-batch, and a micro-batch of kept groups from "
                            "several rounds would not redraw the experts it sampled with")
        if r.sft_warmup_steps > self.optim.total_training_steps:
            raise MuskError(f"recipe.sft_warmup_steps {r.sft_warmup_steps} is more than the run's "
                            f"optim.total_training_steps {self.optim.total_training_steps}: the warm-up counts "
                            "within the run's steps")
        if (r.sft_warmup_steps > 0 and r.sft_warmup_train == "context"
                and self.method not in ("perceiver", "ffn", "hard-routing", "prefix")):
            raise MuskError(f"recipe.sft_warmup_train context on method {self.method!r}: it has no g_phi, so a "
                            "context-only warm-up would train nothing; use sft_warmup_train context+lora (the LoRA) "
                            "or no warm-up")
        if r.sft_mix_coef > 0 and g.loss_type == "dapo":
            raise MuskError("recipe.sft_mix_coef with grpo.loss_type dapo: dapo divides the step's summed gradient "
                            "by its completion tokens, which would rescale the supervised term too; use grpo, bnpo "
                            "or dr_grpo")


SECTIONS: dict[str, type] = {f.name: t for f in dataclasses.fields(TrainConfig)
                             if dataclasses.is_dataclass(t := get_type_hints(TrainConfig)[f.name])}
TOP = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name not in SECTIONS)
RENAMED = {"policy.name": "policy"}  # a leaf whose flat name is not its own


def _flat_names() -> dict[str, str]:
    """flat name -> dotted key ("beta" -> "grpo.beta", "method" -> "method")."""
    out = {k: k for k in TOP}
    for sec, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            dotted = f"{sec}.{f.name}"
            out[RENAMED.get(dotted, f.name)] = dotted
    return out


FLAT: dict[str, str] = _flat_names()
DOTTED: dict[str, str] = {d: k for k, d in FLAT.items()}  # dotted key -> flat name

HINT_FORMATS = get_args(get_type_hints(ContextConfig)["hint_format"])  # for train/inputs.py; the Literal is the source


def dotted(key: str, where: str = "config") -> str:
    """A key as written (flat `beta`, dotted `grpo.beta`, or a section's name) -> its dotted form.
    Raises MuskError naming the nearest dotted keys for an unknown one."""
    if key in FLAT:
        return FLAT[key]
    if key in DOTTED or key in SECTIONS:
        return key
    raise MuskError(f"{where}: unknown key {key!r}; nearest valid keys: {nearest(key)} (keys are SECTION.KEY, "
                    f"sections {list(SECTIONS)}, or top-level {list(TOP)})")


def nearest(key: str, n: int = 5) -> list[str]:
    """The dotted keys whose dotted or flat spelling is nearest `key` (`betta` -> ['grpo.beta', ...])."""
    def score(flat: str, full: str) -> float:
        return max(difflib.SequenceMatcher(None, key, s).ratio() for s in (flat, full))

    ranked = sorted(FLAT.items(), key=lambda kv: -score(*kv))
    return [full for flat, full in ranked[:n] if score(flat, full) >= 0.4]


def flat_name(key: str) -> str:
    """A key as written -> its flat name (`grpo.beta` and `beta` -> `beta`); other keys unchanged."""
    return DOTTED.get(key, key)


def sectioned(data: dict, where: str = "config", strict: bool = True) -> dict:
    """A config mapping in any spelling (flat, dotted or sectioned keys) -> the sectioned form
    TrainConfig reads. strict: an unknown key raises MuskError (with the nearest dotted keys); else it
    stays as it is (the run folder's own keys beside the config: cache, task_family...)."""
    out: dict = {}
    for key, value in data.items():
        if key in SECTIONS and isinstance(value, dict):
            for sub, v in value.items():
                out.setdefault(key, {})[sub] = v  # an unknown sub-key: from_dict names it
            continue
        if not strict and key not in FLAT and key not in DOTTED:
            out[key] = value
            continue
        path = dotted(key, where).split(".")
        if len(path) == 1:
            out[path[0]] = value
        else:
            out.setdefault(path[0], {})[path[1]] = value
    return out


def flatten(data: dict) -> dict:
    """A config mapping (a run folder's config.yaml, sectioned or flat) -> the flat form every comparison
    reads (resume, sweep, report): `{"grpo": {"beta": 0}}` -> `{"beta": 0}`; flat input is unchanged."""
    out: dict = {}
    for key, value in data.items():
        if key in SECTIONS and isinstance(value, dict):
            out.update({flat_name(f"{key}.{sub}"): v for sub, v in value.items()})
        else:
            out[key] = value
    return out


def flat_dict(cfg: TrainConfig) -> dict:
    """The resolved config in the flat form (what comparisons and fingerprints read)."""
    return flatten(to_dict(cfg))


def parse_train_sets(items: list[str] | tuple[str, ...], where: str = "--set") -> dict:
    """`--set KEY=VALUE` items for the train config -> a sectioned override dict. KEY is dotted
    (`grpo.beta`) or the flat alias (`beta`); an unknown KEY raises MuskError naming the dotted keys near it."""
    named = []
    for item in items:
        key, eq, raw = (s.strip() if i == 0 else s for i, s in enumerate(item.partition("=")))
        head, _, rest = key.partition(".")
        if key in FLAT or not (head in SECTIONS or head in TOP or head in FLAT):
            full = dotted(key, f"{where} {key!r}")  # an unknown key raises here, naming the dotted ones near it
        elif head in SECTIONS or head in TOP:
            full = key  # parse_sets checks the rest (grpo.betta: nearest keys of grpo)
        else:  # a flat key with a tail (lr.x): parse_sets says what is wrong, under the dotted name
            full = f"{FLAT[head]}.{rest}"
        named.append(f"{full}={raw}" if eq else item)
    return parse_sets(TrainConfig, named, where)


# Embedded default: SmolLM2-135M-Instruct policy, short budget, lenient answers (CPU in minutes).
EMBEDDED_DEFAULT = {
    "policy": {"name": "smollm2-135m-instruct"},
    "context": {"d_latent": 128, "context_position": "after-question", "context_gate": "rms", "context_rms": 3.0,
                "feature_norm": "standardize", "context_anchor": "mean-embedding", "hint_format": "labelled",
                "hint_position": "user-turn", "hint_reference": "reads"},
    "grpo": {"group_size": 4},
    "optim": {"train_batch_size": 2, "gradient_accumulation_steps": 1, "total_training_steps": 20, "lr": 2e-4,
              "router_lr": 3e-3, "gate_lr": 3e-3, "grad_clip_scope": "per-group"},
    "sampling": {"max_new_tokens": 48, "answer_extraction": "lenient"},
    "eval": {"val_batch_size": 16, "test_freq": 10, "eval_batches": 4},
    "run": {"save_freq": 10},
}


def advantage_scale(cfg: TrainConfig) -> str:
    """grpo.scale_rewards with auto resolved (GrpoConfig.advantage_scale)."""
    return cfg.grpo.advantage_scale()


def load_train_config(path: str | None, overrides: dict | None = None) -> TrainConfig:
    """A preset (YAML; None: the embedded default) with `overrides` on top, both in any spelling
    (sectioned, dotted or flat) -> the validated TrainConfig. Raises MuskError on a bad key or value."""
    data = load_yaml(path) if path else EMBEDDED_DEFAULT
    where = f"train config {path}" if path else "train config"
    data = merge(sectioned(data, where), sectioned(overrides or {}, "train config overrides"))
    return from_dict(TrainConfig, data, "train config")


def config_from_run(resolved: dict, where: str) -> TrainConfig:
    """A run folder's config.yaml (sectioned, or flat from an older musk; its run keys beside) -> TrainConfig."""
    keys = {k: v for k, v in flatten(resolved).items() if k in FLAT}
    return from_dict(TrainConfig, sectioned(keys, where), where)


# Keys a method does not read (the others ignore them): a sweep does not multiply that method's runs by
# their values. Only keys no code path of the other methods reads; KEY -> the methods that read it.
_FEATURE_METHODS = ("perceiver", "ffn", "hard-routing")
_CONTEXT_METHODS = _FEATURE_METHODS + ("prefix",)  # g_phi with its gate and output projection
METHOD_KEYS: dict[str, tuple[str, ...]] = {
    "num_latents": ("perceiver", "prefix"), "num_heads": ("perceiver",),
    "gumbel_tau": ("hard-routing",), "router": ("hard-routing",),
    "d_latent": _CONTEXT_METHODS, "init_std": _CONTEXT_METHODS, "router_lr": _CONTEXT_METHODS,
    "router_warmup_steps": _CONTEXT_METHODS, "pooling": _FEATURE_METHODS, "feature_norm": _FEATURE_METHODS,
    "context_gate": _CONTEXT_METHODS, "context_rms": _CONTEXT_METHODS, "gate_lr": _CONTEXT_METHODS,
    "gate_warmup_steps": _CONTEXT_METHODS, "context_anchor": _CONTEXT_METHODS,
    "hint_format": ("output-collab",), "hint_position": ("output-collab",), "hint_reference": ("output-collab",),
}


def method_reads(method: str, key: str) -> bool:
    """Whether a run of `method` reads the config key (flat `beta` or dotted `grpo.beta`)."""
    return method in METHOD_KEYS.get(flat_name(key), (method,))


# A key added after runs were made: the default that reproduces what musk did before it existed. A run
# folder whose config.yaml lacks such a key resumes when its value now is that default; a key missing
# that is not here (or set otherwise) refuses the resume.
DEFAULTS_BEFORE_KEY: dict = {
    "tis_cap": 0.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "num_iterations": 1, "rollout_chunk": 0,
    "router_warmup_steps": 0, "clip_eps_high": None, "mask_truncated_completions": False, "loss_type": "grpo",
    "scale_rewards": "auto", "context_gate": "none", "context_anchor": "zero", "feature_norm": "none",
    "grad_clip_scope": "global", "curve_freq": 0, "eval_null_context": False, "min_new_tokens": 0,
    "rollout_engine": "musk", "filter_groups": False, "filter_groups_max_rounds": 10, "gate_warmup_steps": 10,
    "sft_warmup_steps": 0, "sft_warmup_train": "context", "sft_mix_coef": 0.0, "sft_mix_steps": 1,
    "lm_head_fp32": False, "sft_reference": "base",
}

# Keys whose value changes nothing in a run of the given (flat) config: an older run without the key
# resumes under today's default (sft_reference matters only after a warm-up).
INERT_WHEN = {"sft_reference": lambda c: not int(c.get("sft_warmup_steps") or 0) > 0}


def keys_missing_from_old_run(old: dict, new: dict, skip=()) -> tuple[dict, list[str]]:
    """Keys of `new` (a resolved run config, flat: `flatten`) that an older run's `old` config (flat) lacks: (those that take
    their pre-existing default, {key: value}; those that cannot, sorted)."""
    missing = sorted(k for k in new if k not in old and k not in skip)
    ok = {k: new[k] for k in missing if (k in DEFAULTS_BEFORE_KEY and DEFAULTS_BEFORE_KEY[k] == new[k])
          or (k in INERT_WHEN and INERT_WHEN[k](new))}
    return ok, [k for k in missing if k not in ok]


def field_type(key: str):
    """The annotation of a train config key (flat or dotted), or None for an unknown key."""
    path = FLAT.get(key, key).split(".")
    cls = SECTIONS.get(path[0], TrainConfig) if len(path) == 2 else TrainConfig
    return get_type_hints(cls).get(path[-1])
