"""Config values: numbers written with an exponent, range checks, overrides that are not YAML."""
import pytest

from unikd import config as C


@pytest.mark.parametrize("text, value", [("1e-3", 1e-3), ("2E2", 200.0), ("-1e+2", -100.0), ("1.5e-3", 1.5e-3)])
def test_exponent_numbers_are_floats_in_files_and_overrides(tmp_path, text, value):
    assert C.read_yaml(f"a: {text}") == {"a": value}
    path = tmp_path / "exp.yaml"
    path.write_text(f"train:\n  weight_decay: {text.lstrip('-')}\n")
    assert C.load_config(path).train.weight_decay == abs(value)
    assert C.load_config(None, [f"train.lr={text.lstrip('-')}"]).train.lr == abs(value)


def test_exponent_rule_leaves_strings_and_ints_alone():
    assert C.read_yaml("a: e5\nb: 1e\nc: 12\nd: 0x1f\ne: abc1e3") == {"a": "e5", "b": "1e", "c": 12, "d": 31,
                                                                     "e": "abc1e3"}


@pytest.mark.parametrize("override, message", [
    ("train.epochs=0", r"train.epochs: 0 is out of range \(must be >= 1\)"),
    ("train.epochs=-3", "train.epochs: -3 is out of range"),
    ("train.max_iters=-1", r"train.max_iters: -1 is out of range \(must be >= 0\)"),
    ("train.lr=0", r"train.lr: 0.0 is out of range \(must be > 0\)"),
    ("train.lr=.nan", "train.lr: nan is out of range"),
    ("data.batch_size=0", "data.batch_size"),
    ("data.hflip=1.5", r"data.hflip: 1.5 is out of range \(must be in \[0, 1\]\)"),
    ("train.lr_steps=[0.5, 2]", r"train.lr_steps\[1\]: 2.0 is out of range"),
    ("model.anchor_sizes=[8, 0]", r"model.anchor_sizes\[1\]"),
    ("train.log_every=0", "train.log_every"),
    ("train.keep_checkpoints=-1", "train.keep_checkpoints"),
    ("ake.n_queries=0", "ake.n_queries"),
    ("distill.lambda_ct=-1", "distill.lambda_ct"),
    ("distill.adaptor_layers=-1", "distill.adaptor_layers"),
])
def test_values_out_of_range_are_errors_naming_the_key(override, message):
    with pytest.raises(C.ConfigError, match=message):
        C.load_config(None, [override])


def test_range_edges_are_accepted():
    cfg = C.load_config(None, ["train.epochs=1", "train.max_iters=0", "data.hflip=1", "train.lr_steps=[1]",
                               "distill.adaptor_layers=null", "train.keep_checkpoints=0"])
    assert (cfg.train.epochs, cfg.train.max_iters, cfg.data.hflip) == (1, 0, 1.0)


def test_an_override_that_is_not_yaml_names_the_key():
    with pytest.raises(C.ConfigError, match=r"override 'train.lr_steps': the value '\[0.5' is not valid YAML"):
        C.load_config(None, ["train.lr_steps=[0.5"])


def test_the_repository_configs_are_in_range():
    from pathlib import Path

    for path in sorted(Path(__file__).parents[1].glob("configs/**/*.yaml")):
        C.load_config(path)
