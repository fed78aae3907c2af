"""serving/requests.py: each request object is built from its protobuf request and checked
there, with the status code and message the client gets (no server: the tests of the served
calls are in test_server.py, test_hardening.py and test_fuzz.py)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from serving.api.nlstm.v1 import inference_pb2 as pb
from serving.errors import InvalidArgument, ResourceExhausted
from serving.limits import Limits
from serving.requests import GenerateParams, GlimpseParams, ScoreParams

LIMITS = Limits(max_chars=50, max_text=20, max_stop=2, max_stop_chars=4)


def test_generate_params_carry_every_field():
    r = pb.GenerateRequest(
        model="m",
        session_id="s",
        prompt="the",
        max_chars=7,
        temperature=0.5,
        top_k=3,
        top_p=0.9,
        seed=11,
        stop=["x", "yz"],
        logprobs=True,
    )
    p = GenerateParams.from_pb(r, LIMITS)
    assert p == GenerateParams(
        "m", "s", "the", 7, 0.5, 3, pytest.approx(0.9), 11, ("x", "yz"), True
    )
    # proto defaults: greedy, no top-k or top-p, a random seed, no stop strings
    p = GenerateParams.from_pb(pb.GenerateRequest(model="m", max_chars=1), LIMITS)
    assert (p.temperature, p.top_k, p.top_p, p.seed, p.stop, p.logprobs) == (
        0.0,
        0,
        0.0,
        None,
        (),
        False,
    )
    assert (
        GenerateParams.from_pb(pb.GenerateRequest(max_chars=1, seed=0), LIMITS).seed == 0
    )  # 0 is a seed
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.max_chars = 2


@pytest.mark.parametrize(
    "fields, error, message",
    [
        ({"max_chars": 0}, InvalidArgument, "max_chars must be in [1, 50], got 0"),
        ({"max_chars": 51}, InvalidArgument, "max_chars must be in [1, 50], got 51"),
        (
            {"temperature": -1.0},
            InvalidArgument,
            "temperature must be a finite number >= 0 (0 = greedy), got -1.0",
        ),
        ({"temperature": math.nan}, InvalidArgument, "temperature must be a finite number >= 0"),
        ({"top_p": 1.5}, InvalidArgument, "top_p must lie in [0, 1] (0 or 1 = off), got 1.5"),
        (
            {"stop": ["a", "b", "c"]},
            InvalidArgument,
            "stop takes at most 2 non-empty strings, got 3",
        ),
        (
            {"stop": ["a", ""]},
            InvalidArgument,
            "stop takes at most 2 non-empty strings, got 2 including an empty one",
        ),
        (
            {"stop": ["abcde"]},
            InvalidArgument,
            "a stop string has 5 characters; this server allows at most 4 per stop",
        ),
        (
            {"prompt": "x" * 21},
            ResourceExhausted,
            "prompt has 21 characters; at most 20 are allowed",
        ),
    ],
)
def test_generate_params_refuse_what_the_limits_do_not_allow(fields, error, message):
    request = pb.GenerateRequest(**{"model": "m", "max_chars": 5, **fields})
    with pytest.raises(error) as info:
        GenerateParams.from_pb(request, LIMITS)
    assert str(info.value).startswith(message)
    assert info.value.code == error.code


def test_generate_params_at_the_limits_pass():
    r = pb.GenerateRequest(
        max_chars=50, prompt="x" * 20, stop=["abcd", "e"], temperature=0.0, top_p=1.0
    )
    assert GenerateParams.from_pb(r, LIMITS).max_chars == 50
    # built directly (the local backend, tests), check() applies the same rules
    with pytest.raises(InvalidArgument, match="max_chars must be in"):
        GenerateParams("m", "", "", 0).check(LIMITS)


def test_score_params():
    p = ScoreParams.from_pb(
        pb.ScoreRequest(model="m", session_id="s", text="the cat", per_char=True), LIMITS
    )
    assert p == ScoreParams("m", "s", "the cat", True)
    with pytest.raises(InvalidArgument, match=r"^text must not be empty$"):
        ScoreParams.from_pb(pb.ScoreRequest(model="m"), LIMITS)
    with pytest.raises(
        ResourceExhausted, match=r"^text has 21 characters; this server scores at most 20 per call$"
    ):
        ScoreParams.from_pb(pb.ScoreRequest(model="m", text="x" * 21), LIMITS)
    assert ScoreParams.from_pb(pb.ScoreRequest(text="x" * 20), LIMITS).text == "x" * 20


def test_glimpse_params():
    pixels = np.linspace(0, 1, 49, dtype=np.float32)
    g = GlimpseParams.from_pb(pb.GlimpseRequest(model="m", session_id="s", pixels=pixels.tolist()))
    assert (g.model, g.session_id) == ("m", "s")
    assert g.pixels.dtype == np.float32 and g.pixels.shape == (49,)
    np.testing.assert_array_equal(g.pixels, pixels)


@pytest.mark.parametrize(
    "pixels, message",
    [
        ([0.5] * 48, "got 48 values"),
        ([0.5] * 50, "got 50 values"),
        ([], "got 0 values"),
        ([0.5] * 48 + [math.nan], "got 49 values with NaN or infinity"),
        ([0.5] * 48 + [math.inf], "got 49 values with NaN or infinity"),
        ([0.5] * 48 + [1.01], "got 49 values"),
        ([-0.01] + [0.5] * 48, "got 49 values"),
    ],
)
def test_glimpse_params_refuse_a_bad_glimpse(pixels, message):
    with pytest.raises(InvalidArgument) as info:
        GlimpseParams.from_pb(pb.GlimpseRequest(model="m", pixels=pixels))
    assert str(info.value) == f"a glimpse is 49 finite floats in [0, 1] (7x7, row-major); {message}"


def test_a_later_glimpse_names_no_model_or_session():
    later = GlimpseParams.from_pb(pb.GlimpseRequest(pixels=[0.0] * 49))
    later.follows("m")
    GlimpseParams.from_pb(pb.GlimpseRequest(model="m", pixels=[0.0] * 49)).follows(
        "m"
    )  # its own model: allowed
    for request in (
        pb.GlimpseRequest(model="other", pixels=[0.0] * 49),
        pb.GlimpseRequest(session_id="s", pixels=[0.0] * 49),
    ):
        with pytest.raises(
            InvalidArgument,
            match=r"^model and session_id go on the first message of a stream only$",
        ):
            GlimpseParams.from_pb(request).follows("m")
