"""Serving side: exported-model formats, onnxruntime inference and the gRPC server. Never imports
torch."""
