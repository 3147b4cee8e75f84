"""`musk` for tests run under torchrun: the CLI with the parity reward (random policies never answer
right, and a reward without variance would make every gradient zero)."""

import train.loop
from tests.helpers import parity_score

train.loop.score = parity_score

if __name__ == "__main__":
    from cli import main

    main()
