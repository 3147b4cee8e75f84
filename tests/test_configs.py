"""Presets load and say what the paper says; the embedded default file matches the code."""

from pathlib import Path

import pytest
import yaml

from pipeline.extract import EMBEDDED_DEFAULT, load_extract_config
from train.config import EMBEDDED_DEFAULT as TRAIN_DEFAULT
from train.config import load_train_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("path", sorted((CONFIGS / "extract").glob("*.yaml")), ids=lambda p: p.stem)
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
    assert cfg.policy == "Qwen/Qwen2.5-3B-Instruct" and cfg.lora_rank == 8 and cfg.group_size == 8
    assert cfg.beta == 0.04 and cfg.lr == 1e-4 and cfg.router_lr == 1e-4 and cfg.epsilon == 1e-6
    assert cfg.train_batch_size * cfg.gradient_accumulation_steps == 32 and cfg.total_training_steps == 500
    assert cfg.answer_extraction == "strict" and cfg.max_new_tokens == 128 and cfg.num_latents == 8
    assert load_train_config(str(CONFIGS / "train" / "paper-gsm8k.yaml")).total_training_steps == 233


def test_embedded_default_files_match_code():
    assert yaml.safe_load((CONFIGS / "embedded-default.yaml").read_text()) == EMBEDDED_DEFAULT
    assert yaml.safe_load((CONFIGS / "train" / "embedded-default.yaml").read_text()) == TRAIN_DEFAULT
    assert load_extract_config(None) == load_extract_config(str(CONFIGS / "embedded-default.yaml"))
