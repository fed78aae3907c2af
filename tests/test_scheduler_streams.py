"""The columnar steady state of generation (Streams, serving/streams.py) and the timing of
Generate messages, through a Scheduler over a stand-in step graph: blocks give the step-by-step
text, cancelled streams keep text and state together, message spacing and the model's message
budget, and each message reaching the loop after the step that feeds it."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
from step_models import StatefulModel

from serving.sampling import Sampler
from serving.scheduler import GenerateSequence, Scheduler


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
