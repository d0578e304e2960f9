"""Bad inputs on the command line end in one `unikd: error:` line naming the file or key, with exit status 2."""
import pytest
import torch
import yaml

from unikd import cli
from unikd.config import to_dict

from conftest import tiny_config
from test_run_folders import error_line


@pytest.fixture(scope="module")
def trained(tiny_digits, tmp_path_factory):
    """A detector checkpoint of one step, and its config file."""
    root = tmp_path_factory.mktemp("errors")
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump(to_dict(tiny_config(tiny_digits, epochs=1))))
    assert cli.main(["train", str(config), "--out", str(root / "run"), "--max-iters", "1"]) == 0
    return root / "run" / "last.pt", config


@pytest.mark.parametrize("damage", ["truncated", "empty", "flipped-bytes"])
def test_a_damaged_checkpoint_is_one_line(trained, tmp_path, capsys, damage):
    data = (trained[0]).read_bytes()
    path = tmp_path / "bad.pt"
    if damage == "truncated":
        data = data[: len(data) * 2 // 3]
    elif damage == "empty":
        data = b""
    else:
        middle = len(data) // 2
        data = data[:middle] + bytes(b ^ 0xFF for b in data[middle : middle + 4096]) + data[middle + 4096 :]
    path.write_bytes(data)
    assert cli.main(["eval", "--checkpoint", str(path), "--device", "cpu"]) == 2
    assert str(path) in error_line(capsys)


@pytest.mark.parametrize("flags, named", [
    (["--epochs", "0"], "train.epochs: 0 is out of range"),
    (["--epochs", "-3"], "train.epochs: -3 is out of range"),
    (["--max-iters", "-1"], "train.max_iters: -1 is out of range"),
    (["--set", "train.lr_steps=[0.5"], "override 'train.lr_steps'"),
    (["--set", "train.lr=1e-3", "--set", "train.weight_decay=-1e-4"], "train.weight_decay: -0.0001 is out of range"),
])
def test_nonsense_values_are_one_line(trained, tmp_path, capsys, flags, named):
    assert cli.main(["train", str(trained[1]), "--out", str(tmp_path / "x"), *flags]) == 2
    assert named in error_line(capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_one_line(trained, tmp_path, capsys):
    assert cli.main(["train", str(trained[1]), "--out", str(tmp_path / "x"), "--device", "cuda"]) == 2
    assert "device 'cuda' was asked for but CUDA is not available" in error_line(capsys)
    assert cli.main(["eval", "--checkpoint", str(trained[0]), "--device", "cuda"]) == 2
    assert "CUDA is not available" in error_line(capsys)


def test_a_corrupt_ake_file_is_one_line(trained, tmp_path, capsys):
    ake = tmp_path / "ake.safetensors"
    ake.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    assert cli.main(["distill", str(trained[1]), "--teacher", str(trained[0]), "--ake", str(ake),
                     "--method", "unikd", "--out", str(tmp_path / "s")]) == 2
    assert f"{ake} is not a readable safetensors file" in error_line(capsys)
