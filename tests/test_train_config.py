"""The training config (training/config.py): config files and command-line overrides, the
errors that say what is allowed, the data completing the model config, the lr schedule's
settings."""

from __future__ import annotations

import re

import pytest

from training.config import (
    ConfigError,
    TrainConfig,
    allowed_keys,
    apply_overrides,
    load_config,
    model_config_for,
)


def test_config_file_and_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(
        'task = "ptb"\nepochs = 3\nclip = 1\n[model]\ncore = "nlstm"\nhidden_size = 600\n'
        '[optimizer]\nname = "adam"\nlr = 0.002\n'
    )
    c = load_config(
        path,
        [
            "model.hidden_size=128",
            "optimizer.lr=1e-3",
            "bf16=true",
            "carry_state=no",
            "epochs=5",
            "data_dir=/x",
        ],
    )
    assert c.model == {"core": "nlstm", "hidden_size": 128}
    assert c.optimizer.lr == 0.001 and c.bf16 is True and c.carry_state is False
    assert c.epochs == 5 and c.clip == 1.0 and isinstance(c.clip, float) and c.data_dir == "/x"
    assert TrainConfig.from_dict(c.to_dict()) == c


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "optimizer.lrr=1",
            r"unknown config key 'optimizer.lrr' \(did you mean optimizer.lr\?\); "
            r"allowed: .*optimizer.lr",
        ),
        (
            "hidden_size=64",
            r"unknown config key 'hidden_size' \(did you mean model.hidden_size\?\)",
        ),
        ("model.hiden_size=64", r"'model.hiden_size' \(did you mean model.hidden_size\?\)"),
        ("model.cells=3", "unknown config key 'model.cells'; allowed: .*model.hidden_size"),
        (
            "epoch=3",
            r"unknown config key 'epoch' \(did you mean epochs\?\); allowed: task, .*epochs",
        ),
        ("epochs.x=3", "unknown config key 'epochs.x'"),
        ("epochs=two", "epochs must be an integer, got 'two'"),
        ("optimizer.lr=fast", "optimizer.lr must be a number"),
        ("bf16=maybe", "bf16 must be true or false"),
        ("model.hidden_size=1.5", "model.hidden_size must be an integer"),
        ("epochs", "is not key=value"),
        ("optimizer.name=sgd", "optimizer.name must be one of \\('adam', 'rmsprop'\\)"),
        ("optimizer.lr=0", "optimizer.lr must be > 0"),
        ("batch_size=0", "batch_size must be >= 1"),
        ("clip=-1", "clip must be >= 0"),
        ("device=tpu", "device must be auto, cpu, cuda or cuda:N"),
        ("task=wiki", "task must be one of ptb, text8, poems, mnist"),
    ],
)
def test_bad_overrides_say_what_is_allowed(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_bad_config_files(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("epochs = [\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
    bad.write_text('epochs = "3"\n')
    with pytest.raises(
        ConfigError, match=re.escape("bad.toml: epochs must be an integer, got '3'")
    ):
        load_config(bad)
    bad.write_text("[model]\nwidth = 3\n")
    with pytest.raises(ConfigError, match=re.escape("unknown config key 'model.width'")):
        load_config(bad)
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_config(tmp_path / "missing.toml")


def test_the_data_completes_the_model_config():
    c = TrainConfig(task="ptb", model={"hidden_size": 8})
    mc = model_config_for(c, 51, None, "stream")
    assert mc.kind == "char" and mc.vocab_size == 51 and mc.hidden_size == 8
    mc = model_config_for(TrainConfig(task="mnist"), 0, 10, "glimpses")
    assert mc.kind == "glimpse" and mc.num_classes == 10
    with pytest.raises(
        ConfigError, match=re.escape("model.vocab_size = 50 disagrees with the ptb data")
    ):
        model_config_for(TrainConfig(task="ptb", model={"vocab_size": 50}), 51, None, "stream")


def test_allowed_keys_and_overrides_on_dicts():
    keys = allowed_keys()
    assert "model.hidden_size" in keys and "optimizer.alpha" in keys and "max_steps" in keys
    d = apply_overrides({"model": {"core": "lstm"}}, ["model.num_layers=2", "seed=7"])
    assert d == {"model": {"core": "lstm", "num_layers": 2}, "seed": 7}


def test_schedule_settings_are_checked():
    with pytest.raises(
        ConfigError, match=r"optimizer.schedule must be one of \('constant', 'linear'\)"
    ):
        TrainConfig(task="ptb", optimizer={"schedule": "cosine"})
    with pytest.raises(
        ConfigError, match=r"optimizer.lr_final must be in \[0, optimizer.lr = 0.002\]"
    ):
        TrainConfig(task="ptb", optimizer={"schedule": "linear", "lr_final": 0.01})
