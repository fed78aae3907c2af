"""Property-based fuzzing of the gRPC server (hypothesis): the driver. Needs hypothesis (the dev
extra). The pieces, one module each:
- fuzz_requests.py: a request strategy for every rpc, mostly-invalid fields mixed with valid ones;
- fuzz_wire.py: requests encoded field by field, not by the protobuf library, so that they can
  carry what a Python client cannot put in a message (not UTF-8, out-of-range varints, raw float
  bits, wrong wire types, cut or padded bytes), and real snapshots mutated for RestoreSession;
- fuzz_oracle.py: the checker, which knows from docs/serving.md which status codes each request
  may get and what its answers must look like.
This module owns the `Fuzzer`, which sends each request as raw bytes to a server, parses the
bytes with the protobuf library the server uses (to know what the server saw: bytes that do not
parse must get INVALID_ARGUMENT, the rest the codes their fields call for), opens and closes the
sessions each request refers to, and asks the checker about the answer; and `fuzz`, which sends
a number of hypothesis examples of one rpc.

tests/test_fuzz.py runs a bounded number of examples against an in-process server and
bench/fuzz.py thousands against a real `nlstm serve` process; both send each request with
`Fuzzer.send` and then ask `Fuzzer.still_good` whether a known-good request still gets the
answer it got at the start.

RestoreSession gets real snapshots of the server's models (made once, at the start), mutated:
bits flipped, bytes cut, spliced in or appended, or the snapshot decoded, a field changed (the
model, its export identity, the position up to 2**64 - 1, the state's shape, NaN in the state)
and encoded again with a valid checksum; and random bytes of every size up to past the receive
limit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import grpc
import numpy as np
from hypothesis import Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

from serving import snapshot
from serving.api.nlstm.v1 import inference_pb2 as pb
from serving.api.nlstm.v1 import inference_pb2_grpc as pb_grpc
from serving.limits import Limits, request_bytes_needed
from serving.servicer import SERVICE
from serving.testing.fuzz_oracle import OK, RE, Oracle, clip
from serving.testing.fuzz_requests import GLIMPSES, RPCS, SLOW_EXAMPLES, Target, requests
from serving.testing.fuzz_wire import Request, SessionRef, SnapshotRef, encode, mutate, parse

METHODS = pb.DESCRIPTOR.services_by_name["Inference"].methods_by_name
GOOD_TEXT = "the cat sat on the mat\n"  # the known-good Score request
GOOD_GLIMPSES = 3  # glimpses in the known-good ClassifyGlimpses request


@dataclass
class Outcome:
    code: str  # the status code's name: "OK", "INVALID_ARGUMENT", ...
    problem: str | None  # what was wrong with the answer; None: it is the documented one


class Fuzzer:
    """Sends fuzzed requests to a server as raw bytes and judges its answers against the
    documented codes; keeps count of the sessions it holds open."""

    def __init__(self, channel: grpc.Channel, limits: Limits, timeout: float = 30.0) -> None:
        self.channel, self.limits, self.timeout = channel, limits, timeout
        self.max_request = request_bytes_needed(
            limits.max_text, limits.max_stop, limits.max_stop_chars
        )
        self.stub = pb_grpc.InferenceStub(channel)
        listed = self.stub.ListModels(pb.ListModelsRequest(), timeout=timeout).models
        self.target = Target(
            {m.name: "glimpse" if m.num_classes else "char" for m in listed},
            limits,
            frozenset(m.name for m in listed if m.task == "poems"),
        )
        self.live: dict[str, str] = {}  # session id -> model: the sessions open now
        self.stale = self._create(min(self.target.models))
        self._close(self.stale)
        # per kind, a real snapshot of its first model (a session that took in some input);
        # per model snapshotted, (export identity, state shape, logits size) as it says
        self.snaps: dict[str, bytes] = {}
        self.exports: dict[str, tuple[str, tuple, int | None]] = {}
        for kind, model in sorted(self.target.firsts().items()):
            sid = self._create(model)
            if kind == "char":
                self.stub.Score(pb.ScoreRequest(session_id=sid, text=GOOD_TEXT), timeout=timeout)
            else:
                list(
                    self.stub.ClassifyGlimpses(
                        iter([pb.GlimpseRequest(session_id=sid, pixels=GLIMPSES[0])]),
                        timeout=timeout,
                    )
                )
            self.snaps[kind] = self.stub.SnapshotSession(
                pb.SnapshotSessionRequest(session_id=sid), timeout=timeout
            ).data
            self._close(sid)
            s = snapshot.decode(self.snaps[kind])
            self.exports[s.model] = (
                s.model_id,
                s.state.shape,
                None if s.logits is None else s.logits.size,
            )
        self._calls = {}
        for rpc in RPCS:
            method, path = METHODS[rpc], f"/{SERVICE}/{rpc}"
            kind = (
                "stream_stream"
                if method.client_streaming
                else "unary_stream"
                if method.server_streaming
                else "unary_unary"
            )
            self._calls[rpc] = getattr(channel, kind)(path)  # no (de)serializers: bytes in and out
        self.oracle = Oracle(self.target, self.live, self.exports)
        self._strategies: dict[str, st.SearchStrategy] = {}
        self.baseline = self._good()

    def requests(self, rpc: str) -> st.SearchStrategy:
        if rpc not in self._strategies:
            self._strategies[rpc] = requests(rpc, self.target)
        return self._strategies[rpc]

    # -------------------------------------------------------------- sending
    def send(self, rpc: str, request: Request) -> Outcome:
        """Send one request and judge the answer; sessions created for it are closed after."""
        messages = request if isinstance(request, tuple) else (request,)
        kind = "glimpse" if rpc == "ClassifyGlimpses" else "char"
        opened: list[str] = []
        try:
            method = METHODS[rpc]
            cls = getattr(pb, method.input_type.name)
            wire = [
                encode(m, cls.DESCRIPTOR, lambda ref: self._resolve(ref, kind, opened))
                for m in messages
            ]
            parsed = [parse(cls, w) for w in wire]
            allowed, answers = self.oracle.expect(rpc, parsed)
            # a message larger than the receive limit (sized from the limits: the server's
            # default) is refused by gRPC before anything else looks at it
            oversized = next((i for i, w in enumerate(wire) if len(w) > self.max_request), None)
            if oversized is not None and oversized <= answers:
                allowed, answers = {RE}, oversized
            code, details, received = self._call(rpc, wire)
            out = [getattr(pb, method.output_type.name).FromString(r) for r in received]
            if code == OK and rpc in ("CreateSession", "ForkSession", "RestoreSession"):
                self.live[out[0].session_id] = out[0].model
                opened.append(out[0].session_id)
            if code == OK and rpc == "CloseSession" and parsed[0] is not None:
                self.live.pop(parsed[0].session_id, None)
            problem = self.oracle.judge(rpc, parsed, allowed, answers, code, details, out)
            released = self._release(opened)
            return Outcome(code, problem or released)
        except grpc.RpcError as exc:  # a helper call (creating, probing a session) failed
            self._forget(opened)
            return Outcome(
                "HELPER", f"a helper call got {exc.code().name}: {clip(exc.details() or '')}"
            )

    def still_good(self) -> str | None:
        """None when the known-good requests get the answers they got at the start."""
        try:
            now = self._good()
        except grpc.RpcError as exc:
            return f"a known-good request failed: {exc.code().name} {clip(exc.details() or '')}"
        for key, want in self.baseline.items():
            got = now[key]
            same = (
                got == want
                if key == "models"
                else len(got) == len(want) and np.allclose(got, want, rtol=1e-6)
            )
            if not same:
                return (
                    f"the known-good {key} request changed: {clip(str(got))} != {clip(str(want))}"
                )
        return None

    def _good(self) -> dict:
        t = self.target
        out = {
            "models": [
                m.name
                for m in self.stub.ListModels(pb.ListModelsRequest(), timeout=self.timeout).models
            ]
        }
        if t.first("char"):
            r = self.stub.Score(
                pb.ScoreRequest(model=t.first("char"), text=GOOD_TEXT, per_char=True),
                timeout=self.timeout,
            )
            out["score"] = [r.total_bits, *r.bits]
        if t.first("glimpse"):
            stream = [
                pb.GlimpseRequest(model=t.first("glimpse") if i == 0 else "", pixels=GLIMPSES[i])
                for i in range(GOOD_GLIMPSES)
            ]
            out["glimpses"] = [
                p
                for r in self.stub.ClassifyGlimpses(iter(stream), timeout=self.timeout)
                for p in r.probabilities
            ]
        return out

    def _call(self, rpc: str, wire: list[bytes]) -> tuple[str, str, list[bytes]]:
        """(status code name, details, response bytes received before it)."""
        method, call = METHODS[rpc], self._calls[rpc]
        received: list[bytes] = []
        try:
            if method.client_streaming:
                received.extend(call(iter(wire), timeout=self.timeout))
            elif method.server_streaming:
                received.extend(call(wire[0], timeout=self.timeout))
            else:
                received.append(call(wire[0], timeout=self.timeout))
        except grpc.RpcError as exc:
            return exc.code().name, exc.details() or "", received
        return OK, "", received

    # ------------------------------------------------------------ sessions
    def _create(self, model: str) -> str:
        sid = self.stub.CreateSession(
            pb.CreateSessionRequest(model=model), timeout=self.timeout
        ).session_id
        self.live[sid] = model
        return sid

    def _close(self, sid: str) -> None:
        self.stub.CloseSession(pb.CloseSessionRequest(session_id=sid), timeout=self.timeout)
        del self.live[sid]

    def _resolve(self, ref: SessionRef | SnapshotRef, kind: str, opened: list[str]) -> str | bytes:
        if isinstance(ref, SnapshotRef):
            return mutate(self.snaps[ref.kind], ref.mutation)
        if ref.kind == "stale":
            return self.stale
        t = self.target
        other = "glimpse" if kind == "char" else "char"
        if ref.kind == "other":
            model = t.first(other)
            if model is None:  # requests() draws "other" only when the server has both kinds
                raise ValueError(f"a session on a {other} model, and the server has none")
        else:
            model = t.first(kind) or min(t.models)
        sid = self._create(model)
        opened.append(sid)
        return sid[:-1] + ("B" if sid[-1] == "A" else "A") if ref.kind == "near" else sid

    def _release(self, opened: list[str]) -> str | None:
        """Close the sessions opened for a request; first check that each is free again and
        works (a session left in use would answer ABORTED for ever)."""
        problem = None
        for sid in [s for s in opened if s in self.live]:
            try:
                if self.target.models[self.live[sid]] == "char":
                    self.stub.Score(pb.ScoreRequest(session_id=sid, text="a"), timeout=self.timeout)
                else:
                    stream = iter([pb.GlimpseRequest(session_id=sid, pixels=GLIMPSES[0])])
                    list(self.stub.ClassifyGlimpses(stream, timeout=self.timeout))
            except grpc.RpcError as exc:
                problem = (
                    problem
                    or f"its session fails after it: {exc.code().name} {clip(exc.details() or '')}"
                )
            self._close(sid)
        return problem

    def _forget(self, opened: list[str]) -> None:
        for sid in opened:
            self.live.pop(sid, None)


def fuzz(
    fuzzer: Fuzzer, rpc: str, examples: int, report: Callable[[Outcome], None], seed: int = 0
) -> None:
    """Send `examples` requests of `rpc` drawn by hypothesis from `seed`, and report each
    outcome. Generation only: nothing raises, so there is nothing to shrink."""

    @hypothesis_seed(seed)
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=SLOW_EXAMPLES,
    )
    @given(fuzzer.requests(rpc))
    def run(request) -> None:
        report(fuzzer.send(rpc, request))

    run()
