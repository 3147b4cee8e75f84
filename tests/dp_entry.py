"""`musk` for tests run under torchrun: the CLI with the parity reward (random policies never answer
right, and a reward without variance would make every gradient zero). MUSK_TEST_LENGTHS=1 also ends
each rollout at a position set by its first token (a random tiny policy almost never samples EOS), so
completion lengths vary the same way in every process layout."""

import os

import torch

import train.loop
from tests.helpers import parity_score

if os.environ.get("MUSK_TEST_LENGTHS") == "1":
    from pipeline.generation import Decoded

    _sample = train.loop.sample  # the rollouts' decoder (greedy evaluations go through evaluate.records)

    def _varied(lm, embeds, mask, max_new_tokens, eos, pad_id, *a, **k):
        d = _sample(lm, embeds, mask, max_new_tokens, eos, pad_id, *a, **k)
        tokens, lp = d.tokens, d.logprobs
        T = tokens.shape[1]
        end, pos = (tokens[:, 0] % (T + 1))[:, None], torch.arange(T)[None]  # end T: the whole budget, no EOS
        live = (pos <= end).long()
        tokens = torch.where(pos == end, eos[0], torch.where(live.bool(), tokens, pad_id))
        return Decoded(tokens, live, None if lp is None else lp * live)

    train.loop.sample = _varied

if __name__ == "__main__":
    from cli import main

    main(scorer=parity_score)
