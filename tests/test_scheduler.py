"""The scheduler (serving/scheduler.py) without a server: sequences stepped together, scores,
greedy generation within max_batch, the vectorised sampler, a failing graph, Generate messages
timed on the scheduler thread, and the steady state's reuse of the last step's outputs."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from step_models import StatefulModel

from serving.sampling import Sampler
from serving.scheduler import GenerateSequence, Scheduler, ScoreSequence


class FakeModel:
    """A stand-in step graph: logits favour (input + 1) mod V; the state counts steps."""

    def __init__(self, V=5, fail_on=None):
        self.V, self.calls, self.fail_on = V, [], fail_on

    def step(self, inputs, states):
        self.calls.append(len(inputs))
        if self.fail_on is not None and (inputs == self.fail_on).any():
            raise RuntimeError("graph failed")
        logits = np.full((len(inputs), self.V), -5.0)
        logits[np.arange(len(inputs)), (inputs.astype(int) + 1) % self.V] = 5.0
        return logits, states + 1


def run_scheduler(model, make_seqs, max_batch=8, max_wait=0.0):
    async def main():
        loop = asyncio.get_running_loop()
        sched = Scheduler(
            model.step, max_batch=max_batch, max_wait=max_wait, post=loop.call_soon_threadsafe
        )
        seqs, waits = make_seqs(loop)
        for s in seqs:
            sched.add(s)
        await asyncio.gather(*waits)
        await loop.run_in_executor(None, sched.stop)
        return seqs

    return asyncio.run(main())


def test_scheduler_steps_ready_sequences_together_and_scores():
    model = FakeModel()

    def make(loop):
        futs = [loop.create_future() for _ in range(3)]
        seqs = [
            ScoreSequence(
                np.zeros((2, 2), np.float32),
                None,
                0,
                np.array([1, 2, 3, 4]),
                [],
                lambda s, f=f: f.done() or f.set_result(s),
            )
            for f in futs
        ]
        return seqs, futs

    seqs = run_scheduler(model, make)
    assert model.calls == [3] * 5  # start + 4 characters, the three sequences in every step
    for s in seqs:
        # each character followed its predecessor, so each scored about 0 bits
        assert s.bits.shape == (4,) and (s.bits < 1e-3).all()
        assert (s.pos[0] == 5).all()  # five steps in the state


def test_scheduler_generates_greedily_and_respects_max_batch():
    model = FakeModel(V=5)
    texts = ["a", "b", "c", "d", "e"]

    def make(loop):
        outs = [[] for _ in range(5)]
        done = [loop.create_future() for _ in range(5)]

        def emitter(i):
            def emit(text, bits, finish, made):
                if text is None:
                    done[i].set_result(outs[i])
                else:
                    outs[i].append((text, finish))

            return emit

        seqs = [
            GenerateSequence(
                np.zeros((1, 1), np.float32),
                None,
                [i],
                Sampler(0.0),
                4,
                [],
                False,
                texts,
                None,
                emitter(i),
            )
            for i in range(5)
        ]
        return seqs, done

    seqs = run_scheduler(model, make, max_batch=2)
    assert max(model.calls) <= 2
    for s in seqs:
        assert s.finished and s.finish_reason == "LENGTH"
        assert (s.pos[0] == 5).all()  # the prompt id and the four generated ones


def test_sampler_draws_match_the_vectorised_path():
    """One seeded request gives the same ids whether it is sampled alone (Sampler) or as a row
    of a batch (draw, greedy), rows that are not finite included."""
    from serving.sampling import draw, greedy

    rng = np.random.default_rng(0)
    logits = (rng.normal(size=(300, 7)) * 3).astype(np.float32)
    logits[5, 2] = np.nan
    logits[6, 3] = np.inf
    logits[7, [0, 1, 3, 4, 5, 6]] = -np.inf  # every id but the banned one impossible
    for temperature in (0.05, 0.8, 2.0):
        one = Sampler(temperature, seed=3, banned=(2,))
        with np.errstate(invalid="ignore"):
            alone = [one(row) for row in logits]
            u = np.random.default_rng(3).random(len(logits))
            batched = draw(logits, np.full(len(logits), temperature), u, (2,))
        assert alone == batched.tolist()
    alone = [Sampler(0.0, banned=(2,))(row) for row in logits]
    assert alone == greedy(logits, (2,)).tolist()


def test_scheduler_reports_a_failing_graph_to_its_calls_only():
    model = FakeModel(V=10, fail_on=9)

    def make(loop):
        futs = [loop.create_future() for _ in range(2)]
        seqs = [
            ScoreSequence(
                np.zeros((1, 1), np.float32),
                np.zeros(10),
                0,
                np.array(ids),
                [],
                lambda s, f=f: f.done() or f.set_result(s),
            )
            for ids, f in zip(([9], [1, 2]), futs, strict=True)
        ]
        return seqs, futs

    bad, good = run_scheduler(model, make, max_batch=1)
    assert isinstance(bad.error, RuntimeError) and good.error is None and good.finished


def test_generate_messages_are_timed_on_the_scheduler_thread():
    """The first character goes at once, later ones wait for the interval and go together, the
    last goes at once, and a cancelled stream's remainder goes with CANCELLED. Each message
    carries the symbols generated up to its end."""
    texts = ["a", "b", "c", "d"]
    sent = []

    def make(max_chars):
        sent.clear()  # a session's continuation: no prompt, its logits predict the first character
        return GenerateSequence(
            np.zeros((1, 1), np.float32),
            np.zeros(4, np.float32),
            [],
            Sampler(0.0),
            max_chars,
            [],
            False,
            texts,
            None,
            lambda *m: sent.append(m),
            interval=0.05,
        )

    def sample(seq, token, now):  # one step: sample, feed (the state counts the symbols fed)
        post = []
        seq.take_sample(token, None, post, now)
        seq.take_input()
        seq.advance(np.zeros(4, np.float32), seq.pos[0] + 1, post)
        for callback in post:
            callback()

    seq = make(6)
    for token, now in [(0, 10.0), (1, 10.01), (2, 10.04), (3, 10.05), (0, 10.07), (1, 10.08)]:
        sample(seq, token, now)
    assert sent == [("a", [], "", 1), ("bcd", [], "", 4), ("ab", [], "LENGTH", 6)]

    seq = make(100)
    for token, now in [(0, 0.0), (1, 0.01), (2, 0.02)]:
        sample(seq, token, now)
    seq.cancelled = True
    post = []
    seq.close(post)
    for callback in post:
        callback()
    assert sent == [("a", [], "", 1), ("bc", [], "CANCELLED", 3), (None, None, None, None)]
    # message boundaries (symbols made, the state then): the start, after "a", all it made
    assert [(made, m[0][0, 0]) for made, m in seq.marks.items()] == [(0, 0), (1, 1), (3, 3)]

    seq = make(100)  # a failed step: the characters not sent yet are dropped, then the error
    for token, now in [(0, 0.0), (1, 0.01)]:
        sample(seq, token, now)
    seq.error, seq.finished = RuntimeError("graph failed"), True
    post = []
    seq.close(post)
    for callback in post:
        callback()
    assert sent == [("a", [], "", 1), (None, None, None, None)]


@pytest.mark.parametrize("max_batch", [1, 2, 8])
def test_steady_batches_reuse_the_last_outputs_without_mixing_rows(max_batch):
    """Sequences stepped together in the same order (the steady state, which feeds the last
    step's outputs back as they are), in rotating batches (gathered each step) and one at a
    time give each sequence the same text and final state."""
    texts = list("uvwxyz")

    def run(batch_size, which):
        model = StatefulModel()

        def make(loop):
            outs = {i: [] for i in which}
            done = {i: loop.create_future() for i in which}

            def emitter(i):
                def emit(text, bits, finish, made):
                    if text is None:
                        done[i].set_result(None)
                    else:
                        outs[i].append(text)

                return emit

            seqs = [
                GenerateSequence(
                    np.zeros((1, StatefulModel.V), np.float32),
                    None,
                    [i],
                    Sampler(1.0, seed=i),
                    40,
                    [],
                    False,
                    texts,
                    None,
                    emitter(i),
                )
                for i in which
            ]
            for s, i in zip(seqs, which, strict=True):
                s.out = outs[i]
            return seqs, list(done.values())

        seqs = run_scheduler(model, make, max_batch=batch_size)
        return {
            i: ("".join(s.out), s.pos[0].copy()) for i, s in zip(which, seqs, strict=True)
        }, model.calls

    together, calls = run(max_batch, range(5))
    assert max(calls) == min(max_batch, 5)
    for i in range(5):
        alone, _ = run(1, [i])
        assert together[i][0] == alone[i][0] and len(alone[i][0]) == 40
        np.testing.assert_array_equal(together[i][1], alone[i][1])
