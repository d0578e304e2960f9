"""Offline distillation (issue 12): ``unikd dump``, the knowledge store, ``unikd store verify`` and
``unikd distill --knowledge-store``, with a real tiny teacher, real AKEs and a real student on tiny digits-det."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from unikd import cli, jobs
from unikd.data import CocoDetection, ImageResize, collate
from unikd.distill import load_ake, teacher_fingerprint
from unikd.distill.unikd import teacher_knowledge
from unikd.errors import CorruptFileError
from unikd.knowledge import KnowledgeStore, KnowledgeStoreError, StoredKnowledge, verify_store
from unikd.knowledge.manifest import expected_keys, field_specs
from unikd.knowledge.shards import SHARDS, ShardWriter
from unikd.transformer import HungarianMatcher

from conftest import pretrain_akes, teacher_and_student, tiny_config

SMALL_PHI = ["--set", "distill.adaptor_heads=4", "--set", "distill.adaptor_points=2"]


@pytest.fixture(scope="module")
def offline(tiny_digits, tmp_path_factory):
    """A tiny RetinaNet teacher (1 iteration), its AKEs (1 iteration), the student YAML, and an fp32 store with 2
    draws of B̂ in shards of 3 records (8 images × 2 flips = 16 records)."""
    root = tmp_path_factory.mktemp("offline")
    teacher, student_yaml = teacher_and_student(tiny_digits, root, "retinanet", teacher_iters=1)
    pretrain_akes(student_yaml, teacher, root / "ake", iters=1)
    paths = {"root": root, "yaml": student_yaml, "teacher": root / "teacher" / "last.pt",
             "ake": root / "ake" / "ake.safetensors", "fp32": root / "store32"}
    assert dump(paths, paths["fp32"], "--dtype", "float32", "--draws", "2", "--shard-records", "3") == 0
    return paths


def dump(paths: dict, out: Path, *flags: str) -> int:
    return cli.main(["dump", str(paths["yaml"]), "--teacher", str(paths["teacher"]), "--ake", str(paths["ake"]),
                     "--out", str(out), *flags])


def train_set(paths: dict, **data) -> CocoDetection:
    cfg = tiny_config(yaml.safe_load(paths["yaml"].read_text())["data"]["root"])
    return CocoDetection(cfg.data.root, "train", ImageResize(cfg.data.size), hflip=data.get("hflip", 0.5),
                         seed=cfg.train.seed)


def test_dump_stores_every_image_under_both_flips_once_and_verify_says_so(offline, capsys):
    store = KnowledgeStore(offline["fp32"])
    manifest = store.manifest
    assert sorted(store.keys(), key=str) == sorted(expected_keys(manifest), key=str)
    assert len(store) == 16 and {k[1] for k in store.keys()} == {False, True}
    assert len(list((offline["fp32"] / SHARDS).glob("*.safetensors"))) == 6  # 16 records, 3 per shard
    assert manifest["fields"] == field_specs(10, 32, 2, "float32")
    teacher, tcfg = jobs.load_detector(offline["teacher"])
    assert manifest["teacher"] == teacher_fingerprint(teacher, tcfg.model)
    _, info = load_ake(offline["ake"], manifest["teacher"])
    assert manifest["ake"]["tensors_sha256"] == info["tensors_sha256"]
    capsys.readouterr()
    assert cli.main(["store", "verify", str(offline["fp32"])]) == 0
    assert "ok, 16 of 16 records in 6 shards" in capsys.readouterr().out


def test_records_equal_the_online_teacher_knowledge_of_each_image_alone(offline):
    """The batched dump gives, per image and variant, what UniKD's online teacher side computes for that image
    alone with the same B̂; both draws differ, and the fp16 store is the fp32 one within fp16 rounding."""
    store = KnowledgeStore(offline["fp32"])
    teacher, _ = jobs.load_detector(offline["teacher"])
    akes, _ = load_ake(offline["ake"], store.manifest["teacher"])
    data = train_set(offline)
    for index, flipped in [(0, False), (5, True)]:
        image, target = data.load(index, flipped, 0)
        record = store.record(target["image_id"], flipped, None, image_size=tuple(image.shape[-2:]))
        assert not torch.equal(record["pos/reference"][0], record["pos/reference"][1])
        with torch.no_grad():
            pyramid = teacher.extract_features([image])
        for draw in range(2):
            b_hat = (record["pos/reference"][draw][None], record["pos/gt_index"][draw][None])
            online = teacher_knowledge(akes, pyramid, [target], ("ct", "pos"), HungarianMatcher(), b_hat)
            for kind, at in (("ct", ()), ("pos", (draw,))):
                torch.testing.assert_close(record[f"{kind}/q"][at], online[kind].queries.q[0], rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(record[f"{kind}/z"][at], online[kind].z[0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(record["ct/reference"], online["ct"].queries.reference[0])
            assert torch.equal(record["ct/positive"], online["ct"].positive[0])
            assert torch.equal(record["pos/gt_index"][draw] >= 0, online["pos"].positive[0])
        assert record["ct/positive"].sum() == len(target["boxes"])  # one matched query per ground truth

    fp16 = offline["root"] / "store16"
    assert dump(offline, fp16) == 0
    half = KnowledgeStore(fp16)
    assert half.manifest["fields"]["ct/z"] == {"dtype": "float16", "shape": [10, 32]}
    assert half.manifest["fields"]["pos/reference"]["dtype"] == "float32"
    for key in half.keys():
        a, b = half.record(*key), store.record(*key)
        for field in ("ct/q", "ct/z", "pos/q", "pos/z"):
            draw0 = (0,) if field.startswith("pos/") else ()  # the fp16 store has draw 0 only
            assert a[field].dtype == torch.float16
            torch.testing.assert_close(a[field][draw0].float(), b[field][draw0], rtol=2 ** -10, atol=1e-6)
        assert torch.equal(a["pos/gt_index"][0], b["pos/gt_index"][0])  # draw 0 is the same B̂ in both stores


def test_write_then_read_is_exact_in_fp32_and_fp16(tmp_path):
    gen = torch.Generator().manual_seed(0)
    for dtype in ("float32", "float16"):
        root = tmp_path / dtype
        fields = field_specs(4, 8, 2, dtype)
        manifest = {"format": "unikd-knowledge-store", "version": 1, "fields": fields, "image_ids": [1, 2, 3],
                    "variants": [{"hflip": False, "min_size": None}], "draws": 2}
        (root / SHARDS).mkdir(parents=True)
        (root / "manifest.json").write_text(json.dumps(manifest))
        writer = ShardWriter(root, rank=0, records_per_shard=2, fields=fields)
        written = {}
        for image_id in (1, 2, 3):
            tensors = {name: (torch.randn(spec["shape"], generator=gen) * 100).to(getattr(torch, spec["dtype"]))
                       for name, spec in fields.items()}
            writer.add({"image_id": image_id, "hflip": False, "min_size": None, "image_size": [8, 8]}, tensors)
            written[image_id] = tensors
        writer.flush()
        store = KnowledgeStore(root)
        for image_id, tensors in written.items():
            read = store.record(image_id, False, None)
            assert all(torch.equal(read[k], v) and read[k].dtype == v.dtype for k, v in tensors.items())
        assert verify_store(root)[0] == []


def flip_byte_in_data(shard: Path) -> None:
    """Flip one bit of the first tensor's bytes (after safetensors' 8-byte length and JSON header)."""
    data = bytearray(shard.read_bytes())
    offset = 8 + int.from_bytes(data[:8], "little") + 5
    data[offset] ^= 0x10
    shard.write_bytes(bytes(data))


def test_a_flipped_byte_or_a_truncated_shard_fails_verify_and_the_loader(offline, tmp_path, capsys):
    root = tmp_path / "store"
    shutil.copytree(offline["fp32"], root)
    index = json.loads((root / SHARDS / "rank000-000001.json").read_text())
    shard = root / SHARDS / index["shard"]
    flip_byte_in_data(shard)
    capsys.readouterr()
    assert cli.main(["store", "verify", str(root)]) == 2
    out, err = capsys.readouterr()
    assert "rank000-000001.safetensors: SHA-256 differs" in out and "its tensors fail their SHA-256" in out
    assert "2 problem(s)" in err
    first = index["records"][0]
    store = KnowledgeStore(root)  # the size is right: opening works, reading the damaged record does not
    with pytest.raises(CorruptFileError, match="rank000-000001.safetensors: the record of image .* fails its SHA-256"):
        store.record(first["image_id"], first["hflip"], None)
    other = json.loads((root / SHARDS / "rank000-000002.json").read_text())["records"][0]
    store.record(other["image_id"], other["hflip"], None)  # records of intact shards are still served

    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CorruptFileError, match="rank000-000001.safetensors has .* bytes, .* were written"):
        KnowledgeStore(root)
    assert cli.main(["store", "verify", str(root)]) == 2
    assert "truncated" in capsys.readouterr().out


def test_a_killed_dump_resumes_with_every_record_exactly_once(offline, tmp_path, monkeypatch, capsys):
    """Killed between writing a shard and committing it (its index), the dump leaves one committed shard and one
    orphan; the same command then removes the orphan and finishes: no hole, no duplicate, the same records."""
    out = tmp_path / "store"
    commits = []

    def commit_then_die(tmp, index):
        if commits:
            raise KeyboardInterrupt  # as a kill between the shard's rename and its index's
        commits.append(index)
        tmp.replace(index)

    monkeypatch.setattr(ShardWriter, "_commit", staticmethod(commit_then_die))
    with pytest.raises(KeyboardInterrupt):
        dump(offline, out, "--dtype", "float32", "--draws", "2", "--shard-records", "3")
    monkeypatch.undo()
    capsys.readouterr()
    assert cli.main(["store", "verify", str(out)]) == 2
    report = capsys.readouterr().out
    assert "13 of 16 records missing" in report and "rank000-000001.safetensors: left uncommitted" in report
    assert dump(offline, out, "--dtype", "float32", "--draws", "2", "--shard-records", "3") == 0
    assert cli.main(["store", "verify", str(out)]) == 0
    resumed, straight = KnowledgeStore(out), KnowledgeStore(offline["fp32"])
    assert sorted(resumed.keys(), key=str) == sorted(straight.keys(), key=str)  # each once (opening refuses twice)
    for key in resumed.keys():
        a, b = resumed.record(*key), straight.record(*key)
        assert torch.equal(a["pos/reference"], b["pos/reference"])  # B̂ is seeded per record, not per run
        torch.testing.assert_close(a["pos/z"], b["pos/z"], rtol=1e-5, atol=1e-5)
    assert dump(offline, out, "--dtype", "float32", "--draws", "2", "--shard-records", "3") == 0  # nothing left
    assert "16 of 16 records" in capsys.readouterr().out
    assert dump(offline, out, "--dtype", "float16") == 2
    assert "made with other settings (draws: 2 -> 1; dtype" in capsys.readouterr().err


def test_offline_distillation_loads_no_teacher_and_gives_the_online_loss(offline, tmp_path, monkeypatch):
    """Two offline iterations through the command line with the teacher unloadable; then, on a batch, the
    offline KD losses of the trained student and φ equal the online ones with the same B̂ (fp32 store)."""
    def no_teacher(*args, **kwargs):
        raise AssertionError("offline stage 2 loaded a detector checkpoint")

    out = tmp_path / "student"
    with monkeypatch.context() as m:
        m.setattr(jobs, "load_detector", no_teacher)
        assert cli.main(["distill", str(offline["yaml"]), "--knowledge-store", str(offline["fp32"]), "--ake",
                         str(offline["ake"]), "--out", str(out), "--max-iters", "2", *SMALL_PHI]) == 0
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss_kd_ct"] > 0 and first["loss_kd_pos"] > 0

    ckpt = torch.load(out / "last.pt", weights_only=False)
    cfg = tiny_config(yaml.safe_load(offline["yaml"].read_text())["data"]["root"], epochs=1)
    cfg.distill.adaptor_heads, cfg.distill.adaptor_points = 4, 2
    store = KnowledgeStore(offline["fp32"])
    student = jobs.build_detector(cfg.model, train_set(offline).num_classes)
    model, _, data = jobs._offline_model(cfg, offline["fp32"], offline["ake"], student, train_set(offline))
    model.load_state_dict(ckpt["model"])
    model.train()
    images, targets = collate([data[i] for i in range(4)])
    torch.manual_seed(0)
    offline_losses = model(images, targets)
    teacher, _ = jobs.load_detector(offline["teacher"])
    plain = [{k: v for k, v in t.items() if k != "knowledge"} for t in targets]
    b_hat = (torch.stack([t["knowledge"]["pos/reference"] for t in targets]),
             torch.stack([t["knowledge"]["pos/gt_index"] for t in targets]))
    torch.manual_seed(0)
    _, student_features = model.student(images, plain)
    with torch.no_grad():
        knowledge = model.distiller.teacher_knowledge(teacher.extract_features(images), plain, b_hat=b_hat)
    online = {k: v.mean() for k, v in model.distiller.distances(knowledge, model.distiller.adaptor(student_features)).items()}
    for name in ("loss_kd_ct", "loss_kd_pos"):
        assert offline_losses[name].item() == pytest.approx(online[name].item(), rel=1e-5)
    assert store.manifest["draws"] == 2 and data.epoch == 0


def test_a_variant_that_was_not_stored_is_refused(offline, tmp_path, capsys):
    out = tmp_path / "unflipped"
    assert dump(offline, out, "--set", "data.hflip=0") == 0
    store = KnowledgeStore(out)
    assert {k[1] for k in store.keys()} == {False}
    image_id = store.keys()[0][0]
    with pytest.raises(KnowledgeStoreError, match=f"no record of image {image_id} \\(flipped\\)"):
        store.record(image_id, True, None)
    with pytest.raises(KnowledgeStoreError, match="computed at"):
        store.record(image_id, False, None, image_size=(1, 1))
    with pytest.raises(KnowledgeStoreError, match="has no records of images flipped"):
        jobs.check_store_fits(store, train_set(offline), ImageResize(64))
    capsys.readouterr()
    assert cli.main(["distill", str(offline["yaml"]), "--knowledge-store", str(out), "--ake", str(offline["ake"]),
                     "--out", str(tmp_path / "refused"), "--max-iters", "1"]) == 2
    assert "has no records of images flipped" in capsys.readouterr().err
    served = StoredKnowledge(train_set(offline, hflip=0.5), store)
    flipped = next(i for i in range(len(served)) if served.dataset.augmentation(i)[0])
    with pytest.raises(KnowledgeStoreError, match="no record of image .* \\(flipped\\)"):
        served[flipped]


def test_under_torchrun_each_rank_writes_its_own_shards_and_the_records_are_the_same(offline, tmp_path):
    out = tmp_path / "store"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "unikd", "dump",
           str(offline["yaml"]), "--teacher", str(offline["teacher"]), "--ake", str(offline["ake"]), "--out", str(out),
           "--dtype", "float32", "--draws", "2", "--shard-records", "3"]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = sorted(p.name for p in (out / SHARDS).glob("*.safetensors"))
    assert names == [f"rank{r:03d}-{s:06d}.safetensors" for r in (0, 1) for s in range(3)]  # 8 records per rank
    assert verify_store(out)[0] == []
    both, single = KnowledgeStore(out), KnowledgeStore(offline["fp32"])
    assert sorted(both.keys(), key=str) == sorted(single.keys(), key=str)
    for key in both.keys():
        a, b = both.record(*key), single.record(*key)
        assert torch.equal(a["pos/reference"], b["pos/reference"])
        torch.testing.assert_close(a["ct/z"], b["ct/z"], rtol=1e-5, atol=1e-5)
