"""Harnesses the tests (tests/) and the benchmarks (bench/) share, importable wherever the
package is installed (as numpy.testing and grpc_testing are): an in-process server
(`inprocess`), `nlstm serve` and `redis-server` in their own processes (`process`), and the
gRPC fuzzer (`fuzz`, which needs hypothesis: the dev extra). The server never imports them,
and they never import torch or `training`: the tiny exported models they serve come from
training.testing.
"""
