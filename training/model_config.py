"""The model config: what a model is, as a plain dataclass that imports nothing heavy.

It lives apart from training/models.py (which re-exports it) so that reading and checking a
training config (training/config.py) needs no torch: `nlstm train` reports a bad config or
override in a fraction of a second instead of after torch's import (seconds on a busy CPU).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

TASK_KINDS = ("char", "glimpse")
CORES = ("nlstm", "lstm", "hmlstm")


@dataclass
class ModelConfig:
    """What a model is; travels with its weights in checkpoints and exports."""

    kind: str = "char"  # "char" (character language model) or "glimpse" (MNIST glimpses)
    core: str = "nlstm"  # "nlstm", "lstm" or "hmlstm"
    hidden_size: int = 600  # cells per layer (the paper's "cell size")
    num_layers: int = 1  # stacked layers
    depth: int = 2  # nesting depth of each NLSTM layer (the paper's n for NLSTM rows)
    outer_activation: str = "identity"  # NLSTM level-0 candidate activation: identity | tanh
    vocab_size: int = 0  # char models: symbols in and out
    input_size: int = 49  # glimpse models: floats per step
    num_classes: int = 10  # glimpse models: classes
    embedding_size: int = 0  # hmlstm: the output module's ReLU embedding (0: hidden_size)
    layer_norm: bool = False  # hmlstm: layer-normalise the recurrent, top-down, bottom-up terms

    def __post_init__(self) -> None:
        if self.kind not in TASK_KINDS:
            raise ValueError(f"model kind must be one of {TASK_KINDS}, got {self.kind!r}")
        if self.core not in CORES:
            raise ValueError(f"model core must be one of {CORES}, got {self.core!r}")
        if self.kind == "char" and self.vocab_size < 1:
            raise ValueError(f"a char model needs vocab_size >= 1, got {self.vocab_size}")
        for name in ("hidden_size", "num_layers", "depth", "input_size", "num_classes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.embedding_size < 0:
            raise ValueError(
                f"embedding_size must be >= 0 (0: hidden_size), got {self.embedding_size}"
            )
        if self.core != "hmlstm":
            # only the HM-LSTM's output module and core read these: refuse rather than ignore
            for name, unset in (("embedding_size", 0), ("layer_norm", False)):
                if getattr(self, name) != unset:
                    raise ValueError(
                        f"{name} is an hmlstm option (the output module's embedding, the core's "
                        f"layer normalisation); core {self.core!r} takes none: leave it unset "
                        f"({unset!r}) or use core 'hmlstm'"
                    )
        elif self.num_layers < 2:
            raise ValueError(
                "an hmlstm model needs num_layers >= 2 (its boundaries pass upward), "
                f"got {self.num_layers}"
            )

    @property
    def in_features(self) -> int:
        return self.vocab_size if self.kind == "char" else self.input_size

    @property
    def out_features(self) -> int:
        return self.vocab_size if self.kind == "char" else self.num_classes

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(
                f"unknown model config keys {sorted(unknown)}; allowed: {sorted(known)}"
            )
        return cls(**d)
