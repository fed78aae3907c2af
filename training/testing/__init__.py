"""Harnesses the tests (tests/) and the benchmarks (bench/) share on the training side,
importable wherever the package is installed: tiny synthetic datasets shaped like the prepared
tasks (`data`) and tiny random exported models for the serving tests and quick benchmarks
(`models`, which needs torch). The trainer and the exporter never import them.
"""
