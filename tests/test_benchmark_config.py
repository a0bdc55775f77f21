"""The benchmark TOML schema: every mistake is reported before any work, naming the file, the key and the allowed
values (no data, no training: these tests only parse)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from helpers_cli import fails
from oodtune.benchmark import load_benchmark_config
from oodtune.errors import ConfigError

GOOD = """
[benchmark]
name = "t"
arch = "wrn-10-1"
outliers = "tin-aux"
ood_near = ["tin-near"]
ood_far = ["gaussian"]
num_ood = 8
seeds = [0, 1]
out = "runs/t"

[pretrain]
epochs = 1
lr = 0.1

[finetune]
epochs = 1
batch_size = 8

[[methods]]
label = "MSP"
method = "msp"

[[methods]]
label = "Balanced EnergyOE"
method = "balanced-energy"
gamma = 0.5
m_in = "auto"
m_out = -5
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bench.toml"
    path.write_text(text)
    return path


def error(tmp_path: Path, text: str) -> str:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_benchmark_config(path)
    msg = str(info.value)
    assert str(path) in msg, msg  # every message names the file
    return msg


def test_the_good_config_loads(tmp_path):
    cfg = load_benchmark_config(write(tmp_path, GOOD))
    assert [m.label for m in cfg.methods] == ["MSP", "Balanced EnergyOE"]
    assert cfg.methods[1].loss_options == {"m_in": "auto", "m_out": -5} and cfg.methods[1].gamma == 0.5
    assert cfg.train_config("finetune", cfg.methods[1], 1).batch_size == 8


@pytest.mark.parametrize("section, typo, right", [
    ("[benchmark]", 'ouliers = "tin-aux"', "outliers"),
    ("[pretrain]", "epoch = 2", "epochs"),
    ("[finetune]", "bach_size = 64", "batch_size"),
    ("[[methods]]", "m_inn = -20.0", "m_in"),  # into the last [[methods]] row
])
def test_misspelled_keys_name_key_section_and_allowed_values(tmp_path, section, typo, right):
    text = GOOD.replace(f"{section}\n", f"{section}\n{typo}\n") if section != "[[methods]]" else GOOD + typo + "\n"
    msg = error(tmp_path, text)
    key = typo.split(" =")[0]
    assert f"unknown key {key!r}" in msg and section.strip("[]") in msg
    assert re.search(rf"allowed: .*\b{right}\b", msg), msg


def test_unknown_section(tmp_path):
    msg = error(tmp_path, GOOD + "\n[pretrian]\nepochs = 3\n")
    assert "pretrian" in msg and "benchmark, pretrain, finetune, methods" in msg


@pytest.mark.parametrize("drop, key", [('label = "MSP"\n', "label"), ('method = "msp"\n', "method")])
def test_missing_label_or_method(tmp_path, drop, key):
    msg = error(tmp_path, GOOD.replace(drop, "", 1))
    assert f"missing required key {key!r}" in msg and "[[methods]] #1" in msg


@pytest.mark.parametrize("old, new, where, expected", [
    ("epochs = 1\nlr", 'epochs = "1"\nlr', "[pretrain].epochs", "expected int, got str '1'"),
    ("batch_size = 8", "batch_size = 8.5", "[finetune].batch_size", "expected int, got float 8.5"),
    ("num_ood = 8", 'num_ood = "all"', "[benchmark].num_ood", "expected int, got str 'all'"),
    ("gamma = 0.5", 'gamma = "0.5"', ".gamma", "expected float, got str '0.5'"),
    ("epochs = 1\nlr", "epochs = true\nlr", "[pretrain].epochs", "expected int, got bool True"),
    ('ood_far = ["gaussian"]', 'ood_far = "gaussian"', "[benchmark].ood_far", "expected list, got str"),
    ("seeds = [0, 1]", 'seeds = ["0"]', "[benchmark].seeds", "list of integers"),
])
def test_wrong_types(tmp_path, old, new, where, expected):
    assert old in GOOD
    msg = error(tmp_path, GOOD.replace(old, new, 1))
    assert where in msg and expected in msg, msg


def test_integers_are_accepted_where_floats_belong(tmp_path):
    cfg = load_benchmark_config(write(tmp_path, GOOD.replace("lr = 0.1", "lr = 1")))
    assert cfg.train_config("pretrain", None, 0).lr == 1.0


@pytest.mark.parametrize("text, expected", [
    ("benchmark = 3\n" + GOOD[GOOD.index("[pretrain]"):], "must be a table ([benchmark]), got int"),
    ("finetune = [1, 2]\n" + GOOD.replace("[finetune]\nepochs = 1\nbatch_size = 8\n", ""),
     "must be a table ([finetune]), got list"),
    (GOOD[: GOOD.index("[[methods]]")] + '[methods]\nlabel = "MSP"\nmethod = "msp"\n',
     "[[methods]] must be an array of tables"),
    (GOOD[: GOOD.index("[[methods]]")], "no [[methods]] entries"),
])
def test_sections_of_the_wrong_kind(tmp_path, text, expected):
    assert expected in error(tmp_path, text)


@pytest.mark.parametrize("old, new, expected", [
    ('method = "msp"', 'method = "mps"', "unknown"),
    ('method = "balanced-energy"', 'method = "balanced-energy"\nscore = "odn"', "choose one of msp"),
    ('ood_far = ["gaussian"]', 'ood_far = ["gausian"]', "unknown dataset 'gausian'; known:"),
    ('outliers = "tin-aux"', 'outliers = "tin-au"', "[benchmark].outliers"),
    ('m_in = "auto"', 'm_in = "automatic"', 'm_in must be a number or "auto"'),
    ("gamma = 0.5\n", "", None),  # balanced without gamma is fine (γ = 1)
    ('label = "MSP"\nmethod = "msp"', 'label = "MSP"\nmethod = "msp"\nepochs = 3', "takes no training or loss"),
    ('label = "MSP"', 'label = "Balanced energyoe"', "labels must be distinct"),
    ('out = "runs/t"', 'out = "runs/t"\nblur = "both"', "for segmentation benchmarks only"),
    ('m_out = -5', 'm_out = -5\npaste_mode = "mosaic"', "paste_mode must be one of"),
    ('m_out = -5', 'm_out = -5\ntrain_part = "decoder"', "are segmentation options"),
])
def test_wrong_values(tmp_path, old, new, expected):
    assert old in GOOD
    text = GOOD.replace(old, new, 1)
    if expected is None:
        load_benchmark_config(write(tmp_path, text))
    else:
        assert expected in error(tmp_path, text)


def test_loss_option_the_method_does_not_use(tmp_path):
    msg = error(tmp_path, GOOD + '\n[[methods]]\nlabel = "E"\nmethod = "energy-oe"\nalpha = 3.0\n')
    assert "'alpha'" in msg and "energy-oe" in msg
    msg = error(tmp_path, GOOD + '\n[[methods]]\nlabel = "E"\nmethod = "energy-oe"\ngamma = 0.5\n')
    assert "gamma" in msg and "balanced-energy" in msg


def test_toml_syntax_error_is_reported_as_such(tmp_path):
    msg = error(tmp_path, GOOD.replace('name = "t"', 'name = "t'))
    assert "is not valid TOML" in msg and "line" in msg


def test_cli_reports_config_errors_before_any_work(tmp_path):
    """With --only as well: a syntax error is a syntax error, not a bad --only value; nothing is created."""
    out = tmp_path / "out"
    path = write(tmp_path, GOOD.replace('out = "runs/t"', f'out = "{out}"').replace("epochs = 1\nlr", "epoch = 1\nlr"))
    fails("benchmark", path, "--only", "msp", match="unknown key 'epoch'", code=1)
    write(tmp_path, GOOD.replace('name = "t"', 'name = "t'))
    fails("benchmark", path, "--only", "msp", match="is not valid TOML", code=1)
    write(tmp_path, GOOD.replace('out = "runs/t"', f'out = "{out}"'))
    fails("benchmark", path, "--seed", "9", match="--seed 9: not in [benchmark].seeds [0, 1]", code=1)
    assert not out.exists()


@pytest.mark.parametrize("config", sorted((Path(__file__).parents[1] / "configs").glob("*.toml")), ids=lambda p: p.stem)
def test_every_shipped_config_loads(config):
    cfg = load_benchmark_config(config)  # every value checked, every training configuration built
    assert cfg.methods and cfg.out
