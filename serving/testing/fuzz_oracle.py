"""The fuzzer's checker (see serving/testing/fuzz.py): from docs/serving.md, which status codes
each request may get given what the server saw in its bytes and which sessions are open, and
whether the answers that came back are the documented ones. The fuzzer sends one request at a
time, so ABORTED (two calls on one session) and UNAVAILABLE (a draining server) are never right.
RestoreSession's codes come from serving/snapshot.py's decoder and the identities the real
snapshots carry.
"""

from __future__ import annotations

import math

import numpy as np

from serving import snapshot
from serving.api.nlstm.v1 import inference_pb2 as pb
from serving.testing.fuzz_requests import SESSION_RPCS, Target

OK, IA, NF, FP, RE = (
    "OK",
    "INVALID_ARGUMENT",
    "NOT_FOUND",
    "FAILED_PRECONDITION",
    "RESOURCE_EXHAUSTED",
)


def _good_glimpse(pixels) -> bool:
    x = np.asarray(pixels, dtype=np.float32)
    return x.shape == (49,) and bool(np.isfinite(x).all() and x.min() >= 0 and x.max() <= 1)


def clip(text: str, n: int = 160) -> str:
    return text if len(text) <= n else f"{text[:n]}... ({len(text)} characters)"


class Oracle:
    """The documented answers to fuzzed requests on `target`. `live` (session id -> model: the
    sessions open now) is the fuzzer's own dict, kept up to date by it; `exports` holds, per
    model snapshotted, (export identity, state shape, logits size) as its snapshot says."""

    def __init__(
        self,
        target: Target,
        live: dict[str, str],
        exports: dict[str, tuple[str, tuple, int | None]],
    ) -> None:
        self.target, self.limits, self.live, self.exports = target, target.limits, live, exports

    def _open_errors(self, model: str, session_id: str, kind: str) -> set[str]:
        """The codes a call naming `model` and `session_id` may get before its own checks."""
        if session_id:
            if session_id not in self.live:
                return {NF}
            if model and model != self.live[session_id]:
                return {IA}
            model = self.live[session_id]
        if not model:
            return {IA}
        if model not in self.target.models:
            return {NF}
        return {FP} if self.target.models[model] != kind else set()

    def expect(self, rpc: str, parsed: list) -> tuple[set[str], int]:
        """(the codes the request may get: {OK} when it is good, the responses that come
        before the end of the call)."""
        if rpc == "ClassifyGlimpses":
            return self._expect_glimpses(parsed)
        m, lim = parsed[0], self.limits
        if m is None:
            errors = {IA}
        elif rpc == "ListModels":
            errors = set()
        elif rpc == "CreateSession":
            errors = {IA} if not m.model else {NF} if m.model not in self.target.models else set()
            errors |= {RE} if not errors and len(self.live) >= lim.max_sessions else set()
        elif rpc == "CloseSession":
            errors = {IA} if not m.session_id else set() if m.session_id in self.live else {NF}
        elif rpc == "Score":
            errors = {IA} if not m.text else {RE} if len(m.text) > lim.max_text else set()
            errors |= self._open_errors(m.model, m.session_id, "char")
        elif rpc in SESSION_RPCS:
            errors = {IA} if not m.session_id else set() if m.session_id in self.live else {NF}
            errors |= (
                {RE}
                if not errors and rpc == "ForkSession" and len(self.live) >= lim.max_sessions
                else set()
            )
        elif rpc == "RestoreSession":
            codes = self._restore_codes(m.data)
            return codes | (
                {RE} if OK in codes and len(self.live) >= lim.max_sessions else set()
            ), 1
        else:  # Generate
            bad = (
                not 1 <= m.max_chars <= lim.max_chars
                or not math.isfinite(m.temperature)
                or m.temperature < 0
                or not 0 <= m.top_p <= 1
                or len(m.stop) > lim.max_stop
                or "" in m.stop
                or any(len(x) > lim.max_stop_chars for x in m.stop)
            )
            errors = ({IA} if bad else set()) | ({RE} if len(m.prompt) > lim.max_text else set())
            errors |= self._open_errors(m.model, m.session_id, "char")
        if errors:
            return errors, 0
        return {OK}, 0 if rpc == "Generate" else 1

    def _restore_codes(self, data: bytes) -> set[str]:
        """The codes RestoreSession may answer for `data` (docs/serving.md, "Snapshot, restore,
        fork"), from what the real snapshots said of their exports."""
        if not data:
            return {IA}
        # larger than the largest snapshot of the models known here: the server's bound (over
        # all its models) may refuse it before reading it
        largest = max(
            snapshot.max_size(shape, logits or 0) for _, shape, logits in self.exports.values()
        )
        bound = {IA} if len(data) > largest else set()
        try:
            s = snapshot.decode(data)
        except snapshot.SnapshotInvalid:
            return {IA}
        if s.model not in self.exports:  # not served, or served under another export
            return {FP} | bound
        model_id, shape, logits = self.exports[s.model]
        if s.model_id != model_id:
            return {FP} | bound
        if s.state.shape != shape or (
            s.logits is not None and s.logits.size != (logits or s.logits.size)
        ):
            return {IA}
        return ({IA} if s.position >= 1 << 63 else {OK}) | bound

    def _expect_glimpses(self, parsed: list) -> tuple[set[str], int]:
        name = ""
        for i, m in enumerate(parsed):
            if m is None:
                return {IA}, i
            if i == 0:
                errors = self._open_errors(m.model, m.session_id, "glimpse")
                name = self.live.get(m.session_id, m.model)
            else:
                errors = {IA} if (m.model and m.model != name) or m.session_id else set()
            if not _good_glimpse(m.pixels):
                errors.add(IA)
            if errors:
                return errors, i
        return {OK}, len(parsed)

    def judge(
        self,
        rpc: str,
        parsed: list,
        allowed: set[str],
        answers: int,
        code: str,
        details: str,
        out: list,
    ) -> str | None:
        if code not in allowed:
            return (
                f"{rpc} got {code} ({clip(details)!r}); documented: {' or '.join(sorted(allowed))}"
            )
        if code != OK and not details:
            return f"{rpc} got {code} with no message saying what was wrong"
        if rpc == "Generate":
            return (
                self._check_generate(parsed[0], out)
                if code == OK
                else (f"Generate failed with {code} after {len(out)} messages" if out else None)
            )
        if rpc != "ClassifyGlimpses":
            answers = int(code == OK)  # a unary call: its answer, or its status
        if len(out) != answers and not (
            code == RE and rpc == "ClassifyGlimpses" and len(out) < answers
        ):
            # (a stream refused by gRPC for a message too large may lose the answers in flight)
            return f"{rpc} answered {len(out)} messages before {code}, expected {answers}"
        if rpc == "ClassifyGlimpses":
            return self._check_glimpses(out)
        if code != OK:
            return None
        m, r = parsed[0], out[0]
        if rpc == "ListModels" and [x.name for x in r.models] != sorted(self.target.models):
            return f"ListModels listed {[x.name for x in r.models]}"
        if rpc == "CreateSession" and (r.model != m.model or len(r.session_id) < 16):
            return f"CreateSession answered {r}"
        if rpc == "Score":
            return self._check_score(m, r)
        if rpc in SESSION_RPCS or rpc == "RestoreSession":
            return self._check_session(rpc, m, r)
        return None

    def _check_session(self, rpc: str, m, r) -> str | None:
        """A fuzzed session is fresh (position 0, idle); a restored one is the snapshot's."""
        if rpc == "RestoreSession":
            s = snapshot.decode(m.data)
            want = (s.model, s.position)
        else:
            want = (self.live[m.session_id], 0)
        got = (r.model, r.position)
        if rpc == "SnapshotSession":
            s = snapshot.decode(r.data)
            if (s.model, s.position) != want:
                return f"SnapshotSession's data says {(s.model, s.position)}, expected {want}"
        elif rpc == "GetSession" and (
            r.session_id != m.session_id or r.in_use or r.idle_timeout_seconds < 1
        ):
            return f"GetSession answered {r}"
        elif rpc in ("ForkSession", "RestoreSession") and (
            r.session_id in (getattr(m, "session_id", ""), "") or r.in_use
        ):
            return f"{rpc} answered {r}"
        return None if got == want else f"{rpc} answered model and position {got}, expected {want}"

    @staticmethod
    def _check_score(m, r) -> str | None:
        n = len(m.text)
        if (
            r.num_chars != n
            or not 0 <= r.unknown_chars <= n
            or len(r.bits) != (n if m.per_char else 0)
        ):
            return (
                f"Score of {n} characters (per_char={m.per_char}) answered {r.num_chars} "
                f"characters, {r.unknown_chars} unknown, {len(r.bits)} bits"
            )
        if not (
            math.isfinite(r.total_bits)
            and r.total_bits >= 0
            and math.isclose(r.bits_per_char, r.total_bits / n)
        ):
            return (
                f"Score answered total_bits {r.total_bits}, bits_per_char {r.bits_per_char} "
                f"for {n} characters"
            )
        if m.per_char and not math.isclose(sum(r.bits), r.total_bits, rel_tol=1e-4, abs_tol=1e-3):
            return f"Score's bits sum to {sum(r.bits)}, not total_bits {r.total_bits}"
        return None

    def _check_generate(self, m, out: list) -> str | None:
        text = "".join(r.text for r in out)
        reasons = [r.finish_reason for r in out]
        marker = (m.model or self.live.get(m.session_id)) in self.target.markers
        if (
            not out
            or reasons[-1] not in (pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_STOP_SEQUENCE)
            or any(reasons[:-1])
        ):
            return f"Generate's finish reasons were {reasons}"
        if reasons[-1] == pb.FINISH_REASON_LENGTH and len(text) != m.max_chars:
            return (
                f"Generate made {len(text)} characters ({text!r}) with FINISH_REASON_LENGTH, "
                f"max_chars {m.max_chars}"
            )
        stopped = any(text.endswith(s) for s in m.stop) or (marker and len(text) < m.max_chars)
        if reasons[-1] == pb.FINISH_REASON_STOP_SEQUENCE and not (
            len(text) <= m.max_chars and stopped
        ):
            return f"Generate stopped at {text!r}, stop strings {list(m.stop)}"
        bits = [b for r in out for b in r.bits]
        want = (
            {len(text), len(text) + marker} if m.logprobs else {0}
        )  # the marker has bits, no text
        if len(bits) not in want or not all(math.isfinite(b) and b >= 0 for b in bits):
            return (
                f"Generate returned {len(bits)} bits {bits[:8]} for {len(text)} characters "
                f"(logprobs={m.logprobs})"
            )
        return None

    @staticmethod
    def _check_glimpses(out: list) -> str | None:
        for i, r in enumerate(out):
            p = np.asarray(r.probabilities)
            if (
                r.step != i + 1
                or not len(p)
                or not np.isfinite(p).all()
                or abs(p.sum() - 1) > 1e-4
                or r.predicted_class != int(np.argmax(p))
            ):
                return (
                    f"glimpse {i + 1} answered step {r.step}, class {r.predicted_class}, "
                    f"probabilities {p}"
                )
        return None
