"""Serving building blocks without a server: the session store, sampling and the batcher."""

from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest

from serving.batcher import Batcher
from serving.sampling import Sampler, bits, check_sampling
from serving.sessions import SessionBusy, SessionNotFound, SessionStore, TooManySessions


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_session_ids_are_unguessable_and_states_are_copies():
    store = SessionStore(max_sessions=10)
    state = np.zeros((3, 4), np.float32)
    a, b = store.create("m", state), store.create("m", state)
    assert a.session_id != b.session_id and len(a.session_id) >= 22  # 128 bits in base64
    a.state[0, 0] = 1.0
    assert state[0, 0] == 0.0 and b.state[0, 0] == 0.0


def test_busy_session_is_refused_until_released():
    store = SessionStore()
    s = store.create("m", np.zeros((1, 1), np.float32))
    held = store.acquire(s.session_id)
    with pytest.raises(SessionBusy, match="in use by another call"):
        store.acquire(s.session_id)
    store.release(held)
    store.release(store.acquire(s.session_id))


def test_idle_expiry_and_bound():
    clock = Clock()
    store = SessionStore(max_sessions=2, idle_timeout=10, clock=clock)
    a = store.create("m", np.zeros((1, 1), np.float32))
    store.create("m", np.zeros((1, 1), np.float32))
    with pytest.raises(TooManySessions, match="maximum of 2 sessions"):
        store.create("m", np.zeros((1, 1), np.float32))
    clock.t = 5
    store.release(store.acquire(a.session_id))  # use refreshes the idle clock
    clock.t = 12
    assert store.expire() == 1 and len(store) == 1 and store.evicted == 1
    clock.t = 16
    with pytest.raises(SessionNotFound, match="expired after 10 s idle"):
        store.acquire(a.session_id)
    store.create("m", np.zeros((1, 1), np.float32))  # room again
    with pytest.raises(SessionNotFound):
        store.delete("nope")


def test_sampling_parameters_are_checked():
    for args, msg in [((-1, 0, 0), "temperature"), ((math.nan, 0, 0), "temperature"),
                      ((math.inf, 0, 0), "temperature"), ((1, -1, 0), "top_k"),
                      ((1, 0, 1.5), "top_p"), ((1, 0, math.nan), "top_p")]:
        with pytest.raises(ValueError, match=msg):
            check_sampling(*args)


def test_greedy_top_k_top_p_and_seeds():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    assert Sampler(0.0)(logits) == 0
    assert {Sampler(1.0, top_k=2, seed=s)(logits) for s in range(200)} == {0, 1}
    # top_p 0.7: the smallest set reaching 0.7 is {0, 1}
    assert {Sampler(1.0, top_p=0.7, seed=s)(logits) for s in range(200)} == {0, 1}
    assert {Sampler(1.0, top_p=0.5, seed=s)(logits) for s in range(50)} == {0}
    s1, s2, s3 = Sampler(1.0, seed=7), Sampler(1.0, seed=7), Sampler(1.0, seed=8)
    seq = [s1(logits) for _ in range(30)]
    assert seq == [s2(logits) for _ in range(30)]
    assert seq != [s3(logits) for _ in range(30)]
    assert Sampler(0.0, banned=(0,))(logits) == 1  # banned ids are never emitted


def test_bits():
    logits = np.log(np.array([[0.5, 0.25, 0.25]]))
    assert bits(logits, np.array([0]))[0] == pytest.approx(1.0)
    assert bits(logits, np.array([1]))[0] == pytest.approx(2.0)


def test_batcher_advances_concurrent_callers_together():
    calls = []

    def step(inputs, states):
        calls.append(len(inputs))
        return inputs[:, None] * np.ones((len(inputs), 3)), states + 1

    async def main():
        b = Batcher(step, max_batch=8, max_wait=0.05)
        b.start()
        results = await asyncio.gather(*[b.step(np.float32(i), np.zeros((2, 2), np.float32)) for i in range(5)])
        await b.close()
        return results

    results = asyncio.run(main())
    assert calls == [5]  # one batched call for all five
    for i, (logits, state) in enumerate(results):
        assert logits.tolist() == [i, i, i] and (state == 1).all()


def test_batcher_respects_max_batch_and_reports_errors():
    sizes = []

    def step(inputs, states):
        sizes.append(len(inputs))
        if (inputs < 0).any():
            raise RuntimeError("graph failed")
        return np.zeros((len(inputs), 2)), states

    async def main():
        b = Batcher(step, max_batch=3, max_wait=0.01)
        b.start()
        await asyncio.gather(*[b.step(np.float32(i), np.zeros((1, 1), np.float32)) for i in range(7)])
        with pytest.raises(RuntimeError, match="graph failed"):
            await b.step(np.float32(-1), np.zeros((1, 1), np.float32))
        await b.close()

    asyncio.run(main())
    assert sizes[:3] == [3, 3, 1] and max(sizes) <= 3
