"""Stand-in step graphs the scheduler tests share (tests/test_scheduler.py,
tests/test_scheduler_streams.py)."""

from __future__ import annotations

import numpy as np


class StatefulModel:
    """A step graph whose logits depend on each row's whole history (its state), so a state or
    logits row handed to the wrong sequence changes the text."""

    V = 6

    def __init__(self):
        self.calls = []

    def step(self, inputs, states):
        self.calls.append(len(inputs))
        new = 0.6 * states
        new[np.arange(len(inputs)), 0, inputs.astype(int) % self.V] += 1.0
        return 2.0 * new[:, 0, ::-1] + new[:, 0, :], new
