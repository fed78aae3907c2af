"""Serving building blocks without a server: the session store, sampling and the batcher."""

from __future__ import annotations

import asyncio
import math
import time

import numpy as np
import pytest

from serving.sampling import Sampler, bits, check_sampling
from serving.scheduler import GenerateSequence, Scheduler, ScoreSequence
from serving.sessions import (
    SessionBusy,
    SessionNotFound,
    SessionStore,
    TooManySessions,
    new_session_id,
)
from serving.store import valid_id


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


def test_session_ids_never_start_with_a_dash():
    # one base64url id in 64 would start with "-", which a command line reads as an option
    # (`nlstm score --session -x...` failed with "expected one argument"): 5,000 draws of the
    # old ids held about 78 such
    ids = [new_session_id() for _ in range(5000)]
    assert not [i for i in ids if i.startswith("-")]
    assert all(len(i) == 22 and valid_id(i) for i in ids) and len(set(ids)) == len(ids)
    assert any("-" in i for i in ids)  # still the whole base64url alphabet after the first


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
    for args, msg in [
        ((-1, 0, 0), "temperature"),
        ((math.nan, 0, 0), "temperature"),
        ((math.inf, 0, 0), "temperature"),
        ((1, -1, 0), "top_k"),
        ((1, 0, 1.5), "top_p"),
        ((1, 0, math.nan), "top_p"),
    ]:
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


def _generate_all(specs, *, max_batch=8, eos_id=None, cancel_after=None, interval=0.0):
    """Run GenerateSequences made from `specs` (sampler, max_chars, stop, logprobs) through a
    Scheduler over StatefulModel (interval 0: one message per character). Returns each
    sequence's messages, final state and finish reason. cancel_after: cancel every stream once
    the scheduler has run that many steps (as the engine does: flag it, poke the scheduler)."""
    texts = list("uvwxy") + [""]  # id 5 is a marker: its text is empty

    async def main():
        loop = asyncio.get_running_loop()
        sched = Scheduler(
            StatefulModel().step, max_batch=max_batch, max_wait=0.0, post=loop.call_soon_threadsafe
        )
        outs = [[] for _ in specs]
        done = [loop.create_future() for _ in specs]
        seqs = []

        def emitter(i):
            def emit(text, bits, finish, made):
                if text is None:
                    done[i].set_result(None)
                    return
                outs[i].append((text, list(bits), finish))

            return emit

        async def cancel():
            while sched.steps_run < cancel_after:
                await asyncio.sleep(0.001)
            for s in seqs:
                s.cancelled = True
            sched.poke()

        for i, (sampler, max_chars, stop, logprobs) in enumerate(specs):
            seqs.append(
                GenerateSequence(
                    np.zeros((1, StatefulModel.V), np.float32),
                    None,
                    [i % 5],
                    sampler,
                    max_chars,
                    stop,
                    logprobs,
                    texts,
                    eos_id,
                    emitter(i),
                    interval=interval,
                )
            )
        for s in seqs:
            sched.add(s)
        await asyncio.gather(*done, *([cancel()] if cancel_after is not None else []))
        await loop.run_in_executor(None, sched.stop)
        return [(out, s.pos[0].copy(), s.finish_reason) for out, s in zip(outs, seqs, strict=True)]

    return asyncio.run(main())


def _specs():
    return [
        (Sampler(1.0, seed=0), 40, [], True),
        (Sampler(0.7, seed=1), 25, ["vw"], False),
        (Sampler(0.0), 30, [], True),  # greedy
        (Sampler(1.5, seed=3), 40, ["yy", "uu"], True),
        (Sampler(1.0, seed=4), 7, [], False),
    ]


@pytest.mark.parametrize("eos_id", [None, 5])
@pytest.mark.parametrize("block", [3, 128])
def test_streams_blocks_give_the_step_by_step_text(monkeypatch, eos_id, block):
    """The columnar steady state (Streams) sends the same messages, bits and finish reasons and
    leaves the same states as sampling sequence by sequence, across block boundaries, streams
    ending by length, stop string and end marker, greedy and temperature rows together."""
    from serving import scheduler

    step_by_step = scheduler.Streams.fits
    monkeypatch.setattr(scheduler.Streams, "fits", staticmethod(lambda batch: False))
    reference = _generate_all(_specs(), eos_id=eos_id)
    monkeypatch.setattr(scheduler.Streams, "fits", step_by_step)
    monkeypatch.setattr(scheduler.Streams, "BLOCK", block)
    blocks = []
    init = scheduler.Streams.__init__

    def counting_init(self, *args):
        blocks.append(len(args[0]))
        init(self, *args)

    monkeypatch.setattr(scheduler.Streams, "__init__", counting_init)
    columnar = _generate_all(_specs(), eos_id=eos_id)
    assert blocks and max(blocks) == 5  # blocks ran, the first with every stream
    if block == 3:
        assert len(blocks) >= 10  # many blocks: draws taken ahead and given back at each end
    for (ref_out, ref_state, ref_reason), (out, state, reason) in zip(
        reference, columnar, strict=True
    ):
        assert out == ref_out and reason == ref_reason
        np.testing.assert_array_equal(state, ref_state)
    reasons = {r for _, _, r in reference}
    assert "LENGTH" in reasons and "STOP_SEQUENCE" in reasons


@pytest.mark.parametrize("interval", [0.0, 60.0])
def test_streams_cancelled_mid_block_keep_text_and_state_together(interval):
    """A stream cancelled while a block runs gets every character it made (the last message
    says CANCELLED, and carries all but the first when messages wait a minute) and its state
    is the state after exactly those characters."""
    texts = list("uvwxy")
    # id 5 (empty text) banned, so that the text spells every id fed
    results = _generate_all(
        [(Sampler(1.0, seed=i, banned=(5,)), 4000, [], False) for i in range(4)],
        cancel_after=50,
        interval=interval,
    )
    for i, (out, state, _) in enumerate(results):
        assert out[-1][2] == "CANCELLED" and all(r == "" for _, _, r in out[:-1])
        assert len(out) == 2 if interval else len(out) >= 49
        text = "".join(t for t, _, _ in out)
        assert 49 <= len(text) < 4000
        expect = np.zeros(
            StatefulModel.V
        )  # the state StatefulModel reaches on the prompt and the text
        for token in [i % 5] + [texts.index(c) for c in text]:
            expect = 0.6 * expect
            expect[token] += 1.0
        np.testing.assert_allclose(state[0], expect, rtol=1e-5, atol=1e-5)


def test_sampler_uniform_stream_survives_taking_ahead():
    """Draws taken ahead and given back come first again: the stream a request sees does not
    depend on how far ahead the scheduler took it."""
    plain = np.random.default_rng(7).random(12)
    s = Sampler(1.0, seed=7)
    got = [s.next_uniform()]
    ahead = s.uniforms(5)
    got += ahead[:2].tolist()
    s.unread(ahead[2:])
    got += s.uniforms(4).tolist()  # 3 given back, then 1 fresh
    s.unread(np.empty(0))
    got += [s.next_uniform() for _ in range(5)]
    np.testing.assert_array_equal(got, plain)


def _message_times(times, gap):
    """When a stream's messages go: the first at once, then each `gap` after the last."""
    due, out = 0.0, []
    for now in times:
        if now >= due:
            out.append(now)
            due = now + gap
    return out


def test_message_spacing_applies_in_both_paths():
    """A stream's next message waits max(its interval, the budget's spacing) after the last,
    whether it samples step by step (take_sample) or in a Streams block."""
    from serving import scheduler

    texts = list("uvwxy")
    times = [0.01 * t for t in range(40)]
    for interval, spacing in [(0.0, 0.1), (0.1, 0.02), (0.0, 0.0)]:
        expect = _message_times(times, max(interval, spacing))
        sent: list = []
        seq = GenerateSequence(
            np.zeros((1, 1), np.float32),
            None,
            [],
            Sampler(0.0),
            1000,
            [],
            False,
            texts,
            None,
            lambda *m, out=sent: out.append(m),
            interval=interval,
        )
        for now in times:
            post: list = []
            seq.take_sample(0, None, post, now, spacing)
            for callback in post:
                callback()
        assert len(sent) == len(expect)

        block_sent: list = []
        seqs = [
            GenerateSequence(
                np.zeros((1, 1), np.float32),
                np.zeros(5),
                [],
                Sampler(0.0),
                1000,
                [],
                False,
                texts,
                None,
                lambda *m, out=block_sent: out.append(m),
                interval=interval,
            )
            for _ in range(2)
        ]
        block = scheduler.Streams(
            seqs, np.zeros((2, 1, 1), np.float32), np.zeros((2, 5), np.float32), spacing
        )
        for now in times:
            post = []
            block.sample(now, post)
            for callback in post:
                callback()
        assert len(block_sent) == 2 * len(expect)
        block.release()  # the characters since each stream's last message go back to it, pending
        assert (
            "".join(t for t, *_ in block_sent) + "".join(c for s in seqs for c in s.pending)
            == "u" * 80
        )


def test_scheduler_spaces_messages_by_the_models_budget():
    """With a budget of 0.4 messages a second, four streams' messages are at least 2.5 s apart
    (more than the run takes): each stream gets its first character at once and the rest
    with the last message. Without a budget, interval 0 sends every character."""

    async def run(message_rate):
        loop = asyncio.get_running_loop()
        sched = Scheduler(
            StatefulModel().step,
            max_batch=8,
            max_wait=0.0,
            post=loop.call_soon_threadsafe,
            message_rate=message_rate,
        )
        outs = [[] for _ in range(4)]
        done = [loop.create_future() for _ in range(4)]

        def emitter(i):
            def emit(text, bits, finish, made):
                if text is None:
                    done[i].set_result(None)
                else:
                    outs[i].append((text, finish))

            return emit

        for i in range(4):
            sched.add(
                GenerateSequence(
                    np.zeros((1, StatefulModel.V), np.float32),
                    None,
                    [i],
                    Sampler(1.0, seed=i),
                    30,
                    [],
                    False,
                    list("uvwxyz"),
                    None,
                    emitter(i),
                    interval=0.0,
                )
            )
        await asyncio.gather(*done)
        await loop.run_in_executor(None, sched.stop)
        return outs

    for out in asyncio.run(run(0.4)):
        assert [len(t) for t, _ in out] == [1, 29] and out[-1][1] == "LENGTH"
    for out in asyncio.run(run(0.0)):
        assert len(out) == 30
    with pytest.raises(ValueError, match="message_rate must be >= 0"):
        Scheduler(StatefulModel().step, post=lambda cb: cb(), message_rate=float("nan"))


class CountingModel:
    """A slow step graph whose state counts the ids fed (the loop runs while it steps)."""

    def step(self, inputs, states):
        time.sleep(0.002)
        return np.zeros((len(inputs), 5), np.float32), states + 1


@pytest.mark.parametrize("columns", [True, False])
def test_a_message_reaches_the_loop_after_the_step_that_feeds_it(monkeypatch, columns):
    """When a message reaches the event loop, its characters are in the sequence's position
    (a session saved then includes everything the client has seen), and with the last one the
    sequence is finished (so ending the call does not cancel it), in a Streams block or not; and
    the sequence keeps the state at each message's end (where a session goes back to when the
    call ends before the next message is sent)."""
    from serving import scheduler

    if not columns:
        monkeypatch.setattr(scheduler.Streams, "fits", staticmethod(lambda batch: False))

    async def main():
        loop = asyncio.get_running_loop()
        sched = Scheduler(
            CountingModel().step, max_batch=4, max_wait=0.0, post=loop.call_soon_threadsafe
        )
        checks, done, seqs = [], [loop.create_future() for _ in range(3)], []

        def emitter(i):
            delivered = [0]

            def emit(text, bits, finish, made):
                if text is None:
                    done[i].set_result(None)
                    return
                delivered[0] += len(text)
                fed = int(seqs[i].pos[0][0, 0])  # the start id and the characters fed so far
                boundary = seqs[i].mark(made)[0][0, 0]  # the state when this message's last was fed
                checks.append(
                    (
                        fed >= 1 + delivered[0],
                        not finish or seqs[i].finished,
                        made == delivered[0] and boundary == 1 + made,
                    )
                )
                seqs[i].forget(made)  # as the engine does once a message is sent

            return emit

        for i in range(3):
            seqs.append(
                GenerateSequence(
                    np.zeros((1, 1), np.float32),
                    None,
                    [0],
                    Sampler(1.0, seed=i),
                    40,
                    [],
                    False,
                    list("abcde"),
                    None,
                    emitter(i),
                    interval=0.0,
                )
            )
            sched.add(seqs[-1])
        await asyncio.gather(*done)
        await loop.run_in_executor(None, sched.stop)
        return checks

    checks = asyncio.run(main())
    assert len(checks) >= 3 and all(all(c) for c in checks), checks
