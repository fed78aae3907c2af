"""The HTTP/JSON front's conversions (serving/http.py): request bodies to the protobuf
requests the gRPC calls get, responses to JSON, server-sent events, and the gRPC status codes'
HTTP statuses. Names follow the KServe Open Inference Protocol v2 and its generate extension
(docs/http.md). No aiohttp here.
"""

from __future__ import annotations

import json

import numpy as np
from google.protobuf import json_format

from serving.api.nlstm.v1 import inference_pb2 as pb
from serving.errors import ServingError
from serving.formats import image_to_glimpses

# gRPC status code name -> HTTP status. RESOURCE_EXHAUSTED is 429 (a limit or a quota: retry
# later or ask for less); a body over the receive limit is 413 before anything is parsed.
HTTP_STATUS = {
    "INVALID_ARGUMENT": 400,
    "OUT_OF_RANGE": 400,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "ABORTED": 409,
    "ALREADY_EXISTS": 409,
    "FAILED_PRECONDITION": 412,
    "RESOURCE_EXHAUSTED": 429,
    "CANCELLED": 499,
    "UNIMPLEMENTED": 501,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}
FINISH = {  # FinishReason -> the generate extension's finish_reason
    pb.FINISH_REASON_UNSPECIFIED: "",
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_STOP_SEQUENCE: "stop",
    pb.FINISH_REASON_CANCELLED: "cancelled",
}
# the generate extension's names -> GenerateRequest's fields
GENERATE_PARAMETERS = {
    "max_tokens": "max_chars",
    "temperature": "temperature",
    "top_k": "top_k",
    "top_p": "top_p",
    "seed": "seed",
    "stop": "stop",
    "logprobs": "logprobs",
    "session_id": "session_id",
}
DEFAULT_MAX_TOKENS = 100  # when a generate body gives none (gRPC's max_chars has no default)
GENERATE_NAMES = {"max_chars": "max_tokens", "prompt": "text_input"}  # in the engine's messages


class HttpError(Exception):
    """An answer other than 200, with its JSON error message; `code`: the gRPC code it stands
    for (for the metrics)."""

    def __init__(self, status: int, message: str, code: str = "INVALID_ARGUMENT") -> None:
        super().__init__(message)
        self.status, self.code = status, code


def from_serving(exc: ServingError, names: dict[str, str] | None = None) -> HttpError:
    message = str(exc)
    for old, new in (names or {}).items():
        message = message.replace(old, new)
    return HttpError(HTTP_STATUS.get(exc.code, 500), message, exc.code)


# ------------------------------------------------------------------------------------ JSON
def session_json(s: pb.Session) -> dict:
    return {
        "session_id": s.session_id,
        "model": s.model,
        "position": s.position,
        "idle_timeout_seconds": s.idle_timeout_seconds,
        "in_use": s.in_use,
    }


def model_json(m: pb.ModelInfo) -> dict:
    """KServe's model metadata (name, versions, platform) and what ListModels says of it."""
    return {
        "name": m.name,
        "versions": [],
        "platform": "onnxruntime",
        "task": m.task,
        "kind": m.kind,
        "vocab_size": m.vocab_size,
        "num_classes": m.num_classes,
        "metrics": dict(m.metrics),
        "depth": m.depth,
        "num_layers": m.num_layers,
        "hidden_size": m.hidden_size,
    }


def score_json(name: str, r: pb.ScoreResponse) -> dict:
    return {
        "model_name": name,
        "bits_per_char": r.bits_per_char,
        "total_bits": r.total_bits,
        "num_chars": r.num_chars,
        "unknown_chars": r.unknown_chars,
        "position": r.position,
        "bits": list(r.bits),
        "boundaries": list(r.boundaries),
    }


def glimpse_json(r: pb.GlimpseResponse) -> dict:
    return {
        "step": r.step,
        "probabilities": list(r.probabilities),
        "predicted_class": r.predicted_class,
        "position": r.position,
    }


def parse_message(body: dict, message, what: str, names: dict[str, str] | None = None):
    """json_format.ParseDict with the error said in the HTTP names."""
    try:
        return json_format.ParseDict(body, message)
    except json_format.ParseError as exc:
        text = str(exc)
        for old, new in (names or {}).items():
            text = text.replace(old, new)
        raise HttpError(400, f"{what}: {text}") from None


def check_fields(body: dict, allowed: set[str], what: str) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise HttpError(
            400,
            f"{what}: unknown field(s) {', '.join(map(repr, unknown))}; "
            f"allowed: {', '.join(sorted(allowed))}",
        )


def generate_request(name: str, body: dict) -> pb.GenerateRequest:
    """The GenerateRequest of a generate extension body: {"text_input", "parameters": {...}}."""
    check_fields(body, {"text_input", "parameters"}, "the body")
    params = body.get("parameters") or {}
    if not isinstance(params, dict):
        raise HttpError(400, "parameters must be a JSON object")
    check_fields(params, set(GENERATE_PARAMETERS), "parameters")
    message = {GENERATE_PARAMETERS[k]: v for k, v in params.items() if v is not None}
    message.setdefault("max_chars", DEFAULT_MAX_TOKENS)
    if not isinstance(message.get("stop", []), list):  # ParseDict would take a string's characters
        raise HttpError(400, "parameters.stop must be a list of strings")
    message["model"] = name
    message["prompt"] = body.get("text_input", "")
    return parse_message(message, pb.GenerateRequest(), "generate", GENERATE_NAMES)


def glimpse_requests(name: str, body: dict) -> list[pb.GlimpseRequest]:
    """The ClassifyGlimpses messages of {"glimpses": [[49 floats], ...]} or {"image": 28 rows
    of 28 floats in [0, 1]}, with an optional "session_id"."""
    check_fields(body, {"glimpses", "image", "session_id"}, "the body")
    if ("glimpses" in body) == ("image" in body):
        raise HttpError(
            400,
            'give either "glimpses" (a list of 49-float lists) or "image" (28 rows of 28 '
            "floats in [0, 1]), not both or neither",
        )
    try:
        if "image" in body:
            glimpses = image_to_glimpses(np.asarray(body["image"], dtype=np.float32)).tolist()
        else:
            glimpses = body["glimpses"]
            if not isinstance(glimpses, list) or not glimpses:
                raise ValueError("glimpses must be a non-empty list of 49-float lists")
    except (ValueError, TypeError) as exc:
        raise HttpError(400, str(exc)) from None
    session = body.get("session_id", "")
    if not isinstance(session, str):
        raise HttpError(400, "session_id must be a string")
    out = []
    for i, g in enumerate(glimpses):
        first = {"model": name, "session_id": session} if i == 0 else {}
        out.append(parse_message({**first, "pixels": g}, pb.GlimpseRequest(), f"glimpse {i}"))
    return out


def sse(data: dict, event: str | None = None) -> bytes:
    """One server-sent event (JSON on one line, so one data: field)."""
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def json_object(raw: bytes) -> dict:
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HttpError(400, f"the body is not valid JSON ({exc}); send a JSON object") from None
    if not isinstance(data, dict):
        raise HttpError(400, f"the body must be a JSON object, got {type(data).__name__}")
    return data
