"""`musk` for tests run under torchrun: the CLI with the parity reward (random policies never answer
right, and a reward without variance would make every gradient zero). MUSK_TEST_LENGTHS=1 also ends
each rollout at a position set by its first token (a random tiny policy almost never samples EOS), so
completion lengths vary the same way in every process layout."""

import os

import torch

import train.policy
from tests.helpers import parity_score

if os.environ.get("MUSK_TEST_LENGTHS") == "1":
    from pipeline.generation import Decoded

    _sample = train.policy.sample  # the decoder behind Policy.sample (rollouts and evaluations)

    def _varied(lm, embeds, mask, max_new_tokens, **k):
        d = _sample(lm, embeds, mask, max_new_tokens, **k)
        if k.get("greedy"):  # the evaluations decode as they would
            return d
        eos, pad_id = k["eos"], k["pad_id"]
        tokens, lp = d.tokens, d.logprobs
        T = tokens.shape[1]
        end, pos = (tokens[:, 0] % (T + 1))[:, None], torch.arange(T)[None]  # end T: the whole budget, no EOS
        live = (pos <= end).long()
        tokens = torch.where(pos == end, eos[0], torch.where(live.bool(), tokens, pad_id))
        return Decoded(tokens, live, None if lp is None else lp * live)

    train.policy.sample = _varied

if __name__ == "__main__":
    from cli import main

    main(scorer=parity_score)
