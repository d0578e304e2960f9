"""The AKE file's integrity: a checksum of its tensors, checked on load; damaged files name themselves."""
import json
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from unikd.config import AKEConfig
from unikd.distill import KnowledgeExtractors, load_ake, save_ake
from unikd.errors import CorruptFileError, OutputError, UserError

TEACHER = {"family": "retinanet", "backbone": "resnet18", "strides": [8, 16], "channels": [16, 16],
           "weights_sha256": "0" * 64}


@pytest.fixture()
def ake_file(tmp_path):
    torch.manual_seed(0)
    akes = KnowledgeExtractors(AKEConfig(d_model=32, n_queries=4, n_heads=2, n_points=1, d_ffn=32), 2, 16, 3)
    return save_ake(tmp_path / "ake.safetensors", akes, TEACHER, 3, [1, 2, 3]), akes


def test_a_saved_file_loads_with_its_checksum(ake_file):
    path, akes = ake_file
    loaded, info = load_ake(path, TEACHER)
    assert len(info["tensors_sha256"]) == 64
    for (name, a), b in zip(akes.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name


def test_an_edited_tensor_with_an_intact_header_is_refused(ake_file):
    path, _ = ake_file
    with safe_open(path, "pt") as f:
        header_len = 8 + int.from_bytes(path.read_bytes()[:8], "little")
        assert f.metadata()["unikd"]
    data = bytearray(path.read_bytes())
    data[header_len + 5] ^= 0x40  # one bit of one weight: the header still parses
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match=re.escape(f"{path}: its tensors do not match the checksum stored with "
                                                         "them (the file was changed or damaged after 'unikd "
                                                         "pretrain-ake' wrote it)")):
        load_ake(path, TEACHER)


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
def test_a_damaged_file_is_a_user_error_naming_it(ake_file, damage):
    path, _ = ake_file
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "garbage": b"\x07" * 64}[damage])
    with pytest.raises(CorruptFileError, match=str(path)):
        load_ake(path, TEACHER)


def test_a_file_without_the_checksum_is_refused(ake_file):
    path, _ = ake_file
    with safe_open(path, "pt") as f:
        info = json.loads(f.metadata()["unikd"])
        state = {k: f.get_tensor(k) for k in f.keys()}
    del info["tensors_sha256"]  # as an AKE file from before the checksum
    save_file(state, path, metadata={"unikd": json.dumps(info)})
    with pytest.raises(UserError, match=f"{path} carries no checksum of its tensors .* run 'unikd pretrain-ake'"):
        load_ake(path, TEACHER)


def test_metadata_that_is_not_json_is_refused_naming_the_file(ake_file):
    path, _ = ake_file
    with safe_open(path, "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    save_file(state, path, metadata={"unikd": "{not json"})
    with pytest.raises(CorruptFileError, match=re.escape(f"{path}: its 'unikd' metadata is not valid JSON")):
        load_ake(path, TEACHER)


def test_a_failed_write_names_the_file_and_leaves_no_temporary(ake_file, tmp_path):
    _, akes = ake_file
    taken = tmp_path / "taken.safetensors"
    taken.mkdir()  # the write succeeds, the rename over a folder fails
    with pytest.raises(OutputError, match=f"cannot write {taken}: "):
        save_ake(taken, akes, TEACHER, 3, [1, 2, 3])
    assert not taken.with_suffix(".tmp").exists()
    # sysfs takes no new file even from root: the write itself fails, before any temporary exists
    with pytest.raises(OutputError, match="cannot write /sys/kernel/ake.safetensors: "):
        save_ake("/sys/kernel/ake.safetensors", akes, TEACHER, 3, [1, 2, 3])
