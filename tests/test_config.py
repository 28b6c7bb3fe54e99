"""Config files and overrides: defaults, help text, unknown keys and wrong types name the key."""

import dataclasses

import pytest

from fedtt.config import ConfigError, RunConfig, describe, load_config, sections, to_toml


def write(tmp_path, text):
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def test_every_field_has_help_and_default():
    text = describe()
    for section, kind in sections().items():
        for f in dataclasses.fields(kind):
            assert f.metadata.get("help"), f"{section}.{f.name} has no help"
            assert f"  {f.name} = " in text


def test_file_and_overrides_apply_in_order(tmp_path):
    path = write(tmp_path, '[federation]\nrounds = 4\n[method]\nname = "lora"\n')
    cfg = load_config(path, ["federation.rounds=7", 'adapter.targets=["a$", "b$"]'])
    assert cfg.federation.rounds == 7 and cfg.method.name == "lora"
    assert cfg.adapter.targets == ["a$", "b$"]


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["training.lr=0.02", 'model.name="arch:tiny-bert"'])
    again = load_config(write(tmp_path, to_toml(cfg)))
    assert again == cfg


@pytest.mark.parametrize("text, key", [
    ("[federation]\nround = 3\n", "federation.round"),
    ("[fedration]\nrounds = 3\n", "[fedration]"),
    ('[federation]\nrounds = "three"\n', "federation.rounds"),
    ("[training]\nlr = true\n", "training.lr"),
    ("[adapter]\ntargets = [1, 2]\n", "adapter.targets"),
    ("[output]\nplots = 1\n", "output.plots"),
    ("[adapter]\nrank = 0\n", "adapter.rank"),
    ("[data]\nalpha = 0.0\n", "data.alpha"),
    ("[data]\npartition = \"random\"\n", "data.partition"),
    ("[federation]\nnum_clients = 0\n", "federation.num_clients"),
    ("[adapter]\nhead = \"drop\"\n", "adapter.head"),
    ("[fedtt]\naggregation = \"median\"\n", "fedtt.aggregation"),
])
def test_bad_config_names_the_key(tmp_path, text, key):
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace(".", r"\.")):
        load_config(write(tmp_path, text))


@pytest.mark.parametrize("override", ["rounds=3", "federation.rounds", "nope.x=1"])
def test_bad_overrides(override):
    with pytest.raises(ConfigError):
        load_config(None, [override])


def test_missing_file_and_bad_toml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "none.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "[federation\n"))


def test_int_accepted_where_float_expected():
    assert load_config(None, ["training.lr=1"]).training.lr == 1.0


def test_cross_device_sample_size():
    cfg = load_config(None, ['federation.mode="cross-device"', "federation.num_clients=1000"])
    assert cfg.clients_per_round() == 100
    assert RunConfig().clients_per_round() == 3


def test_version_names_fedtt_and_the_stack_it_runs_on(capsys):
    import importlib.metadata as md

    from fedtt.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"fedtt {md.version('fedtt')} (")
    assert f"torch {md.version('torch')}" in out and f"flwr {md.version('flwr')}" in out
