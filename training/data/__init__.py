"""Data pipelines for the paper's four tasks: PTB and text8 (characters), Chinese poems, MNIST
glimpses.

`nlstm data prepare TASK` drives `prepare`; the trainer calls `load`. One module per task
(ptb, text8, poems, mnist), plus `fetch` (raw files: URLs, checksums, atomic download), `cache`
(the prepared folders), `tokenizer` (sentencepiece char models) and `batching`. docs/data.md
records the sources, checksums, splits and counts.
"""

from training.data.batching import (
    GlimpseBatch,
    LMBatch,
    glimpse_batches,
    lm_batches,
    lm_eval_batches,
    num_batches,
    sequence_batches,
)
from training.data.fetch import ChecksumError, DownloadError
from training.data.pipeline import TASKS, Prepared, Summary, download, load, prepare
from training.data.task import GlimpseSplit, SequenceSplit, StreamSplit

__all__ = [
    "TASKS",
    "ChecksumError",
    "DownloadError",
    "GlimpseBatch",
    "GlimpseSplit",
    "LMBatch",
    "Prepared",
    "SequenceSplit",
    "StreamSplit",
    "Summary",
    "download",
    "glimpse_batches",
    "lm_batches",
    "lm_eval_batches",
    "load",
    "num_batches",
    "prepare",
    "sequence_batches",
]
