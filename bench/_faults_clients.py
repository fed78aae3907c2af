"""bench/faults.py's scenarios of clients that misbehave, a to c: clients cancel their streams
mid-stream (a), a client process is killed and a channel closed abruptly mid-call (b), a client
process stops reading its Generate streams (c); and the client programs b and c run as
processes of their own. Each scenario takes a running `nlstm serve`
(serving.testing.process.Server) and returns its Result.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter

import grpc
import numpy as np
from _scenarios import (
    Bystander,
    Result,
    check_counted,
    check_released,
    create,
    server_counts,
    spawn,
    usable_after,
)
from _server import glimpse_requests, pick_models

from serving.api.nlstm.v1 import inference_pb2 as pb
from serving.api.nlstm.v1 import inference_pb2_grpc as pb_grpc
from serving.testing.process import Server

# b: a client that opens Generate and glimpse streams on the sessions given, keeps reading the
# Generate streams and holds the glimpse streams open, until it is killed
DISCONNECTING_CLIENT = r"""
import asyncio, sys
import grpc
from serving.api.nlstm.v1 import inference_pb2 as pb, inference_pb2_grpc as pb_grpc
target, max_chars = sys.argv[1], int(sys.argv[2])
chars, glimpses = sys.argv[3].split(","), sys.argv[4].split(",")
async def main():
    stub = pb_grpc.InferenceStub(grpc.aio.insecure_channel(target))
    gens = [stub.Generate(pb.GenerateRequest(session_id=s, max_chars=max_chars, temperature=1.0))
            for s in chars]
    for g in gens:
        await g.read()
    streams = [stub.ClassifyGlimpses() for _ in glimpses]
    for s, st in zip(glimpses, streams):
        await st.write(pb.GlimpseRequest(session_id=s, pixels=[0.5] * 49))
        await st.read()
    print("ready", flush=True)
    async def drain(g):
        while await g.read() is not grpc.aio.EOF:
            pass
    await asyncio.gather(*(drain(g) for g in gens))
    await asyncio.Event().wait()
asyncio.run(main())
"""

# c: a client that opens Generate streams on the sessions given and stops itself: it never reads
STALLED_CLIENT = r"""
import asyncio, os, signal, sys
import grpc
from serving.api.nlstm.v1 import inference_pb2 as pb, inference_pb2_grpc as pb_grpc
target, max_chars, sessions = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(",")
async def main():
    stub = pb_grpc.InferenceStub(grpc.aio.insecure_channel(target))
    calls = [stub.Generate(pb.GenerateRequest(session_id=s, max_chars=max_chars, temperature=1.0,
                                              logprobs=True))
             for s in sessions]
    for c in calls:
        await c.initial_metadata()
    print("ready", flush=True)
    os.kill(os.getpid(), signal.SIGSTOP)
asyncio.run(main())
"""


async def cancel_mid_stream(server: Server, smoke: bool) -> Result:
    res = Result("a", "cancel: clients cancel Generate and glimpse streams mid-stream")
    n, rng, calls = (8 if smoke else 200), np.random.default_rng(1), Counter()
    release: dict[str, list[float]] = {"cancelled Generate": [], "cancelled glimpses": []}
    client_codes: Counter = Counter()
    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = pb_grpc.InferenceStub(channel)
        char, glimpse = await pick_models(stub)
        limit = asyncio.Semaphore(16)

        async def one(i: int) -> None:
            async with limit:
                sid, gid = await create(stub, char), await create(stub, glimpse)
                calls["Generate"] += 1
                call = stub.Generate(
                    pb.GenerateRequest(session_id=sid, max_chars=100_000, temperature=1.0)
                )
                for _ in range(1 + i % 3):
                    await call.read()
                call.cancel()
                client_codes[f"Generate {(await call.code()).name}"] += 1
                release["cancelled Generate"].append(
                    await usable_after(stub, sid, False, rng, calls)
                )
                calls["ClassifyGlimpses"] += 1
                stream = stub.ClassifyGlimpses()
                for request in glimpse_requests(rng, session_id=gid)[: 1 + i % 10]:
                    await stream.write(request)
                    await stream.read()
                stream.cancel()
                client_codes[f"ClassifyGlimpses {(await stream.code()).name}"] += 1
                release["cancelled glimpses"].append(
                    await usable_after(stub, gid, True, rng, calls)
                )
                for s in (sid, gid):
                    await stub.CloseSession(pb.CloseSessionRequest(session_id=s))

        await asyncio.gather(*(one(i) for i in range(n)))
        counted = await server_counts(server, calls, ("Generate", "ClassifyGlimpses", "Score"))
    res.figures.update(cancelled=dict(client_codes))
    res.check(
        client_codes == Counter({"Generate CANCELLED": n, "ClassifyGlimpses CANCELLED": n}),
        f"client-side codes {dict(client_codes)}",
    )
    for what, times in release.items():
        check_released(res, times, what)
    check_counted(res, counted, calls)
    return res


async def disconnect(server: Server, smoke: bool) -> Result:
    res = Result(
        "b", "disconnect: a client process killed mid-call, a channel closed abruptly mid-call"
    )
    n, rng, calls = (4 if smoke else 32), np.random.default_rng(2), Counter()
    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = pb_grpc.InferenceStub(channel)
        char, glimpse = await pick_models(stub)
        bystander = Bystander(stub, char)
        chars = [await create(stub, char) for _ in range(n)]
        glimpses = [await create(stub, glimpse) for _ in range(n)]
        # a client process killed mid-call: the kernel closes its connection, no HTTP/2 goodbye
        t0 = time.perf_counter()
        client = await spawn(
            DISCONNECTING_CLIENT, server.target, "100000", ",".join(chars), ",".join(glimpses)
        )
        calls.update(Generate=n, ClassifyGlimpses=n)
        await asyncio.sleep(0.3)
        client.kill()
        client.wait()
        killed = await asyncio.gather(
            *(usable_after(stub, s, s in glimpses, rng, calls) for s in chars + glimpses)
        )
        check_released(res, killed, "SIGKILL")
        # a channel closed mid-call without waiting for its calls
        abrupt = grpc.aio.insecure_channel(server.target)
        other = pb_grpc.InferenceStub(abrupt)
        gens = [
            other.Generate(pb.GenerateRequest(session_id=s, max_chars=100_000, temperature=1.0))
            for s in chars
        ]
        streams = [other.ClassifyGlimpses() for _ in glimpses]
        calls.update(Generate=n, ClassifyGlimpses=n)
        for g in gens:
            await g.read()
        for s, st in zip(glimpses, streams, strict=True):
            await st.write(glimpse_requests(rng, session_id=s)[0])
            await st.read()
        await abrupt.close(grace=None)
        closed = await asyncio.gather(
            *(usable_after(stub, s, s in glimpses, rng, calls) for s in chars + glimpses)
        )
        check_released(res, closed, "channel close")
        await bystander.stop(calls)
        counted = await server_counts(server, calls, ("Generate", "ClassifyGlimpses", "Score"))
    by = bystander.window(t0)
    res.figures.update(sessions_held=2 * n, bystander=by)
    res.check(not by["errors"] and by["calls"] > 0, f"the other client: {by}")
    check_counted(res, counted, calls)
    return res


async def stalled_reader(server: Server, smoke: bool, max_chars: int) -> Result:
    res = Result("c", "stalled: a client stops reading its Generate streams (SIGSTOP)")
    n, rng, calls = (4 if smoke else 32), np.random.default_rng(3), Counter()
    settle, hold = (1.0, 1.0) if smoke else (5.0, 20.0)
    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = pb_grpc.InferenceStub(channel)
        char, _ = await pick_models(stub)
        bystander = Bystander(stub, char)
        sessions = [await create(stub, char) for _ in range(n)]
        await asyncio.sleep(settle)
        t_base = time.perf_counter()
        await asyncio.sleep(settle)
        rss0 = server.rss_mib()
        counted0 = server.metric("nlstm_requests_total", method="Generate") - bystander.count(
            "Generate"
        )
        t0 = time.perf_counter()
        client = await spawn(STALLED_CLIENT, server.target, str(max_chars), ",".join(sessions))
        try:
            # the scheduler is done with the stalled calls when only the bystander's call is active
            depth = math.inf
            while depth > 1 and time.perf_counter() - t0 < 300:
                await asyncio.sleep(0.25)
                depth = server.metric("nlstm_active_sequences", model=char)
            generated = time.perf_counter() - t0
            rss1 = server.rss_mib()
            # the stalled calls the server has not finished, blocked writing to them (give or
            # take the bystander's call in flight, which the server may have counted already)
            open_calls = max(
                0,
                n
                - int(
                    server.metric("nlstm_requests_total", method="Generate")
                    - bystander.count("Generate")
                    - counted0
                ),
            )
            await asyncio.sleep(hold)
            rss2 = server.rss_mib()
            t_end = time.perf_counter()
        finally:
            client.kill()
            client.wait()
        release = await asyncio.gather(
            *(usable_after(stub, s, False, rng, calls) for s in sessions)
        )
        await asyncio.sleep(1.0)
        rss3 = server.rss_mib()
        await bystander.stop(calls)
    base, during = bystander.window(t_base, t0), bystander.window(t0, t_end)
    res.figures.update(
        stalled_calls=n,
        max_chars=max_chars,
        seconds_to_generate_all=round(generated, 1),
        calls_still_open_on_server=open_calls,
        rss_before_mib=round(rss0, 1),
        rss_generated_mib=round(rss1, 1),
        rss_after_hold_mib=round(rss2, 1),
        hold_s=hold,
        rss_after_kill_mib=round(rss3, 1),
        bytes_per_stalled_char=round((rss1 - rss0) * 2**20 / (n * max_chars)),
        bystander_before=base,
        bystander_during=during,
    )
    res.check(depth <= 1, "the stalled calls were still generating after 300 s")
    res.check(
        rss2 - rss1 <= 2.0,
        f"memory kept growing after the stalled calls were done: "
        f"{rss1:.1f} -> {rss2:.1f} MiB in {hold:g} s",
    )
    res.check(
        not during["errors"] and during["calls"] > 0 and during["p99_ms"] < 1000,
        f"the other client while the reader was stalled: {during}",
    )
    check_released(res, release, "stalled client killed")
    return res
