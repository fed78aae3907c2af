"""Training side of the project: models (torch only), data pipelines, trainer, exporter.

Importing this package imports nothing heavy: the `nlstm` command lives here and its serving
subcommands must run in a process that never loads torch.
"""
