"""The calls' requests as the domain sees them: one typed, frozen object per rpc.

Each is built once from its protobuf request by `from_pb`, which checks it against the
engine's limits (serving.limits.Limits) and raises the domain's errors (serving/errors.py:
INVALID_ARGUMENT for a value outside what is allowed, RESOURCE_EXHAUSTED for a text longer
than this server takes), with messages that say what is allowed. The servicer builds them,
the engine takes them (TGI's `batch_type.from_pb`), and nothing below asks which positional
argument is which. What depends on the server's state (does the model exist, is it the
session's, is the session free) is checked when the engine opens the call (`Engine._open`).

No gRPC here (the protobuf messages only), no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from serving.api.nlstm.v1 import inference_pb2 as pb
from serving.errors import InvalidArgument, ResourceExhausted
from serving.formats import GLIMPSE_SIZE
from serving.limits import Limits
from serving.sampling import check_sampling


@dataclass(frozen=True)
class GenerateParams:
    """One Generate call. Built directly (the local backend, tests), it is checked by
    `check`; `from_pb` does both."""

    model: str  # "" with a session: the session's model
    session_id: str  # "": a fresh state, nothing kept
    prompt: str
    max_chars: int
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 0.0  # 0 or 1: off
    seed: int | None = None  # None: a random one
    stop: tuple[str, ...] = ()
    logprobs: bool = False  # each character's bits too

    @classmethod
    def from_pb(cls, request: pb.GenerateRequest, limits: Limits) -> GenerateParams:
        params = cls(
            model=request.model,
            session_id=request.session_id,
            prompt=request.prompt,
            max_chars=request.max_chars,
            temperature=request.temperature,
            top_k=request.top_k,
            top_p=request.top_p,
            seed=request.seed if request.HasField("seed") else None,
            stop=tuple(request.stop),
            logprobs=request.logprobs,
        )
        params.check(limits)
        return params

    def check(self, limits: Limits) -> None:
        if not 1 <= self.max_chars <= limits.max_chars:
            raise InvalidArgument(
                f"max_chars must be in [1, {limits.max_chars}], got {self.max_chars}"
            )
        try:
            check_sampling(self.temperature, self.top_k, self.top_p)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        stop = self.stop
        if len(stop) > limits.max_stop or any(not s for s in stop):
            raise InvalidArgument(
                f"stop takes at most {limits.max_stop} non-empty strings, got {len(stop)}"
                + (" including an empty one" if any(not s for s in stop) else "")
            )
        longest = max(map(len, stop), default=0)
        if longest > limits.max_stop_chars:
            raise InvalidArgument(
                f"a stop string has {longest} characters; this server allows at most "
                f"{limits.max_stop_chars} per stop string"
            )
        if len(self.prompt) > limits.max_text:
            raise ResourceExhausted(
                f"prompt has {len(self.prompt)} characters; at most {limits.max_text} are allowed"
            )


@dataclass(frozen=True)
class ScoreParams:
    """One Score call."""

    model: str  # "" with a session: the session's model
    session_id: str  # "": a fresh state, nothing kept
    text: str
    per_char: bool = False  # each character's bits and boundaries too

    @classmethod
    def from_pb(cls, request: pb.ScoreRequest, limits: Limits) -> ScoreParams:
        params = cls(
            model=request.model,
            session_id=request.session_id,
            text=request.text,
            per_char=request.per_char,
        )
        if not params.text:
            raise InvalidArgument("text must not be empty")
        if len(params.text) > limits.max_text:
            raise ResourceExhausted(
                f"text has {len(params.text)} characters; this server scores at most "
                f"{limits.max_text} per call"
            )
        return params


@dataclass(frozen=True)
class GlimpseParams:
    """One message of a ClassifyGlimpses stream: a glimpse, and on the stream's first message
    the model or session it runs on."""

    model: str
    session_id: str
    pixels: np.ndarray = field(compare=False)  # (GLIMPSE_SIZE,) float32 in [0, 1]

    @classmethod
    def from_pb(cls, request: pb.GlimpseRequest) -> GlimpseParams:
        x = np.asarray(request.pixels, dtype=np.float32)
        if x.shape != (GLIMPSE_SIZE,) or not np.isfinite(x).all() or x.min() < 0 or x.max() > 1:
            raise InvalidArgument(
                f"a glimpse is {GLIMPSE_SIZE} finite floats in [0, 1] (7x7, row-major); got "
                f"{x.size} values"
                + (
                    ""
                    if x.size != GLIMPSE_SIZE or np.isfinite(x).all()
                    else " with NaN or infinity"
                )
            )
        return cls(model=request.model, session_id=request.session_id, pixels=x)

    def follows(self, model: str) -> None:
        """Check a message after the first of a stream on `model`: it carries a glimpse only."""
        if (self.model and self.model != model) or self.session_id:
            raise InvalidArgument("model and session_id go on the first message of a stream only")
