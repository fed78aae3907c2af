"""The .proto is the API's single source: the committed generated code matches it."""

from __future__ import annotations

from serving import codegen


def test_generated_code_matches_the_proto(capsys):
    assert codegen.main(["--check"]) == 0, capsys.readouterr().out


def test_service_contract_names():
    from serving.api.nlstm.v1 import inference_pb2 as pb

    service = pb.DESCRIPTOR.services_by_name["Inference"]
    assert service.full_name == "nlstm.v1.Inference"
    methods = {m.name for m in service.methods}
    assert methods == {
        "ListModels",
        "CreateSession",
        "CloseSession",
        "GetSession",
        "SnapshotSession",
        "RestoreSession",
        "ForkSession",
        "Generate",
        "Score",
        "ClassifyGlimpses",
    }
    req = pb.GenerateRequest(model="m", max_chars=5)
    assert not req.HasField("seed")  # `optional`: unset is distinguishable from 0
    assert pb.FinishReason.Name(0) == "FINISH_REASON_UNSPECIFIED"
