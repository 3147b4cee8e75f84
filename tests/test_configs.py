"""Presets load and say what the paper says; the embedded default file matches the code."""

from pathlib import Path

import pytest
import yaml

from pipeline.extract import EMBEDDED_DEFAULT, load_extract_config
from train.config import EMBEDDED_DEFAULT as TRAIN_DEFAULT
from train.config import flat_dict, load_train_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


PAPER_EXTRACT = sorted(p for p in (CONFIGS / "extract").glob("*-*.yaml") if not p.stem.startswith("probe"))


@pytest.mark.parametrize("path", PAPER_EXTRACT, ids=lambda p: p.stem)
def test_extract_presets_load(path):
    cfg = load_extract_config(str(path))
    family, team = path.stem.split("-", 1)
    assert cfg.task.family == family
    assert {"default": 3, "generalist": 4, "naive": 4, "llm": 3}[team] == len(cfg.experts)
    assert cfg.hint_max_new_tokens == 128
    assert "qwen2.5-math-1.5b-instruct" in [e.name for e in cfg.experts]  # in every paper team
    assert ("gpt2" in [e.name for e in cfg.experts]) == (team == "naive")
    if family != "gsm8k":
        assert (cfg.task.train_size, cfg.task.val_size, cfg.task.train_seed, cfg.task.val_seed) == (16000, 4000, 1, 2)


def test_paper_train_preset_matches_listing1():
    cfg = load_train_config(str(CONFIGS / "train" / "paper.yaml"))
    assert cfg.policy.name == "Qwen/Qwen2.5-3B-Instruct" and cfg.policy.lora_rank == 8 and cfg.grpo.group_size == 8
    assert cfg.grpo.beta == 0.04 and cfg.optim.lr == 1e-4 and cfg.optim.router_lr == 1e-4 and cfg.optim.epsilon == 1e-6
    assert cfg.optim.train_batch_size * cfg.optim.gradient_accumulation_steps == 32 and cfg.optim.total_training_steps == 500
    assert cfg.sampling.answer_extraction == "strict" and cfg.sampling.max_new_tokens == 128 and cfg.context.num_latents == 8
    assert load_train_config(str(CONFIGS / "train" / "paper-gsm8k.yaml")).optim.total_training_steps == 233


def test_paper_h100_preset_is_paper_yaml_in_one_micro_batch():
    """paper-h100.yaml changes how a step is batched, nothing it means: the same 32 prompts a step,
    the same validation prompts (the 4000 of the split), every other key equal to paper.yaml's."""
    paper = flat_dict(load_train_config(str(CONFIGS / "train" / "paper.yaml")))
    h100 = flat_dict(load_train_config(str(CONFIGS / "train" / "paper-h100.yaml")))
    batching = {"train_batch_size", "gradient_accumulation_steps", "rollout_chunk", "val_batch_size", "eval_batches"}
    assert {k for k in paper if paper[k] != h100[k]} == batching
    assert h100["train_batch_size"] == 32 and h100["gradient_accumulation_steps"] == 1
    assert h100["rollout_chunk"] % h100["group_size"] == 0  # chunks hold whole groups
    val_size = 4000
    assert min(val_size, h100["eval_batches"] * h100["val_batch_size"]) == min(
        val_size, paper["eval_batches"] * paper["val_batch_size"]) == val_size


def test_embedded_default_files_match_code():
    assert yaml.safe_load((CONFIGS / "embedded-default.yaml").read_text()) == EMBEDDED_DEFAULT
    assert yaml.safe_load((CONFIGS / "train" / "embedded-default.yaml").read_text()) == TRAIN_DEFAULT
    assert load_extract_config(None) == load_extract_config(str(CONFIGS / "embedded-default.yaml"))


def test_probe_presets():
    """The probe team: oracle, noise and one real embedded LM, on a task the policy alone mostly fails;
    the train preset reads it offline with the embedded policy."""
    cfg = load_extract_config(str(CONFIGS / "extract" / "probe.yaml"))
    assert [e.kind for e in cfg.experts] == ["probe-oracle", "probe-noise", "gguf-package"]
    assert cfg.experts[0].model == cfg.experts[1].model == "smollm2-135m-instruct"
    assert cfg.task.family == "easy-arithmetic" and cfg.task.developer_prompt == "direct"
    train = load_train_config(str(CONFIGS / "train" / "probe.yaml"))
    assert train.policy.name == "smollm2-135m-instruct" and train.optim.total_training_steps >= 100
    assert train.sampling.answer_extraction == "lenient"


def test_label_probe_presets():
    """The probe only C can answer: secret-label with k = 4 options, one-slot oracle, no hints; its
    train preset is the old probe's but for the answer budget, with no recipe."""
    cfg = load_extract_config(str(CONFIGS / "extract" / "probe-label.yaml"))
    assert cfg.task.family == "secret-label" and cfg.task.labels == 4 and not cfg.hints
    assert [e.kind for e in cfg.experts] == ["probe-oracle", "probe-noise", "gguf-package"]
    label = flat_dict(load_train_config(str(CONFIGS / "train" / "probe-label.yaml")))
    old = flat_dict(load_train_config(str(CONFIGS / "train" / "probe.yaml")))
    assert {k for k in label if label[k] != old[k]} == {"max_new_tokens", "total_training_steps", "curve_freq", "curve_prompts"}
    assert label["sft_warmup_steps"] == 0 and label["sft_mix_coef"] == 0.0


def test_every_train_preset_is_recipe_free():
    """Recipes are beyond the paper: off in every shipped train preset."""
    for path in sorted((CONFIGS / "train").glob("*.yaml")):
        cfg = load_train_config(str(path))
        assert (cfg.recipe.sft_warmup_steps, cfg.recipe.sft_mix_coef) == (0, 0.0), path.name


def test_paper_presets_keep_the_literal_recipe():
    """The paper presets keep Eq. 11 as printed, C right before the answer, no warmup, no feature
    normalisation: the paper's literal recipe stays one named setting, comparable with musk's."""
    for name in ("paper.yaml", "paper-gsm8k.yaml", "paper-h100.yaml"):
        cfg = load_train_config(str(CONFIGS / "train" / name))
        assert (cfg.context.context_position, cfg.context.context_gate, cfg.context.feature_norm, cfg.optim.router_warmup_steps,
                cfg.optim.grad_clip_scope) == ("suffix", "none", "none", 0, "global")
        assert cfg.context.init_std == 1e-4


@pytest.mark.parametrize("path", sorted((CONFIGS / "train").glob("*.yaml")), ids=lambda p: p.stem)
def test_train_presets_keep_the_original_grpo_estimator(path):
    """Every train preset (and the embedded default) keeps the GRPO it was measured with: per-completion
    token mean, group-std advantages, one pass per batch, symmetric clip, every completion in the loss,
    plain temperature sampling."""
    from train.config import advantage_scale

    cfg = load_train_config(str(path))
    assert (cfg.grpo.loss_type, advantage_scale(cfg), cfg.grpo.num_iterations, cfg.grpo.clip_eps, cfg.grpo.clip_eps_high,
            cfg.grpo.mask_truncated_completions) == ("grpo", "group", 1, 0.2, None, False)
    assert (cfg.sampling.top_p, cfg.sampling.top_k, cfg.sampling.min_p) == (1.0, 0, 0.0)


def test_scale_rewards_auto_follows_loss_type():
    from train.config import advantage_scale

    assert advantage_scale(load_train_config(None, {"loss_type": "dr_grpo"})) == "none"
    assert advantage_scale(load_train_config(None, {"loss_type": "dapo"})) == "group"
    assert advantage_scale(load_train_config(None, {"loss_type": "dr_grpo", "scale_rewards": "group"})) == "group"


@pytest.mark.parametrize("bad,message", [
    ({"loss_type": "ppo"}, "unknown loss_type 'ppo'; choices: ['grpo', 'dr_grpo', 'dapo', 'bnpo']"),
    ({"scale_rewards": "std"}, "unknown scale_rewards 'std'; choices: ['auto', 'group', 'batch', 'none']"),
    ({"num_iterations": 0}, "grpo.num_iterations must be at least 1"),
    ({"top_p": 0.0}, "sampling.top_p must be more than 0, got 0.0"),
    ({"top_k": -1}, "sampling.top_k must be at least 0 (0: off), got -1"),
    ({"min_p": 1.0}, "sampling.min_p must be less than 1, got 1.0"),
    ({"clip_eps_high": -0.1}, "grpo.clip_eps_high must be at least 0, got -0.1"),
])
def test_grpo_settings_are_checked(bad, message):
    from core.errors import MuskError

    with pytest.raises(MuskError) as e:
        load_train_config(None, bad)
    assert message in str(e.value)
