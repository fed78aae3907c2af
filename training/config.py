"""The training config: one dataclass, read from a TOML file and `key=value` overrides.

An experiment is one TOML file (configs/, one per row of the paper's tables). Top-level keys are
TrainConfig's fields; `[model]` holds ModelConfig fields (the architecture: core, hidden_size,
num_layers, depth, outer_activation; the task's data supplies kind, vocab_size, input_size and
num_classes); `[optimizer]` holds OptimizerConfig's. Every value can be overridden on the
command line as `key=value`, nested ones with a dotted key (`model.hidden_size=128`,
`optimizer.lr=0.001`). Unknown keys and values of the wrong type are errors that list what is
allowed; nothing is ignored silently.

The config travels with the weights: checkpoints hold `TrainConfig.to_dict()`, and a resumed
run must match it except for the run-control keys in `RESUMABLE`.
"""

from __future__ import annotations

import difflib
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

from training.model_config import ModelConfig  # not training.models: no torch here

TASKS = ("ptb", "text8", "poems", "mnist")
OPTIMIZERS = ("adam", "rmsprop")
SCHEDULES = ("constant", "linear")
# What the task's data decides; a config may repeat it (it must agree) but need not.
DATA_MODEL_KEYS = ("kind", "vocab_size", "input_size", "num_classes")
# Keys a resumed run may change: they steer the run, not what it computes.
RESUMABLE = (
    "epochs",
    "max_steps",
    "device",
    "data_dir",
    "cache_dir",
    "eval_every",
    "checkpoint_every",
    "cuda_graphs",
)


@dataclass
class OptimizerConfig:
    name: str = "adam"  # "adam" or "rmsprop"
    lr: float = 0.002  # learning rate (at step 0 with a schedule)
    # "constant" (the paper's runs) or "linear": from lr at the first step down to lr_final at
    # the last one (epochs x batches per epoch), a pure function of the step
    schedule: str = "constant"
    lr_final: float = 0.0  # the linear schedule's last learning rate
    alpha: float = 0.9  # rmsprop only: decay of the running mean of squared gradients
    eps: float = 1e-8  # added to the denominator of both optimizers' update


@dataclass
class TrainConfig:
    task: str = "ptb"  # ptb | text8 | poems | mnist (training.data.load's task names)
    # ModelConfig fields (core, hidden_size, num_layers, depth, outer_activation); the data fills
    # kind, vocab_size, input_size and num_classes (set them only to have them checked)
    model: dict[str, Any] = field(default_factory=dict)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    epochs: int = 1  # passes over the training split
    batch_size: int = 32  # rows (streams) or items (poems, images) per step, over all DDP ranks
    seq_len: int = 100  # ptb/text8: truncated-BPTT window (characters per row per step)
    clip: float = 1.0  # max global gradient norm; 0 disables clipping
    seed: int = 0  # model initialisation, shuffling order (poems, mnist), RNGs
    carry_state: bool = True  # ptb/text8: start each batch from the previous one's final state
    bf16: bool = False  # bfloat16 autocast for the forward pass (the NLSTM recurrence stays fp32)
    device: str = "auto"  # auto (cuda if available) | cpu | cuda | cuda:N
    # nlstm core on CUDA: replay the fused sequence as captured CUDA graphs (the same function,
    # without the per-kernel launch cost; training.nlstm_graphs). Ignored on the CPU.
    cuda_graphs: bool = False
    eval_every: int = 0  # also evaluate every N steps (0: only at the end of each epoch)
    checkpoint_every: int = 200  # also write last.pt every N steps (0: only when evaluating)
    max_steps: int = 0  # stop after N optimizer steps in all (0: run every epoch)
    max_train_items: int = 0  # use only the first N characters / poems / images of train (0: all)
    max_eval_items: int = 0  # same for valid and test (0: all)
    data_dir: str = ""  # raw data folder ("" = $NLSTM_DATA_DIR or ~/.cache/nlstm/raw)
    cache_dir: str = ""  # prepared data folder ("" = $NLSTM_CACHE_DIR or ~/.cache/nlstm/prepared)
    # Start from the weights of this checkpoint (another run's best.pt or last.pt) instead of a
    # fresh initialisation: same task, architecture and tokenizer; a fresh optimizer and
    # schedule, counted from step 0 ("" = initialise as the paper does)
    init_from: str = ""

    def __post_init__(self) -> None:
        if isinstance(self.optimizer, dict):
            self.optimizer = _build(OptimizerConfig, self.optimizer, "optimizer.")
        self.model = dict(self.model)
        validate(self)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        return _build(cls, d, "")


class ConfigError(ValueError):
    """A config file or override that is not valid: says what was wrong and what is allowed."""


# ------------------------------------------------------------------------------------- schema
def _model_types() -> dict[str, type]:
    return {f.name: type(f.default) for f in fields(ModelConfig)}


def allowed_keys() -> list[str]:
    """Every settable key, dotted for the nested sections."""
    keys = []
    for f in fields(TrainConfig):
        if f.name == "model":
            keys += [f"model.{k}" for k in _model_types()]
        elif f.name == "optimizer":
            keys += [f"optimizer.{g.name}" for g in fields(OptimizerConfig)]
        else:
            keys.append(f.name)
    return keys


def nearest_key(key: str, allowed: list[str] | None = None) -> str | None:
    """The allowed key a mistyped `key` most likely meant, or None: a section's key given
    without its section (hidden_size -> model.hidden_size), else the closest spelling, compared
    within the section (optimizer.lrr -> optimizer.lr, optimiser.lr -> optimizer.lr,
    epoch -> epochs)."""
    allowed = allowed_keys() if allowed is None else allowed
    sections: dict[str, list[str]] = {}
    for k in allowed:
        head, dot, rest = k.partition(".")
        if dot:
            sections.setdefault(head, []).append(rest)
    top = [k for k in allowed if "." not in k]
    leaves = {rest: f"{head}.{rest}" for head, rests in sections.items() for rest in rests}

    def close(word: str, words: list[str], cutoff: float = 0.7) -> str | None:
        found = difflib.get_close_matches(word, words, n=1, cutoff=cutoff)
        return found[0] if found else None

    head, dot, rest = key.partition(".")
    if not dot:
        if key in leaves:
            return leaves[key]
        near = close(key, top) or close(key, list(leaves), 0.75)
        return leaves.get(near, near) if near else None
    section = head if head in sections else close(head, list(sections))
    if section is None:
        return head if head in top else None
    near = rest if rest in sections[section] else close(rest, sections[section])
    return f"{section}.{near}" if near else None


def unknown_key_error(key: str, allowed: list[str] | None = None) -> ConfigError:
    """The error for an unknown key: the nearest allowed key first, then all of them."""
    allowed = allowed_keys() if allowed is None else allowed
    near = nearest_key(key, allowed)
    hint = f" (did you mean {near}?)" if near else ""
    return ConfigError(f"unknown config key {key!r}{hint}; allowed: {', '.join(allowed)}")


def _key_type(key: str) -> type:
    """The Python type of a dotted key, or ConfigError naming the allowed keys."""
    head, _, rest = key.partition(".")
    top = get_type_hints(TrainConfig)
    if head == "model" and rest in _model_types():
        return _model_types()[rest]
    if head == "optimizer" and rest in get_type_hints(OptimizerConfig):
        return get_type_hints(OptimizerConfig)[rest]
    if not rest and head in top and head not in ("model", "optimizer"):
        return top[head]
    raise unknown_key_error(key)


def _check_type(key: str, value: Any, typ: type) -> Any:
    ok = (
        isinstance(value, bool)
        if typ is bool
        else isinstance(value, int) and not isinstance(value, bool)
        if typ is int
        else isinstance(value, (int, float)) and not isinstance(value, bool)
        if typ is float
        else isinstance(value, typ)
    )
    if not ok:
        raise ConfigError(
            f"{key} must be {_type_name(typ)}, got {value!r} ({type(value).__name__})"
        )
    return float(value) if typ is float else value


def _type_name(typ: type) -> str:
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        typ, typ.__name__
    )


def parse_value(key: str, text: str) -> Any:
    """A command-line `key=value`'s value, converted to the key's type."""
    typ = _key_type(key)
    if typ is bool:
        low = text.strip().lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
    elif typ is int:
        try:
            return int(text)
        except ValueError:
            pass
    elif typ is float:
        try:
            return float(text)
        except ValueError:
            pass
    else:
        return text
    raise ConfigError(f"{key} must be {_type_name(typ)}, got {text!r}")


def _build(cls, d: dict[str, Any], prefix: str):
    if not isinstance(d, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a table, got {d!r}")
    hints = get_type_hints(cls)
    kwargs = {}
    for key, value in d.items():
        if key not in hints:
            raise unknown_key_error(prefix + key)
        if cls is TrainConfig and key == "model":
            if not isinstance(value, dict):
                raise ConfigError(f"model must be a table of ModelConfig fields, got {value!r}")
            for k, v in value.items():
                _check_type(f"model.{k}", v, _key_type(f"model.{k}"))
            kwargs[key] = dict(value)
        elif cls is TrainConfig and key == "optimizer":
            kwargs[key] = _build(OptimizerConfig, value, "optimizer.")
        else:
            kwargs[key] = _check_type(prefix + key, value, hints[key])
    return cls(**kwargs)


def validate(c: TrainConfig) -> None:
    """Value checks beyond types; each error says what is allowed."""
    if not c.task:
        raise ConfigError("task must be set: one of " + ", ".join(TASKS))
    if c.optimizer.name not in OPTIMIZERS:
        raise ConfigError(f"optimizer.name must be one of {OPTIMIZERS}, got {c.optimizer.name!r}")
    if not c.optimizer.lr > 0:
        raise ConfigError(f"optimizer.lr must be > 0, got {c.optimizer.lr}")
    if not 0.0 <= c.optimizer.alpha < 1.0:
        raise ConfigError(f"optimizer.alpha must be in [0, 1), got {c.optimizer.alpha}")
    if not c.optimizer.eps > 0:
        raise ConfigError(f"optimizer.eps must be > 0, got {c.optimizer.eps}")
    if c.optimizer.schedule not in SCHEDULES:
        raise ConfigError(
            f"optimizer.schedule must be one of {SCHEDULES}, got {c.optimizer.schedule!r}"
        )
    if not 0 <= c.optimizer.lr_final <= c.optimizer.lr:
        raise ConfigError(
            f"optimizer.lr_final must be in [0, optimizer.lr = {c.optimizer.lr}], got "
            f"{c.optimizer.lr_final}"
        )
    for name in ("epochs", "batch_size", "seq_len"):
        if getattr(c, name) < 1:
            raise ConfigError(f"{name} must be >= 1, got {getattr(c, name)}")
    counts = ("eval_every", "checkpoint_every", "max_steps", "max_train_items", "max_eval_items")
    for name in counts:
        if getattr(c, name) < 0:
            raise ConfigError(f"{name} must be >= 0 (0 = off), got {getattr(c, name)}")
    if c.clip < 0:
        raise ConfigError(f"clip must be >= 0 (0 = no clipping), got {c.clip}")
    dev = c.device
    if not (dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())):
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {dev!r}")
    types = _model_types()
    for k, v in c.model.items():
        if k not in types:
            raise unknown_key_error(f"model.{k}", ["model." + t for t in types])
        _check_type(f"model.{k}", v, types[k])
    # The model's own checks now, not after the data has loaded (vocab_size comes from the data)
    try:
        ModelConfig(**{"vocab_size": 1, **c.model})
    except ValueError as exc:
        raise ConfigError(f"[model]: {exc}") from None


# ---------------------------------------------------------------------------------- loading
def apply_overrides(d: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`key=value` strings applied to a plain config dict (a copy comes back)."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in d.items()}
    for item in overrides:
        key, eq, text = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise ConfigError(
                f"override {item!r} is not key=value (e.g. optimizer.lr=0.001 or epochs=2)"
            )
        value = parse_value(key, text)
        head, _, rest = key.partition(".")
        if rest:
            out.setdefault(head, {})[rest] = value
        else:
            out[key] = value
    return out


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """The TrainConfig of a TOML file (None: the defaults) with `key=value` overrides applied."""
    d: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            with path.open("rb") as f:
                d = tomllib.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"config file not found: {path}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    d = apply_overrides(d, list(overrides or []))
    try:
        config = TrainConfig.from_dict(d)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}" if path is not None else str(exc)) from None
    if config.task not in TASKS:
        raise ConfigError(f"task must be one of {', '.join(TASKS)}, got {config.task!r}")
    return config


def config_differences(a: TrainConfig, b: TrainConfig, ignore=RESUMABLE) -> list[str]:
    """Dotted keys whose values differ between two configs (other than `ignore`)."""
    fa, fb = flatten(a.to_dict()), flatten(b.to_dict())
    return sorted(k for k in set(fa) | set(fb) if k not in ignore and fa.get(k) != fb.get(k))


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def model_config_for(
    config: TrainConfig, vocab_size: int, num_classes: int | None, kind
) -> ModelConfig:
    """The ModelConfig of a run: the config's [model] section completed by the task's data.

    `kind` is the prepared data's kind: a training.tasks.TaskKind, or its name ("stream",
    "sequences", "glimpses"; looked up in training.tasks, which imports torch).
    """
    if isinstance(kind, str):
        from training.tasks import task_kind

        kind = task_kind(kind)
    derived: dict[str, Any] = kind.model_fields(vocab_size, num_classes)
    for k, v in derived.items():
        if k in config.model and config.model[k] != v:
            raise ConfigError(
                f"model.{k} = {config.model[k]!r} disagrees with the {config.task} data ({v!r}); "
                f"leave model.{k} unset and the data supplies it"
            )
    return ModelConfig(**{**config.model, **derived})


__all__ = [
    "RESUMABLE",
    "TASKS",
    "ConfigError",
    "OptimizerConfig",
    "TrainConfig",
    "allowed_keys",
    "apply_overrides",
    "config_differences",
    "flatten",
    "load_config",
    "model_config_for",
    "nearest_key",
    "parse_value",
    "unknown_key_error",
]
