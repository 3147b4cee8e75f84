"""musk's vLLM code paths (hints in `musk extract`, rollouts and weight sync in `musk train`) driven on
the CPU by a stub engine that answers vLLM's calls with plain transformers decoding. It checks musk's
side of the contract: what it sends (token ids, unpadded prompt embeddings, SamplingParams, merged
weights by Hugging Face name) and how it stores what comes back."""

from __future__ import annotations

import sys
import types
from types import SimpleNamespace

import h5py
import pytest
import torch

from pipeline.rewards import score
from tests.helpers import quiet_train, tiny_extract_config, tiny_train_overrides


class StubLLM:
    """vLLM's LLM as musk uses it, over a transformers folder, greedy or seeded sampling."""

    instances: list = []

    def __init__(self, model, dtype, gpu_memory_utilization, enable_prompt_embeds=False, seed=0):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.lm = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
        self.tok = AutoTokenizer.from_pretrained(model)
        self.loaded: list[tuple[str, torch.Tensor]] = []
        self.resets = 0
        runner = SimpleNamespace(model=SimpleNamespace(load_weights=self._load_weights))
        self.llm_engine = SimpleNamespace(model_executor=SimpleNamespace(driver_worker=SimpleNamespace(model_runner=runner)))
        StubLLM.instances.append(self)

    def _load_weights(self, items):
        self.loaded = list(items)
        state = self.lm.state_dict()
        for name, w in self.loaded:  # vLLM names are Hugging Face names: every one must exist here
            state[name].copy_(w)

    def reset_prefix_cache(self):
        self.resets += 1

    @torch.no_grad()
    def generate(self, prompts, sp, use_tqdm=False):
        from pipeline.generation import generate

        gen = torch.Generator().manual_seed(int(sp.seed or 0))
        outs = []
        for p in prompts:
            if "prompt_token_ids" in p:
                emb = self.lm.get_input_embeddings()(torch.tensor([p["prompt_token_ids"]]))
            else:
                emb = p["prompt_embeds"][None].float()
            mask = torch.ones(emb.shape[:2], dtype=torch.long)
            rows = []
            for _ in range(sp.n):
                torch.manual_seed(int(torch.randint(2**31 - 1, (), generator=gen)))
                toks, live = generate(self.lm, emb, mask, sp.max_tokens, eos=sp.stop_token_ids, pad_id=0,
                                      temperature=max(sp.temperature,
                                                      1e-6), greedy=sp.temperature == 0.0, top_k=sp.top_k,
                                      top_p=sp.top_p, min_p=sp.min_p)
                ids = toks[0][live[0].bool()].tolist()
                rows.append(SimpleNamespace(token_ids=ids, text=self.tok.decode(
                    [t for t in ids if t not in sp.stop_token_ids], skip_special_tokens=True)))
            outs.append(SimpleNamespace(outputs=rows))
        return outs


class StubSamplingParams:
    def __init__(self, n=1, temperature=1.0, max_tokens=16, stop_token_ids=(), seed=None, skip_special_tokens=True,
                 top_k=-1, top_p=1.0, min_p=0.0):
        self.n, self.temperature, self.max_tokens = n, temperature, max_tokens
        self.stop_token_ids, self.seed = list(stop_token_ids), seed
        self.top_k, self.top_p, self.min_p = max(top_k, 0), top_p, min_p


@pytest.fixture
def stub_vllm(monkeypatch):
    import pipeline.extract
    import train.setup

    fake = types.ModuleType("vllm")
    fake.LLM, fake.SamplingParams = StubLLM, StubSamplingParams
    monkeypatch.setitem(sys.modules, "vllm", fake)
    for mod in (pipeline.extract, train.setup):  # the GPU check: this CPU stands in for one
        monkeypatch.setattr(mod, "require_vllm", lambda what: None)
    StubLLM.instances = []
    return StubLLM


def _hints(path):
    with h5py.File(path, "r") as f:
        return list(f["experts/folder-llama/hint"].asstr()[()]), f["experts/folder-llama/hint_n_tokens"][()].tolist()


@pytest.mark.slow
def test_vllm_hints_equal_musk_hints(stub_vllm, tiny_policy, tmp_path):
    from pipeline.extract import load_extract_config, run_extract

    expert = [{"name": "folder-llama", "kind": "hf", "model": str(tiny_policy)}]
    quiet = dict(progress=False, log=lambda *a: None)
    ours = run_extract(load_extract_config(None, tiny_extract_config(tmp_path / "musk.h5", experts=expert,
                                                                      router=False)), **quiet)
    theirs = run_extract(load_extract_config(None, tiny_extract_config(tmp_path / "vllm.h5", experts=expert,
                                                                        router=False, hint_engine="vllm")), **quiet)
    assert len(stub_vllm.instances) == 1  # one engine for the expert's missing hint batches
    texts, counts = _hints(theirs)
    assert (texts, counts) == _hints(ours)
    assert any(t for t in texts) and max(counts) > 0  # not vacuous: something was decoded


@pytest.mark.slow
def test_vllm_rollouts_and_weight_sync(stub_vllm, tiny_cache, tiny_policy, tmp_path):
    import json

    from train.config import load_train_config
    from train.loop import run_train

    cfg = load_train_config(None, tiny_train_overrides(tiny_policy, method="perceiver", total_training_steps=2,
                                                       rollout_engine="vllm"))
    out = tmp_path / "run"
    run_train(cfg, cache_path=tiny_cache, out=out, resume=False, **quiet_train(score))
    llm = stub_vllm.instances[-1]
    names = {n for n, _ in llm.loaded}
    base = set(llm.lm.state_dict())
    assert names and names <= base and any("q_proj" in n for n in names)
    assert not any("lora" in n for n in names)  # merged W + BA, in the base model's naming
    assert llm.resets == 3  # the initial sync and one after each of the two optimizer steps
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps] == [1, 2] and all(r["completion_tokens"] > 0 for r in steps)
