"""Score's per-character boundaries for an HM-LSTM model, in process on port 0: the server's
'0'/'1' strings equal the boundaries the torch model computes over the same ids."""

from __future__ import annotations

import pytest
import torch

from serving.api.nlstm.v1 import inference_pb2 as pb
from serving.engine import Limits
from serving.formats import Tokenizer, start_id
from serving.testing.inprocess import ServerThread
from training.data.tokenizer import train_char_tokenizer
from training.export import export_model
from training.models import ModelConfig, build_model
from training.testing.models import TEXT

HM_MODEL, NLSTM_MODEL, LAYERS, H = "tiny-hmlstm", "tiny-nlstm", 3, 8
PHRASE = "the cat sat on the mat\na dog ran in the park\nwe saw"


@pytest.fixture(scope="module")
def hm_model():
    """A random 3-layer HM-LSTM char model over training.testing.models' vocabulary; its seed gives
    boundaries of both values on both detectors over PHRASE (and UPDATE, COPY and FLUSH)."""
    torch.manual_seed(0)
    tok = train_char_tokenizer(TEXT, newline=True)
    model = build_model(
        ModelConfig(
            kind="char", core="hmlstm", hidden_size=H, num_layers=LAYERS, vocab_size=tok.vocab_size
        )
    )
    return model.eval(), tok.model_proto


@pytest.fixture(scope="module")
def server(tmp_path_factory, hm_model):
    root = tmp_path_factory.mktemp("exported")
    model, tokenizer = hm_model
    export_model(model, root / HM_MODEL, task="ptb", tokenizer=tokenizer, sequence="never")
    # a model without boundary detectors beside it (an NLSTM, as training.testing.models'
    # CHAR_MODEL)
    nlstm = build_model(
        ModelConfig(
            kind="char", core="nlstm", hidden_size=H, depth=2, vocab_size=model.config.vocab_size
        )
    )
    export_model(
        nlstm.eval(), root / NLSTM_MODEL, task="ptb", tokenizer=tokenizer, sequence="never"
    )
    s = ServerThread(root, Limits(max_text=2000, max_sessions=4, max_wait=0.005))
    yield s
    s.close()


def torch_boundaries(hm_model, text: str) -> list[str]:
    """What the server feeds (the start symbol, then the text's ids), through the torch model:
    one string per layer with a detector, the boundary after each character of the text."""
    model, tokenizer = hm_model
    tok = Tokenizer.from_bytes(tokenizer)
    ids = torch.tensor([start_id(tok), *tok.encode(text).ids.tolist()]).unsqueeze(1)  # (T + 1, 1)
    with torch.no_grad():
        _, _, z, _ = model.core(ids, return_boundaries=True)  # (T + 1, 1, L - 1)
    z = z[1:, 0]  # the start step scores nothing
    return ["".join("1" if b > 0.5 else "0" for b in z[:, n].tolist()) for n in range(LAYERS - 1)]


def test_score_returns_the_models_boundaries_per_character(server, hm_model):
    r = server.stub.Score(pb.ScoreRequest(model=HM_MODEL, text=PHRASE, per_char=True))
    assert len(r.boundaries) == LAYERS - 1 and len(r.bits) == len(PHRASE)
    assert all(len(b) == len(PHRASE) and set(b) <= {"0", "1"} for b in r.boundaries)
    want = torch_boundaries(hm_model, PHRASE)
    assert list(r.boundaries) == want
    assert all(
        set(b) == {"0", "1"} for b in want
    )  # both values occur: the test can tell them apart


def test_boundaries_continue_across_a_session(server, hm_model):
    stub = server.stub
    s = stub.CreateSession(pb.CreateSessionRequest(model=HM_MODEL))
    a = stub.Score(pb.ScoreRequest(session_id=s.session_id, text=PHRASE[:17], per_char=True))
    b = stub.Score(pb.ScoreRequest(session_id=s.session_id, text=PHRASE[17:], per_char=True))
    stub.CloseSession(pb.CloseSessionRequest(session_id=s.session_id))
    assert [x + y for x, y in zip(a.boundaries, b.boundaries, strict=True)] == torch_boundaries(
        hm_model, PHRASE
    )


def test_no_boundaries_without_per_char_or_a_boundary_detector(server):
    r = server.stub.Score(pb.ScoreRequest(model=HM_MODEL, text=PHRASE))
    assert list(r.boundaries) == [] and list(r.bits) == [] and r.num_chars == len(PHRASE)
    r = server.stub.Score(pb.ScoreRequest(model=NLSTM_MODEL, text=PHRASE, per_char=True))
    assert list(r.boundaries) == [] and len(r.bits) == len(PHRASE)  # an NLSTM has no detector
