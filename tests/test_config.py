import pytest

from unikd import config as C


def write(tmp_path, text):
    p = tmp_path / "exp.yaml"
    p.write_text(text)
    return p


def test_yaml_values_and_overrides_are_applied(tmp_path):
    p = write(tmp_path, "model:\n  family: fcos\n  backbone: resnet50\ntrain:\n  lr: 0.02\n")
    cfg = C.load_config(p, ["train.epochs=3", "model.anchor_sizes=[4, 8, 16, 32, 64]", "train.lr=1"])
    assert cfg.model.family == "fcos" and cfg.model.backbone == "resnet50"
    assert cfg.train.epochs == 3
    assert cfg.model.anchor_sizes == [4, 8, 16, 32, 64]
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)  # an int is accepted where a float is due
    assert cfg.data.size == C.DataConfig().size  # untouched keys keep their defaults


@pytest.mark.parametrize("text, key", [
    ("train:\n  lrr: 0.1\n", "train.lrr"),
    ("modle:\n  family: fcos\n", "modle"),
])
def test_unknown_key_is_an_error_naming_it(tmp_path, text, key):
    with pytest.raises(C.ConfigError, match=f"unknown key '{key}'"):
        C.load_config(write(tmp_path, text))


@pytest.mark.parametrize("text, key", [
    ("train:\n  epochs: twelve\n", "train.epochs"),
    ("train:\n  epochs: 1.5\n", "train.epochs"),
    ("train:\n  amp: 1\n", "train.amp"),
    ("model:\n  anchor_sizes: [8, x]\n", r"model.anchor_sizes\[1\]"),
    ("data: 3\n", "data"),
])
def test_wrong_type_is_an_error_naming_the_key(tmp_path, text, key):
    with pytest.raises(C.ConfigError, match=key):
        C.load_config(write(tmp_path, text))


def test_override_errors_name_the_key(tmp_path):
    with pytest.raises(C.ConfigError, match="unknown key 'train.nope'"):
        C.load_config(None, ["train.nope=1"])
    with pytest.raises(C.ConfigError, match="key.path=value"):
        C.load_config(None, ["train.lr"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(C.ConfigError, match="not found"):
        C.load_config(tmp_path / "nope.yaml")
    with pytest.raises(C.ConfigError, match="not valid YAML"):
        C.load_config(write(tmp_path, "train: [1, 2\n"))


def test_round_trip_through_dict():
    cfg = C.load_config(None, ["model.family=faster_rcnn", "train.lr_steps=[0.5]"])
    assert C.from_dict(C.to_dict(cfg)) == cfg
