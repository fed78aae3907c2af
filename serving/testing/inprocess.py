"""An in-process server for tests: `ServerThread` runs build_server on port 0 in an asyncio
loop of its own thread, and tests talk to it with sync stubs; `wait_for` polls a condition.
No torch (the models it serves come from a folder: training.testing exports tiny ones).
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import grpc

from serving.api.nlstm.v1 import inference_pb2_grpc as pb_grpc
from serving.limits import Limits
from serving.server import build_server, load_models, shutdown


class ServerThread:
    """An asyncio loop in a thread running build_server; tests talk to it with sync stubs."""

    def __init__(self, models_dir: Path, limits: Limits, **options):
        """`options` go to build_server (snapshot_key, session_store, server_limits, api_keys,
        tls); with tls, `channel` is None and tests make their own."""
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.models = load_models(models_dir, providers="cpu", intra_op_threads=1)
        self.thread = threading.Thread(target=self._main, args=(limits, options), daemon=True)
        self.thread.start()
        assert self.ready.wait(30)
        self.target = f"localhost:{self.running.port}"
        self.channel = grpc.insecure_channel(self.target) if options.get("tls") is None else None
        self.stub = pb_grpc.InferenceStub(self.channel) if self.channel is not None else None

    def _main(self, limits, options):
        asyncio.set_event_loop(self.loop)

        async def start():
            self.running = await build_server(
                self.models, port=0, host="localhost", limits=limits, **options
            )
            self.ready.set()

        self.loop.run_until_complete(start())
        self.loop.run_forever()

    def call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def close(self):
        if self.channel is not None:
            self.channel.close()
        self.call(shutdown(self.running, 0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    def metric(self, name, labels=None):
        return self.running.metrics.registry.get_sample_value(name, labels or {})


def wait_for(predicate, timeout=5.0):
    """Poll `predicate` every 10 ms until it holds or `timeout` seconds pass; its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()
