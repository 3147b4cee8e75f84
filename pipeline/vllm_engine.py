"""vLLM for generation on GPUs: an optional engine (`pip install -e '.[vllm]'`), never needed on the CPU
path or in CI. musk's own decoder (pipeline/generation.py) stays the reference; this module gives the
same outputs through vLLM's batched, paged decoding:

- hints in `musk extract` (hint_engine: vllm): token ids in, greedy text out;
- GRPO rollouts in `musk train` (rollout_engine: vllm): the policy's prompt with C spliced in, sent as
  prompt embeddings, G samples per prompt; after every optimizer step the LoRA is merged into the
  weights vLLM holds (W + B A, computed out of place, so the trained model is never merged and
  unmerged in low precision), as TRL's colocate mode does, rather than vLLM's LoRA mode (open crash with
  prompt embeddings on Llama models).

vLLM runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0) so that its model object, whose
`load_weights` takes (name, tensor) pairs in Hugging Face naming, is reachable for the weight sync.
"""

from __future__ import annotations

import gc
import os
from pathlib import Path

import torch

from core.errors import MuskError

ENGINES = ("musk", "vllm")


def require_vllm(what: str) -> None:
    """Stop before any work when vLLM or a GPU is missing, saying what to install."""
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise MuskError(f"{what}: vllm is not installed; install the extra with pip install -e '.[vllm]' "
                        "(GPU only), or use the default engine musk") from None
    if not torch.cuda.is_available():
        raise MuskError(f"{what}: vllm needs a CUDA GPU; on the CPU use the default engine musk")


def make_llm(folder: Path | str, dtype: torch.dtype, memory: float, prompt_embeds: bool = False, seed: int = 0):
    """A vLLM engine in this process over a transformers folder."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM

    return LLM(model=str(folder), dtype=str(dtype).replace("torch.", ""), gpu_memory_utilization=memory,
               enable_prompt_embeds=prompt_embeds, seed=seed)


def release(llm) -> None:
    """Free the engine's GPU memory before the next model is loaded."""
    del llm
    gc.collect()
    torch.cuda.empty_cache()


def greedy_texts(llm, ids: list[list[int]], max_new_tokens: int, eos: list[int]) -> tuple[list[str], list[int]]:
    """Greedy hints from token ids: (texts without the EOS, generated token counts incl. the EOS)."""
    from vllm import SamplingParams

    sp = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, stop_token_ids=list(eos),
                        skip_special_tokens=True)
    outs = llm.generate([{"prompt_token_ids": x} for x in ids], sp, use_tqdm=False)
    return [o.outputs[0].text for o in outs], [len(o.outputs[0].token_ids) for o in outs]


def sample_from_embeds(llm, embeds: torch.Tensor, mask: torch.Tensor, n: int, *, max_new_tokens: int,
                       eos: list[int], pad_id: int, temperature: float, greedy: bool, seed: int,
                       top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0):
    """Decode from left-padded prompt embeddings [B, P, d] (mask [B, P]), n completions per prompt, in
    the layout of pipeline.generation.generate: (tokens [B*n, T], live [B*n, T]), rows of one prompt
    contiguous, live 1 through the first EOS (inclusive), pad_id after. top_k, top_p, min_p: vLLM's
    sampling filters, off by default (top_k 0 is passed as vLLM's -1, "all tokens")."""
    from vllm import SamplingParams

    sp = SamplingParams(n=n, temperature=0.0 if greedy else temperature, max_tokens=max_new_tokens,
                        stop_token_ids=list(eos), seed=seed, top_k=top_k if top_k > 0 else -1, top_p=top_p,
                        min_p=min_p)
    prompts = [{"prompt_embeds": e[m.bool()].detach()} for e, m in zip(embeds, mask)]  # drop the padding
    outs = llm.generate(prompts, sp, use_tqdm=False)
    rows = [list(c.token_ids) for o in outs for c in o.outputs]  # [B*n] lists
    T = max(1, max(len(r) for r in rows))
    tokens = torch.full((len(rows), T), pad_id, dtype=torch.long)
    live = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        live[i, :len(r)] = 1
    return tokens.to(embeds.device), live.to(embeds.device)


def sync_weights(llm, items: list[tuple[str, torch.Tensor]]) -> None:
    """Load (name, tensor) pairs into the weights vLLM holds and drop its prefix cache."""
    model = llm.llm_engine.model_executor.driver_worker.model_runner.model
    with torch.no_grad():
        model.load_weights(items)
    llm.reset_prefix_cache()
