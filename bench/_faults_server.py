"""bench/faults.py's scenarios of the server's own lifecycle and limits, d and e: SIGTERM under
load, with how each kind of call in flight must end and by when (d), and the session bound of
--max-sessions (e). Each scenario takes a running `nlstm serve`
(serving.testing.process.Server) and returns its Result.
"""

from __future__ import annotations

import asyncio
import math
import signal
import time
from collections import Counter
from collections.abc import Awaitable

import grpc
import numpy as np
from _scenarios import Result, create, drain, status
from _server import glimpse_requests, pick_models

from serving.api.nlstm.v1 import inference_pb2 as pb
from serving.api.nlstm.v1 import inference_pb2_grpc as pb_grpc
from serving.testing.process import Server

UNDISPATCHED_WITHIN = (
    0.5  # d: seconds after SIGTERM in which grpc cancels the calls it holds undispatched
)


async def sigterm_under_load(server: Server, smoke: bool, grace: float) -> Result:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    res = Result("d", f"sigterm: SIGTERM under load, --grace {grace:g}")
    workers, streams = (4, 2) if smoke else (32, 8)
    rng = np.random.default_rng(4)
    short: list[tuple[str, float, float, str]] = []  # (rpc, issued, ended, code)
    # the calls started before SIGTERM (their first answer came back) and how each ended
    started: dict[str, list[tuple[str, float]]] = {
        "long Generate": [],
        "paced glimpse stream": [],
        "held glimpse stream": [],
    }
    health: list[tuple[str, float]] = []
    t_sig = math.inf
    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = pb_grpc.InferenceStub(channel)
        char, glimpse = await pick_models(stub)

        async def watch_health() -> None:
            request = health_pb2.HealthCheckRequest(service="nlstm.v1.Inference")
            try:
                async for r in health_pb2_grpc.HealthStub(channel).Watch(request):
                    health.append(
                        (
                            health_pb2.HealthCheckResponse.ServingStatus.Name(r.status),
                            time.perf_counter(),
                        )
                    )
            except grpc.aio.AioRpcError as exc:
                health.append((exc.code().name, time.perf_counter()))

        async def long_generate(first: asyncio.Event) -> None:
            # more characters than the grace period allows: stopped GENERATE_END_MARGIN before its
            # end
            call = stub.Generate(
                pb.GenerateRequest(model=char, max_chars=1_000_000, temperature=1.0)
            )
            last = await call.read()
            first.set()
            try:
                while (r := await call.read()) is not grpc.aio.EOF:
                    last = r
                end = pb.FinishReason.Name(last.finish_reason)
            except grpc.aio.AioRpcError as exc:
                end = f"{exc.code().name}: {exc.details()}"
            started["long Generate"].append((end, time.perf_counter()))

        async def glimpses(first: asyncio.Event, what: str, requests: list, pause: float) -> None:
            # paced: one image, a glimpse every `pause` s, done within the grace period;
            # held: its client keeps sending glimpses, so only the deadline ends it
            stream = stub.ClassifyGlimpses()
            answers = 0
            try:
                for request in requests:
                    await stream.write(request)
                    await stream.read()
                    answers += 1
                    first.set()
                    await asyncio.sleep(pause)
                await stream.done_writing()
                end = f"{(await stream.code()).name} after {answers} answers"
            except grpc.aio.AioRpcError as exc:
                end = exc.code().name
            except asyncio.InvalidStateError:  # a write after the call ended
                end = (await stream.code()).name
            started[what].append((end, time.perf_counter()))

        async def worker(i: int) -> None:
            while time.perf_counter() < t_sig + 1.0:
                rpc, t0 = ("Generate", "Score", "ClassifyGlimpses")[i % 3], time.perf_counter()
                if rpc == "Generate":
                    code = await status(
                        drain(
                            stub.Generate(
                                pb.GenerateRequest(model=char, max_chars=30, temperature=1.0)
                            )
                        )
                    )
                elif rpc == "Score":
                    code = await status(
                        stub.Score(pb.ScoreRequest(model=char, text="the cat sat on the mat"))
                    )
                else:
                    code = await status(
                        drain(stub.ClassifyGlimpses(glimpse_requests(rng, model=glimpse)))
                    )
                short.append((rpc, t0, time.perf_counter(), code))
                if code != "OK":
                    await asyncio.sleep(0.02)
                i += 1

        watcher = asyncio.create_task(watch_health())
        firsts = [asyncio.Event() for _ in range(3 * streams)]
        pause = (grace - 1.0) / 20  # the 20 glimpses take the grace period but its last second
        tasks = [asyncio.create_task(long_generate(e)) for e in firsts[:streams]]
        image = glimpse_requests(rng, model=glimpse)
        tasks += [
            asyncio.create_task(glimpses(e, "paced glimpse stream", image, pause))
            for e in firsts[streams : 2 * streams]
        ]
        tasks += [
            asyncio.create_task(glimpses(e, "held glimpse stream", image * 100, 0.2))
            for e in firsts[2 * streams :]
        ]
        await asyncio.gather(*(e.wait() for e in firsts))
        tasks += [asyncio.create_task(worker(i)) for i in range(workers)]
        await asyncio.sleep(0.5 if smoke else 2.0)
        t_sig = time.perf_counter()
        server.proc.send_signal(signal.SIGTERM)
        code = await asyncio.get_running_loop().run_in_executor(None, server.proc.wait, grace + 30)
        exited = time.perf_counter() - t_sig
        await asyncio.gather(*tasks)
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)

    deadline = t_sig + grace + 0.25
    t_down = next((t for h, t in health if h == "NOT_SERVING"), math.inf)
    res.figures.update(
        exit_code=code,
        exit_s=round(exited, 2),
        health=[h for h, _ in health],
        not_serving_after_s=round(t_down - t_sig, 3),
    )
    res.check(
        code == 0 and exited <= grace + 1.5, f"the server exited with {code} after {exited:.2f} s"
    )
    res.check(t_down < math.inf, f"health never turned NOT_SERVING: {health}")
    expected = {
        "long Generate": {"FINISH_REASON_CANCELLED", "FINISH_REASON_LENGTH"},
        "paced glimpse stream": {"OK after 20 answers"},
        "held glimpse stream": {"UNAVAILABLE"},
    }
    for what, ends in started.items():
        late = max(t for _, t in ends) - t_sig
        res.figures[what] = {**Counter(e for e, _ in ends), "last_ended_s": round(late, 2)}
        res.check(
            {e for e, _ in ends} <= expected[what],
            f"{what}s started before SIGTERM ended {res.figures[what]}",
        )
        res.check(
            late <= grace + (0.75 if what == "held glimpse stream" else 0.25),
            f"a {what} ended {late:.2f} s after SIGTERM (grace {grace:g} s)",
        )

    # Short calls: OK if the server started them before it turned NOT_SERVING (and then they
    # end by the deadline); UNAVAILABLE if it had not (the client cannot tell which for a call
    # issued before SIGTERM: it may wait in grpc's queue); or CANCELLED, at once, by grpc for
    # the calls it still held undispatched when the server's stop began (grpc/grpc#41785).
    def show(calls: list) -> str:  # (rpc, issued and ended in s after SIGTERM, code)
        return str(
            [
                (rpc, round(t0 - t_sig, 3), round(t1 - t_sig, 3), code)
                for rpc, t0, t1, code in calls[:5]
            ]
        )

    # A glimpse stream (bidi) that grpc held undispatched ended INTERNAL instead, once, on the
    # client, at the moment of SIGTERM on a loaded machine (2026-12-01), with no error in the
    # server's log: no handler produced it (the servicer logs every INTERNAL it answers at ERROR,
    # which the log check below catches), so it is grpc's, like the CANCELLED above.
    def fine(call: tuple) -> bool:
        rpc, issued, ended, code = call
        undispatched = ended < t_sig + UNDISPATCHED_WITHIN
        return (
            (code == "OK" and issued < t_down and ended <= deadline)
            or code == "UNAVAILABLE"
            or (code == "CANCELLED" and undispatched)
            or (code == "INTERNAL" and rpc == "ClassifyGlimpses" and undispatched)
        )

    windows = {
        "before SIGTERM": (-math.inf, t_sig),
        "until NOT_SERVING": (t_sig, t_down),
        "after NOT_SERVING": (t_down, math.inf),
    }
    res.figures["short calls"] = {
        name: dict(Counter(c[3] for c in short if a <= c[1] < b))
        for name, (a, b) in windows.items()
    }
    bad = [c for c in short if not fine(c)]
    res.check(not bad, f"short calls that ended otherwise: {show(bad)}")
    res.check(any(c[1] >= t_down for c in short), "no call was made after NOT_SERVING")
    return res


async def session_bound(server: Server, smoke: bool, bound: int) -> Result:
    res = Result("e", f"bound: --max-sessions {bound}")
    rng = np.random.default_rng(5)
    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = pb_grpc.InferenceStub(channel)
        char, glimpse = await pick_models(stub)
        sessions = [
            (await create(stub, char if i % 2 else glimpse), bool(i % 2)) for i in range(bound)
        ]

        async def use(sid: str, is_char: bool) -> None:
            if is_char:
                await drain(
                    stub.Generate(pb.GenerateRequest(session_id=sid, max_chars=30, temperature=1.0))
                )
                await stub.Score(pb.ScoreRequest(session_id=sid, text="the cat sat"))
            else:
                await drain(stub.ClassifyGlimpses(glimpse_requests(rng, session_id=sid)))

        def extra() -> Awaitable:
            return status(create(stub, char))

        def sessionless() -> Awaitable:
            return status(stub.Score(pb.ScoreRequest(model=char, text="the cat sat")))

        results = await asyncio.gather(
            *(status(use(s, c)) for s, c in sessions),
            *(extra() for _ in range(2 * bound)),
            *(sessionless() for _ in range(bound)),
        )
        used, extras, free = results[:bound], results[bound : 3 * bound], results[3 * bound :]
        active = server.metric("nlstm_active_sessions")
        await stub.CloseSession(pb.CloseSessionRequest(session_id=sessions[0][0]))
        room = await extra()
        await asyncio.gather(
            *(stub.CloseSession(pb.CloseSessionRequest(session_id=s)) for s, _ in sessions[1:])
        )
        res.figures.update(
            sessions=bound,
            beyond_the_bound=dict(Counter(extras)),
            sessions_served=dict(Counter(used)),
            sessionless_served=dict(Counter(free)),
            active_sessions_gauge=active,
            create_after_close=room,
        )
    res.check(
        Counter(extras) == Counter({"RESOURCE_EXHAUSTED": 2 * bound}),
        f"CreateSession beyond the bound: {dict(Counter(extras))}",
    )
    res.check(
        Counter(used) == Counter({"OK": bound}),
        f"calls on the existing sessions: {dict(Counter(used))}",
    )
    res.check(Counter(free) == Counter({"OK": bound}), f"session-less calls: {dict(Counter(free))}")
    res.check(active == bound, f"nlstm_active_sessions is {active}, not {bound}")
    res.check(room == "OK", f"CreateSession after closing one: {room}")
    return res
