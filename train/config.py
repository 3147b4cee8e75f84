"""The training config: one frozen dataclass, names as the paper's Listing 1 gives them."""

from __future__ import annotations

from dataclasses import dataclass

from core.errors import MuskError
from core.config import from_dict, load_yaml, merge
from pipeline.pooling import VARIANTS
from pipeline.vllm_engine import ENGINES
from train.adapters import CONTEXT_ANCHORS, CONTEXT_GATES, FEATURE_NORMS, method_info
from pipeline.rewards import MODES
from train.grpo import LOSS_TYPES, SCALE_REWARDS
from train.trackers import check_trackers

DECODE_MERGED = ("auto", "on", "off")
HINT_POSITIONS = ("context", "user-turn")
HINT_REFERENCES = ("zeros", "reads")
CLIP_SCOPES = ("global", "per-group")
CONTEXT_POSITIONS = ("suffix", "prefix", "after-question")  # where C goes in the prompt (train/inputs.splice)
HINT_FORMATS = ("literal", "labelled")  # the [Expert Hints] block (train/inputs.hint_block_text)


@dataclass(frozen=True)
class TrainConfig:
    method: str = "perceiver"
    """single | perceiver | ffn | hard-routing | output-collab | prefix (m trainable context tokens, no experts)."""
    policy: str = "smollm2-135m-instruct"
    """The policy LM: an expert-registry name, a hub id or a local folder."""
    seed: int = 0
    """Seed of initialisation, data order and sampling."""
    experts: tuple[str, ...] | None = None
    """Subset of the cache's experts (in this order); null uses every expert in the cache."""
    pooling: str = "last_token"
    """Pooling variant read from the cache (Table 2 ablation)."""
    router: str | None = None
    """Router encoder in the cache for hard-routing; null takes the first one."""
    # --- g_phi
    d_latent: int = 512
    """Shared latent size d of the expert projections (paper: 512)."""
    num_latents: int = 8
    """m, the number of latent queries / context tokens of perceiver (paper: 8; Figure 6 sweep)."""
    num_heads: int = 8
    """Cross-attention heads (paper: 8)."""
    init_std: float = 1e-4
    """Std of W_out at initialisation (near zero so that C ~ 0 and KL ~ 0 at step 0)."""
    gumbel_tau: float = 1.0
    """Temperature of the straight-through Gumbel-softmax of hard-routing."""
    context_position: str = "suffix"
    """Where C goes: suffix ([x || C], Eq. 3: after the whole prompt, right before the answer), prefix
    (before the prompt) or after-question (after the user's content, before the end of turn and the
    generation prompt: where a chat model reads a hint)."""
    context_gate: str = "none"
    """none: C = C' W_out + b_out (Eq. 11 as printed). rms: C = tanh(gamma) * s * C_raw / rms(C_raw),
    s the RMS of the policy's token embeddings, gamma = 0 at init (C = 0 and KL = 0 at step 0, C never
    louder than a token). ramp: C = r_t * sigmoid(gamma) * s * C_raw / rms(C_raw), r_t = min(1, (t - 1) /
    gate_warmup_steps) at training step t: positive for every gamma, so C can neither flip its sign nor
    close by chance; r_1 = 0 keeps KL = 0 at step 0 (docs/context-path.md)."""
    gate_warmup_steps: int = 10
    """context_gate ramp: steps over which r_t rises linearly from 0 to 1."""
    context_rms: float = 1.0
    """context_gate rms: the largest RMS of C, in units of the RMS of the policy's token embeddings."""
    gate_lr: float = 1e-2
    """AdamW learning rate of the gate gamma (context_gate: rms or ramp)."""
    context_anchor: str = "zero"
    """zero: C as above (the paper). mean-embedding: the policy's mean token embedding is added to every
    context token, so a closed gate leaves m neutral tokens rather than m zero vectors (which cost a
    135M policy 6 points before any training); the reference reads the same anchor."""
    hint_format: str = "literal"
    """output-collab: literal (Eq. 12 as written: the experts' decoded hints verbatim, unlabelled, in an
    [Expert Hints] block) or labelled (musk's: one "- <expert>: <stripped hint>" line per expert)."""
    hint_position: str = "context"
    """output-collab: context (the hint block's tokens go where the paper puts C, context_position) or
    user-turn (inside the user's message, after the question)."""
    hint_reference: str = "zeros"
    """output-collab: zeros (the reference policy reads zero-valued tokens at the hints' positions, as
    Sec. 4.1 gives it zero-valued context tokens at C's) or reads (it reads the hints like the policy).
    zeros needs hint_position context."""
    router_warmup_steps: int = 0
    """Linear warmup of router_lr over the first K steps (0: none; the gate's lr is not warmed up)."""
    feature_norm: str = "none"
    """none, or standardize: z-score each expert's cached features per dimension with the train split's
    statistics before W_i (experts of very different scale meet on equal terms)."""
    # --- LoRA
    lora_rank: int = 8
    """LoRA rank (paper: 8)."""
    lora_alpha: int = 16
    """LoRA alpha."""
    lora_dropout: float = 0.0
    """LoRA dropout (0 keeps the GRPO forward deterministic)."""
    lora_target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    """Module names that get LoRA adapters."""
    # --- GRPO
    group_size: int = 8
    """G completions per prompt (paper: 8)."""
    beta: float = 0.04
    """KL coefficient (paper: 0.04)."""
    clip_eps: float = 0.2
    """Lower PPO clip of the ratio pi/pi_old: the surrogate clips it at 1 - clip_eps (TRL: epsilon;
    default 0.2 as TRL). Active only when num_iterations > 1 (with one pass the ratio is 1)."""
    clip_eps_high: float | None = None
    """Upper PPO clip: the ratio is clipped at 1 + clip_eps_high; null: clip_eps (symmetric, TRL:
    epsilon_high, default null as TRL). DAPO's clip-higher sets it above clip_eps (e.g. 0.28)."""
    num_iterations: int = 1
    """mu, AdamW updates per batch of rollouts (TRL: num_iterations; paper and default 1). Each step
    samples once, then makes mu passes over the same rollouts, the ratio taken against the sampling
    policy's log-probs (PPO-style GRPO). total_training_steps counts batches of rollouts, so a run
    makes mu x total_training_steps updates."""
    loss_type: str = "grpo"
    """How per-token losses become one number (train/grpo.py): grpo (mean over each completion's
    tokens, then over completions: the paper and original GRPO), dr_grpo (token sum over the constant
    completions x max_new_tokens), bnpo (token mean over the micro-batch), dapo (token mean over the
    whole optimizer step). TRL's name; TRL's default is dapo."""
    scale_rewards: str = "auto"
    """Advantage scaling (TRL: scale_rewards): group (divide by the group's reward std: GRPO), batch (by
    the std of the micro-batch's B*G rewards), none (no division: Dr. GRPO). auto: none under
    loss_type dr_grpo, group otherwise (the paper: group)."""
    mask_truncated_completions: bool = False
    """Leave completions that hit max_new_tokens without EOS out of the loss (DAPO's overlong
    filtering; TRL: mask_truncated_completions, default false). They still count in the advantages."""
    filter_groups: bool = False
    """Dynamic sampling (DAPO; verl's algorithm.filter_groups): drop the groups whose G rewards are all
    equal (advantage 0: no policy gradient) and draw further prompts until each micro-batch has
    train_batch_size informative groups, at most filter_groups_max_rounds generation rounds (logged per
    step: filter/groups_drawn, filter/groups_kept). Off: the paper's GRPO."""
    filter_groups_max_rounds: int = 10
    """Cap on generation rounds of train_batch_size prompts a micro-batch may take under filter_groups
    (verl's max_num_gen_batches; DAPO's recipe 10). At the cap the micro-batch is filled with the
    uninformative groups last drawn (they add only the KL term) and filter/groups_kept says so."""
    std_floor: float = 1e-4
    """Floor of the group std in the advantage denominator."""
    max_new_tokens: int = 128
    """Fixed generation budget (paper: 128 tokens for all methods)."""
    min_new_tokens: int = 0
    """EOS is suppressed in a rollout's first K tokens (0: off). Not a paper setting: benchmarks set
    it to max_new_tokens for fixed-length rollouts, as in the TRL comparison."""
    temperature: float = 1.0
    """Sampling temperature of the rollouts."""
    top_p: float = 1.0
    """Nucleus sampling of the rollouts: keep the smallest set of tokens whose probability reaches
    top_p (1.0: off, the paper and TRL's default). The loss's log-probs stay those of the unfiltered
    softmax(logits / temperature), as TRL computes them."""
    top_k: int = 0
    """Sample the rollouts from the k most probable tokens only (0: off, the paper and TRL's default)."""
    min_p: float = 0.0
    """Drop tokens whose probability is below min_p x the most probable token's (0.0: off; TRL: null)."""
    answer_extraction: str = "strict"
    """strict (paper: last closed <answer> tag) or lenient (see pipeline/rewards.py)."""
    # --- Listing 1
    train_batch_size: int = 4
    """Prompts per micro-batch (each gives group_size completions)."""
    val_batch_size: int = 4
    """Prompts per evaluation batch."""
    gradient_accumulation_steps: int = 8
    """Micro-batches per optimizer step (paper: 4 x 8 = 32 prompts a step)."""
    total_training_steps: int = 500
    """Optimizer steps (paper: 500 on Reasoning Gym, 233 on GSM8K)."""
    lr: float = 1e-4
    """AdamW learning rate of the LoRA policy."""
    router_lr: float = 1e-4
    """AdamW learning rate of g_phi (the context-token adapter)."""
    weight_decay: float = 1e-2
    """AdamW weight decay."""
    epsilon: float = 1e-6
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Max grad norm (see grad_clip_scope)."""
    grad_clip_scope: str = "global"
    """global: one norm over all trainable tensors (the paper's recipe); per-group: LoRA, g_phi and the
    gate are clipped each on its own, so the gate's large gradient cannot shrink the LoRA's update."""
    warmup_steps: int = 0
    """Linear LR warmup steps (paper: none)."""
    log_freq: int = 1
    """Print a progress line every K steps (metrics.jsonl gets every step)."""
    log_completions_freq: int = 10
    """Every K steps, append the first micro-batch's first prompts with their completions, rewards,
    advantages and attention rows to completions.jsonl (0: never)."""
    log_completions_prompts: int = 1
    """Prompts per completions.jsonl entry step."""
    report_to: tuple[str, ...] = ("none",)
    """Experiment trackers that mirror metrics.jsonl: none, tensorboard (<run>/tensorboard, extra
    `tensorboard`), wandb, trackio (extras of the same names). Not a setting of the run: a resume may
    change it and the report ignores it."""
    eval_completions: int = 4
    """Each full evaluation writes the greedy completions of its first N prompts, with C and with C
    removed, to completions.jsonl (kind eval): what C changed, side by side. 0: none."""
    save_freq: int = 1000
    """Checkpoint every K steps (and at the end)."""
    test_freq: int = 1000
    """Evaluate on the validation split every K steps (and at the end)."""
    eval_batches: int = 1000
    """Evaluation batches (x val_batch_size prompts, capped at the split's size)."""
    eval_without_context: bool = True
    """Also evaluate the same policy with C removed (Figure 5)."""
    eval_null_context: bool = False
    """Also evaluate with C's information removed but its m slots kept (the gate closed: C = its anchor,
    or zeros without one): separates what the experts' states add from what the policy learned to do
    with m extra tokens (accuracy_null_context)."""
    curve_freq: int = 0
    """Every K steps, evaluate with and without C on a fixed subset of the validation split (the
    Figure 5 curve when test_freq is too rare for one); 0: off."""
    curve_prompts: int = 64
    """Validation prompts of the Figure 5 curve (the first ones of the split, the same at every point)."""
    # --- execution
    rollout_chunk: int = 0
    """Rollouts per differentiable policy forward (0: all B*G at once). Smaller saves memory; the
    gradient is the same (chunk losses are weighted to sum to the full loss)."""
    share_prompt: bool = True
    """Run each prompt once per group of G rollouts (prefill, policy and reference forwards) and let
    the group's completions attend to its cached keys/values: same numbers up to rounding, G-1 of
    every G prompt forwards saved. Off under gradient checkpointing, or when rollout_chunk splits
    groups."""
    gradient_checkpointing: bool = False
    """Recompute the policy's activations in backward (paper-scale policies on one GPU)."""
    rollout_engine: str = "musk"
    """musk (its own KV-cached decoder, any device) or vllm (GPU, the optional extra: prompt embeddings
    with C spliced in, LoRA merged into vLLM's weights after every optimizer step)."""
    vllm_memory: float = 0.3
    """rollout_engine vllm: the share of GPU memory vLLM may take (the policy trains in the rest)."""
    decode_merged: str = "auto"
    """auto, on, off: decode rollouts and evaluations through W + B A, merged out of place for each
    LoRA linear (one matmul instead of three; the LoRA branch is a third of a CPU decode step's ops).
    Same numbers up to rounding where the policy is float32 (auto: float32 only); in bf16 W + B A
    rounds a small B A away, so the rollouts would lag the policy."""
    tis_cap: float = 0.0
    """Truncated importance sampling: weight each rollout token's policy-gradient term by
    min(pi_trainer(y_t) / pi_sampler(y_t), tis_cap), correcting for a sampler that is not the training
    forward (the fused decode step in bf16, vLLM with merged bf16 weights). 0 = off (paper presets:
    off; the paper trains on-policy). Typical when on: 2. The gap itself is logged every step
    (sampler/logprob_gap, sampler/logprob_abs_gap, sampler/logprob_max_abs_gap) whenever musk's own
    decoder draws the rollouts."""
    # --- recipes beyond the paper (train/recipes.py): off in every paper preset
    sft_warmup_steps: int = 0
    """Supervised warm-up: optimizer steps 1..K minimise the reference answer's NLL given the prompt with C
    (training split only) instead of GRPO's loss; GRPO runs steps K+1..total_training_steps. 0: off (the
    paper). At most total_training_steps."""
    sft_warmup_train: str = "context"
    """What the warm-up trains: context (g_phi and its gate; the LoRA frozen: LLaVA's projector-first
    stage) or context+lora. single and output-collab have no g_phi: they take context+lora only."""
    sft_mix_coef: float = 0.0
    """Mixed objective: GRPO's loss plus sft_mix_coef * max(0, 1 - (t - 1) / sft_mix_steps) times the
    answer NLL at GRPO step t (a supervised term that decays to 0; CHORD-style). 0: off (the paper)."""
    sft_mix_steps: int = 1
    """GRPO steps over which the mixed supervised term decays linearly to 0."""
    dtype: str = "auto"
    """Policy weights: auto (bf16 where fast), bfloat16, float32."""
    lm_head_fp32: bool = False
    """Compute the LM head (logits) in float32 from a float32 copy of its weight, in the sampler (musk's
    decoder) and in the trainer's log-probs alike (pipeline/generation.py lm_logits). Off: the head runs
    in the policy's dtype, so a bf16 policy's log-probs, and the KL, entropy and TIS weights built from
    them, carry bf16 rounding (docs/performance.md measures both). Needs rollout_engine musk."""
    device: str = "auto"
    """auto, cpu, cuda."""

    def validate(self) -> None:
        method_info(self.method)
        check_trackers(self.report_to)
        if self.lm_head_fp32 and self.rollout_engine != "musk":
            raise MuskError("lm_head_fp32 needs rollout_engine musk (vLLM computes its own logits)")
        if self.pooling not in VARIANTS:
            raise MuskError(f"unknown pooling {self.pooling!r}; choices: {list(VARIANTS)}")
        if self.answer_extraction not in MODES:
            raise MuskError(f"unknown answer_extraction {self.answer_extraction!r}; choices: {list(MODES)}")
        for key, choices in (("context_position", CONTEXT_POSITIONS), ("context_gate", CONTEXT_GATES),
                             ("feature_norm", FEATURE_NORMS), ("grad_clip_scope", CLIP_SCOPES),
                             ("context_anchor", CONTEXT_ANCHORS), ("rollout_engine", ENGINES),
                             ("decode_merged", DECODE_MERGED), ("hint_format", HINT_FORMATS),
                             ("hint_position", HINT_POSITIONS), ("hint_reference", HINT_REFERENCES),
                             ("loss_type", LOSS_TYPES), ("scale_rewards", ("auto",) + SCALE_REWARDS)):
            if getattr(self, key) not in choices:
                raise MuskError(f"unknown {key} {getattr(self, key)!r}; choices: {list(choices)}")
        if self.hint_reference == "zeros" and self.hint_position != "context":
            raise MuskError("hint_reference zeros needs hint_position context (the reference's zero tokens take "
                            "the hint block's slots); with hint_position user-turn use hint_reference reads")
        if self.context_rms <= 0:
            raise MuskError(f"context_rms must be positive, got {self.context_rms}")
        if self.tis_cap < 0:
            raise MuskError(f"tis_cap must be 0 (off) or positive, got {self.tis_cap}")
        if self.temperature <= 0:
            raise MuskError(f"temperature must be positive, got {self.temperature}")
        if not 0 < self.top_p <= 1 or self.top_k < 0 or not 0 <= self.min_p < 1:
            raise MuskError(f"sampling filters need 0 < top_p <= 1, top_k >= 0 and 0 <= min_p < 1; got top_p "
                            f"{self.top_p}, top_k {self.top_k}, min_p {self.min_p}")
        if self.clip_eps < 0 or (self.clip_eps_high is not None and self.clip_eps_high < 0):
            raise MuskError(f"clip_eps and clip_eps_high must be >= 0, got {self.clip_eps}, {self.clip_eps_high}")
        if self.curve_freq < 0 or self.router_warmup_steps < 0 or self.curve_prompts < 1:
            raise MuskError("curve_freq and router_warmup_steps must be >= 0, curve_prompts >= 1")
        for k in ("group_size", "train_batch_size", "val_batch_size", "gradient_accumulation_steps",
                  "total_training_steps", "max_new_tokens", "num_latents", "num_heads", "d_latent", "lora_rank",
                  "save_freq", "test_freq", "eval_batches", "log_freq", "num_iterations", "filter_groups_max_rounds",
                  "gate_warmup_steps"):
            if getattr(self, k) < 1:
                raise MuskError(f"{k} must be at least 1, got {getattr(self, k)}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise MuskError(f"min_new_tokens must be in [0, max_new_tokens], got {self.min_new_tokens}")
        if self.rollout_chunk < 0:
            raise MuskError("rollout_chunk must be 0 (all) or positive")
        if self.group_size < 2:
            raise MuskError("group_size must be at least 2 (GRPO normalises within a group)")
        self._validate_recipes()
        if self.filter_groups and self.num_iterations > 1 and self.method == "hard-routing":
            raise MuskError("filter_groups with num_iterations > 1 is not offered for hard-routing: passes 2.. redraw "
                            "the Gumbel routing per micro-batch, and a micro-batch of kept groups from several rounds "
                            "would not redraw the experts it sampled with")


    def _validate_recipes(self) -> None:
        """Refuse recipe settings that cannot mean what they say, by key and with the reason."""
        if self.sft_warmup_train not in SFT_TARGETS:
            raise MuskError(f"unknown sft_warmup_train {self.sft_warmup_train!r}; choices: {list(SFT_TARGETS)}")
        if self.sft_warmup_steps < 0 or self.sft_mix_coef < 0 or self.sft_mix_steps < 1:
            raise MuskError(f"sft_warmup_steps and sft_mix_coef must be >= 0 and sft_mix_steps >= 1, got "
                            f"{self.sft_warmup_steps}, {self.sft_mix_coef}, {self.sft_mix_steps}")
        if self.sft_warmup_steps > self.total_training_steps:
            raise MuskError(f"sft_warmup_steps {self.sft_warmup_steps} is more than the run's total_training_steps "
                            f"{self.total_training_steps}: the warm-up counts within the run's steps")
        if (self.sft_warmup_steps > 0 and self.sft_warmup_train == "context"
                and self.method not in ("perceiver", "ffn", "hard-routing", "prefix")):
            raise MuskError(f"sft_warmup_train context on method {self.method!r}: it has no g_phi, so a context-only "
                            "warm-up would train nothing; use sft_warmup_train context+lora (the LoRA) or no warm-up")
        if self.sft_mix_coef > 0 and self.loss_type == "dapo":
            raise MuskError("sft_mix_coef with loss_type dapo: dapo divides the step's summed gradient by its "
                            "completion tokens, which would rescale the supervised term too; use grpo, bnpo or dr_grpo")


SFT_TARGETS = ("context", "context+lora")

# Embedded default: SmolLM2-135M-Instruct policy, short budget, lenient answers (CPU in minutes).
EMBEDDED_DEFAULT = {
    "policy": "smollm2-135m-instruct",
    "group_size": 4,
    "train_batch_size": 2,
    "val_batch_size": 16,
    "gradient_accumulation_steps": 1,
    "total_training_steps": 20,
    "max_new_tokens": 48,
    "lr": 2e-4,
    "router_lr": 3e-3,
    "answer_extraction": "lenient",
    "d_latent": 128,
    "context_position": "after-question",
    "context_gate": "rms",
    "context_rms": 3.0,
    "gate_lr": 3e-3,
    "feature_norm": "standardize",
    "context_anchor": "mean-embedding",
    "grad_clip_scope": "per-group",
    "hint_format": "labelled",
    "hint_position": "user-turn",
    "hint_reference": "reads",
    "save_freq": 10,
    "test_freq": 10,
    "eval_batches": 4,
}


def advantage_scale(cfg: TrainConfig) -> str:
    """scale_rewards with auto resolved: none under dr_grpo (Dr. GRPO drops the std), group otherwise."""
    if cfg.scale_rewards != "auto":
        return cfg.scale_rewards
    return "none" if cfg.loss_type == "dr_grpo" else "group"


def load_train_config(path: str | None, overrides: dict | None = None) -> TrainConfig:
    data = load_yaml(path) if path else dict(EMBEDDED_DEFAULT)
    data = merge(data, overrides or {})
    return from_dict(TrainConfig, data, "train config")


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
    """Whether a run of `method` reads the config key (a dotted key by its first part)."""
    return method in METHOD_KEYS.get(key.split(".")[0], (method,))


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
    "lm_head_fp32": False,
}


def keys_missing_from_old_run(old: dict, new: dict, skip=()) -> tuple[dict, list[str]]:
    """Keys of `new` (a resolved run config) that an older run's `old` config lacks: (those that take
    their pre-existing default, {key: value}; those that cannot, sorted)."""
    missing = sorted(k for k in new if k not in old and k not in skip)
    ok = {k: new[k] for k in missing if k in DEFAULTS_BEFORE_KEY and DEFAULTS_BEFORE_KEY[k] == new[k]}
    return ok, [k for k in missing if k not in ok]
