"""Offline distillation (issue 12): ``unikd dump``, the knowledge store, ``unikd store verify`` and
``unikd distill --knowledge-store``, with a real tiny teacher, real AKEs and a real student on tiny digits-det."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torchvision.ops import box_convert, box_iou

from unikd import cli, jobs
from unikd.data import CocoDetection, ImageResize, collate
from unikd.distill import load_ake, measure_teacher_rms, teacher_fingerprint
from unikd.distill.common import B_HAT, normalise_targets, query_boxes
from unikd.distill.unikd import teacher_knowledge
from unikd.errors import CorruptFileError
from unikd.knowledge import KnowledgeStore, KnowledgeStoreError, SeededQueryBoxes, StoredKnowledge, verify_store
from unikd.knowledge.features import feature_fields, feature_records, full_maps, stored_pyramid
from unikd.knowledge.manifest import VERSION, expected_keys, field_specs
from unikd.knowledge.shards import SHARDS, ShardWriter
from unikd.pyramid import Pyramid
from unikd.transformer import HungarianMatcher

from conftest import pretrain_akes, teacher_and_student, tiny_config
from host_reads import HostReads

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
        manifest = {"format": "unikd-knowledge-store", "version": VERSION, "fields": fields, "image_ids": [1, 2, 3],
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


def test_the_loaders_b_hat_is_drawn_from_each_samples_augmented_boxes_with_its_own_seed(offline):
    """:class:`SeededQueryBoxes`: each sample's ``B̂`` (N boxes cxcywh normalised, gt_index) is Eq. 3's for the boxes
    of the sample as served (flipped or not): jittered boxes with IoU > α with their ground truth, the rest below β
    with all; the same item twice gives the same boxes, another epoch other boxes."""
    data = SeededQueryBoxes(train_set(offline), 10, 0.6, 0.4, seed=0)
    flips = set()
    draws = {}
    for epoch in (0, 1):
        data.set_epoch(epoch)
        for i in range(len(data)):
            image, target = data[i]
            flips.add(target["flipped"])
            gt = normalise_targets([target], [tuple(image.shape[-2:])])[0]["boxes_xyxy"]
            boxes, gt_index = box_convert(target[B_HAT[0]], "cxcywh", "xyxy"), target[B_HAT[1]]
            positive = gt_index >= 0
            assert boxes.shape == (10, 4) and positive.sum() == min(len(gt), 10)
            assert (box_iou(boxes[positive], gt[gt_index[positive]]).diag() > 0.6).all()
            assert (box_iou(boxes[~positive], gt).amax(dim=1) < 0.4).all()
            assert torch.equal(data[i][1][B_HAT[0]], target[B_HAT[0]])
            draws[epoch, i] = target[B_HAT[0]]
    assert flips == {False, True}
    assert not any(torch.equal(draws[0, i], draws[1, i]) for i in range(len(data)))
    assert all(torch.equal(SeededQueryBoxes(train_set(offline), 10, 0.6, 0.4, seed=0)[i][1][B_HAT[0]], draws[0, i])
               for i in range(len(data)))  # a fresh one serves epoch 0

    # Under a multi-scale rule each draw is seeded by (seed, image, flip, shorter side, epoch), computed here apart
    root = yaml.safe_load(offline["yaml"].read_text())["data"]["root"]
    scales = CocoDetection(root, "train", ImageResize(64, (40, 56)), hflip=0.5, seed=3)
    data = SeededQueryBoxes(scales, 10, 0.6, 0.4, seed=7)
    drawn_at = set()
    for epoch in (0, 1, 2):
        data.set_epoch(epoch)
        for i in range(len(data)):
            image, target = data[i]
            min_size = min(image.shape[-2:])
            drawn_at.add(min_size)
            state = np.random.SeedSequence([7, target["image_id"], int(target["flipped"]), min_size, epoch])
            generator = torch.Generator().manual_seed(int(state.generate_state(1)[0]))
            gts = normalise_targets([target], [tuple(image.shape[-2:])])
            boxes, gt_index = query_boxes(gts, 10, 0.6, 0.4, generator)
            assert torch.equal(target[B_HAT[0]], boxes[0]) and torch.equal(target[B_HAT[1]], gt_index[0])
    assert drawn_at == {40, 56}


def test_online_unikd_draws_the_stores_b_hat_in_its_first_epochs_and_gives_the_offline_loss(offline):
    """Online stage 2 draws ``B̂`` in the data loader from the store's seeded generators: in epoch ``e`` below the
    store's K draws each sample's ``B̂`` is the store's draw ``e``, and with the same weights the online model's
    KD losses on a batch equal the offline model's (fp32 store); from epoch K on, online draws afresh while the
    store repeats its draws."""
    cfg = tiny_config(yaml.safe_load(offline["yaml"].read_text())["data"]["root"], epochs=1)
    cfg.distill.adaptor_heads, cfg.distill.adaptor_points = 4, 2
    classes = train_set(offline).num_classes
    stored, _, stored_data = jobs._offline_model(cfg, offline["fp32"], offline["ake"],
                                                 jobs.build_detector(cfg.model, classes), train_set(offline))
    online, _, online_data = jobs._online_model(cfg, offline["teacher"], offline["ake"],
                                                jobs.build_detector(cfg.model, classes), train_set(offline), "cpu")
    online.load_state_dict(stored.state_dict())
    stored.train(), online.train()
    for epoch in range(3):
        stored_data.set_epoch(epoch), online_data.set_epoch(epoch)
        batches = collate([online_data[i] for i in range(4)]), collate([stored_data[i] for i in range(4)])
        same = [torch.equal(a[B_HAT[0]], b["knowledge"]["pos/reference"])
                and torch.equal(a[B_HAT[1]], b["knowledge"]["pos/gt_index"])
                for a, b in zip(batches[0][1], batches[1][1])]
        assert same == [epoch < 2] * 4, epoch
        if epoch < 2:
            losses = []
            for model, (images, targets) in zip((online, stored), batches):
                torch.manual_seed(0)
                losses.append(model(images, targets))
            for name in ("loss_kd_ct", "loss_kd_pos"):
                assert losses[0][name].item() == pytest.approx(losses[1][name].item(), rel=1e-5), (epoch, name)


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


# FitNet's teacher features in the same store format (issue 12, item 4)

def fitnet_store(paths: dict, knowledge: str, *flags: str) -> Path:
    """A store of FitNet's features of ``knowledge`` (fp32 unless ``flags`` say otherwise), dumped once per module."""
    out = paths["root"] / f"{knowledge}{''.join(flags)}"
    if not out.exists():
        assert dump_features(paths, out, knowledge, "--dtype", "float32", *flags) == 0
    return out


def dump_features(paths: dict, out: Path, knowledge: str, *flags: str) -> int:
    return cli.main(["dump", str(paths["yaml"]), "--teacher", str(paths["teacher"]), "--knowledge", knowledge,
                     "--out", str(out), *flags])


def cells_inside(boxes: torch.Tensor, rows: int, cols: int, stride: int) -> list[tuple[int, int]]:
    """The cells (row-major) whose centre lies inside one of ``boxes`` (xyxy pixels), one by one."""
    inside = []
    for r in range(rows):
        for c in range(cols):
            x, y = (c + 0.5) * stride, (r + 0.5) * stride
            if any(x0 <= x <= x1 and y0 <= y <= y1 for x0, y0, x1, y1 in boxes.tolist()):
                inside.append((r, c))
    return inside


def test_feature_records_round_trip_exactly_with_their_own_sizes(tmp_path):
    """Records of two images of different sizes (so different map sizes, and different foreground counts)
    written and read back bit for bit, in fp32 and fp16; verify finds the stores whole."""
    gen = torch.Generator().manual_seed(0)
    strides, channels = [8, 16], [3, 5]
    sizes = [(40, 64), (64, 24)]
    pyramid = Pyramid([torch.randn(2, c, 64 // s, 64 // s, generator=gen) * 100 for c, s in zip(channels, strides)],
                      strides, sizes)
    targets = [{"image_id": 1, "boxes": torch.tensor([[4.0, 4.0, 30.0, 20.0]])},
               {"image_id": 2, "boxes": torch.tensor([[0.0, 10.0, 24.0, 60.0], [2.0, 2.0, 9.0, 9.0]])}]
    for knowledge in ("fitnet-full", "fitnet-foreground"):
        for dtype in ("float32", "float16"):
            root = tmp_path / f"{knowledge}-{dtype}"
            fields = feature_fields(channels, knowledge, dtype)
            manifest = {"format": "unikd-knowledge-store", "version": VERSION, "knowledge": knowledge,
                        "fields": fields, "image_ids": [1, 2], "variants": [{"hflip": False, "min_size": None}],
                        "draws": 1}
            (root / SHARDS).mkdir(parents=True)
            (root / "manifest.json").write_text(json.dumps(manifest))
            records = feature_records(pyramid, targets, knowledge, getattr(torch, dtype))
            assert records[0]["level0"].shape != records[1]["level0"].shape
            writer = ShardWriter(root, rank=0, records_per_shard=1, fields=fields)
            for target, size, record in zip(targets, sizes, records):
                augmentation = {"image_id": target["image_id"], "hflip": False, "min_size": None,
                                "image_size": list(size)}
                writer.add(augmentation, record)
            store = KnowledgeStore(root)
            for i, (target, size, record) in enumerate(zip(targets, sizes, records)):
                read = store.record(target["image_id"], False, None)
                assert all(torch.equal(read[k], v) and read[k].dtype == v.dtype for k, v in record.items())
                if knowledge == "fitnet-full":  # a batch of one image: its own maps, in float32
                    alone = stored_pyramid([full_maps(read, target, size, strides, knowledge)], [size], strides,
                                           torch.device("cpu"))
                    for level, original, (h, w) in zip(alone.levels, pyramid.levels, pyramid.valid_cells()[i]):
                        assert level.dtype == torch.float32
                        expected = original[i:i + 1, :, :h, :w].to(getattr(torch, dtype)).float()
                        assert torch.equal(level[..., :h, :w], expected)
            assert verify_store(root)[0] == []


def test_foreground_store_holds_exactly_the_cells_inside_the_boxes(offline):
    """Each foreground record is the teacher's features of the image alone at the cells whose centre lies in a box
    (found cell by cell here), in row-major order; each full record is the whole map over the image's own cells."""
    full = KnowledgeStore(fitnet_store(offline, "fitnet-full"))
    foreground = KnowledgeStore(fitnet_store(offline, "fitnet-foreground"))
    assert full.manifest["knowledge"] == "fitnet-full" and foreground.manifest["knowledge"] == "fitnet-foreground"
    assert sorted(full.keys(), key=str) == sorted(expected_keys(full.manifest), key=str)
    teacher, _ = jobs.load_detector(offline["teacher"])
    assert full.manifest["fields"]["level0"] == {"dtype": "float32", "shape": [32, None, None]}
    data = train_set(offline)
    for index, flipped in [(1, False), (6, True)]:
        image, target = data.load(index, flipped, 0)
        with torch.no_grad():
            pyramid = teacher.extract_features([image])
        whole = full.record(target["image_id"], flipped, None, image_size=tuple(image.shape[-2:]))
        cut = foreground.record(target["image_id"], flipped, None, image_size=tuple(image.shape[-2:]))
        counted = 0
        for level, (f, stride) in enumerate(zip(pyramid.levels, pyramid.strides)):
            rows, cols = -(-image.shape[-2] // stride), -(-image.shape[-1] // stride)
            torch.testing.assert_close(whole[f"level{level}"], f[0, :, :rows, :cols], rtol=1e-5, atol=1e-5)
            inside = cells_inside(target["boxes"], rows, cols, stride)
            expected = torch.stack([f[0, :, r, c] for r, c in inside], dim=1) if inside else f.new_zeros(32, 0)
            assert cut[f"level{level}"].shape == (32, len(inside))
            torch.testing.assert_close(cut[f"level{level}"], expected, rtol=1e-5, atol=1e-5)
            expanded = full_maps(cut, target, tuple(image.shape[-2:]), pyramid.strides, "fitnet-foreground")
            outside = torch.ones(rows, cols, dtype=torch.bool)
            for r, c in inside:
                outside[r, c] = False
            assert torch.equal(expanded[f"level{level}"][:, ~outside], cut[f"level{level}"])
            assert not expanded[f"level{level}"][:, outside].any()
            counted += len(inside)
        assert 0 < counted < sum(r.numel() for r in whole.values()) // 32


def test_offline_fitnet_loads_no_teacher_and_gives_the_online_loss(offline, tmp_path, monkeypatch):
    """Two offline FitNet iterations through the command line with the teacher unloadable; then, on a batch, the
    offline FitNet loss of the trained student and φ from the full store and from the foreground store equals the
    online one from the teacher's features of the same images. The stored scale is the one the online job
    measures."""
    def no_teacher(*args, **kwargs):
        raise AssertionError("offline stage 2 loaded a detector checkpoint")

    out, foreground = tmp_path / "student", fitnet_store(offline, "fitnet-foreground")  # dumped with the teacher
    with monkeypatch.context() as m:
        m.setattr(jobs, "load_detector", no_teacher)
        assert cli.main(["distill", str(offline["yaml"]), "--method", "fitnet", "--knowledge-store", str(foreground),
                         "--out", str(out), "--max-iters", "2", *SMALL_PHI]) == 0
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss_fitnet"] > 0

    teacher, _ = jobs.load_detector(offline["teacher"])
    cfg = tiny_config(yaml.safe_load(offline["yaml"].read_text())["data"]["root"], epochs=1)
    cfg.distill.method, cfg.distill.adaptor_heads, cfg.distill.adaptor_points = "fitnet", 4, 2
    ckpt = torch.load(out / "last.pt", weights_only=False)
    losses = {}
    for knowledge in ("fitnet-full", "fitnet-foreground"):
        store = fitnet_store(offline, knowledge)
        rms = KnowledgeStore(store).manifest["teacher_rms"]
        assert torch.equal(torch.tensor(rms), measure_teacher_rms(teacher, train_set(offline), collate, batch_size=4))
        student = jobs.build_detector(cfg.model, train_set(offline).num_classes)
        model, _, data = jobs._offline_model(cfg, store, None, student, train_set(offline))
        model.load_state_dict(ckpt["model"])
        model.train()
        images, targets = collate([data[i] for i in range(4)])
        torch.manual_seed(0)
        losses[knowledge] = model(images, targets)["loss_fitnet"]
    plain = [{k: v for k, v in t.items() if k != "knowledge"} for t in targets]
    torch.manual_seed(0)
    _, student_features = model.student(images, plain)
    with torch.no_grad():
        teacher_features = teacher.extract_features(images)
    online = model.distiller.loss(teacher_features, student_features, plain)["loss_fitnet"]
    assert losses["fitnet-full"].item() == pytest.approx(online.item(), rel=1e-5)
    assert losses["fitnet-foreground"].item() == pytest.approx(online.item(), rel=1e-5)


def test_a_store_of_the_wrong_kind_or_variant_is_refused(offline, tmp_path, capsys):
    """A UniKD store given to FitNet and a FitNet store given to UniKD are refused, naming both; a FitNet store
    without the flipped images is refused as UniKD's is; a foreground record served with other boxes, or a full one
    at another image size, is refused."""
    capsys.readouterr()
    assert cli.main(["distill", str(offline["yaml"]), "--method", "fitnet", "--knowledge-store", str(offline["fp32"]),
                     "--out", str(tmp_path / "a"), "--max-iters", "1"]) == 2
    assert "holds unikd knowledge; method 'fitnet' cannot use it" in capsys.readouterr().err
    assert cli.main(["distill", str(offline["yaml"]), "--method", "unikd", "--knowledge-store",
                     str(fitnet_store(offline, "fitnet-full")), "--ake", str(offline["ake"]),
                     "--out", str(tmp_path / "b"), "--max-iters", "1"]) == 2
    assert "holds fitnet-full knowledge; method 'unikd' cannot use it" in capsys.readouterr().err
    assert dump_features(offline, tmp_path / "c", "fitnet-full", "--ake", str(offline["ake"])) == 2
    assert "takes no --ake" in capsys.readouterr().err

    unflipped = tmp_path / "unflipped"
    assert dump_features(offline, unflipped, "fitnet-foreground", "--set", "data.hflip=0") == 0
    assert cli.main(["distill", str(offline["yaml"]), "--method", "fitnet", "--knowledge-store", str(unflipped),
                     "--out", str(tmp_path / "d"), "--max-iters", "1"]) == 2
    assert "has no records of images flipped" in capsys.readouterr().err

    store = KnowledgeStore(unflipped)
    data = train_set(offline, hflip=0)
    image, target = data[0]
    record = store.record(target["image_id"], False, None, image_size=tuple(image.shape[-2:]))
    size, strides = tuple(image.shape[-2:]), store.manifest["teacher"]["strides"]
    full_maps(record, target, size, strides, "fitnet-foreground")
    moved = {**target, "boxes": target["boxes"] * 0.5}
    with pytest.raises(KnowledgeStoreError, match=f"stored foreground of image .* has {record['level0'].shape[-1]} "
                       "cells on level 0, its boxes \\d+: not the image and boxes it was dumped from"):
        full_maps(record, moved, size, strides, "fitnet-foreground")
    full = KnowledgeStore(fitnet_store(offline, "fitnet-full")).record(target["image_id"], False, None)
    with pytest.raises(KnowledgeStoreError, match=f"the stored features of image {target['image_id']} cover \\[8, 8\\] "
                       "cells on level 0, its image \\[4, 8\\]: not the image it was dumped from"):
        full_maps(full, target, (32, 64), strides, "fitnet-full")


def test_offline_stage_2_reads_nothing_back_from_the_device_and_online_unikd_only_to_match(offline):
    """The host reads of device tensors (:mod:`host_reads`: syncs on a GPU) in unikd's own code in one stage-2
    forward on a batch moved as the trainer moves it: none offline, UniKD from its store and FitNet from a
    foreground store (expanded by the loader, not in the step); online UniKD, whose data loader draws ``B̂``, reads
    once, for the Hungarian matcher of the content positives (the cost matrix), as docs/benchmarks.md says; on
    targets without ``B̂`` (a library user's own loop) once more, for ``B̂``'s sampler (the batch's ground truth, in
    one copy)."""
    def forward(model, batch):
        images, targets = batch
        with HostReads() as reads:
            reads.on_device(model, images, [{k: v for k, v in t.items() if torch.is_tensor(v)} for t in targets])
            losses = model(images, targets)
        return losses, reads

    cfg = tiny_config(yaml.safe_load(offline["yaml"].read_text())["data"]["root"], epochs=1)
    cfg.distill.adaptor_heads, cfg.distill.adaptor_points = 4, 2
    stores = {"unikd": offline["fp32"], "fitnet": fitnet_store(offline, "fitnet-foreground")}
    for method, store in stores.items():
        cfg.distill.method = method
        student = jobs.build_detector(cfg.model, train_set(offline).num_classes)
        model, _, data = jobs._offline_model(cfg, store, offline["ake"] if method == "unikd" else None, student,
                                             train_set(offline))
        losses, reads = forward(model, collate([data[i] for i in range(4)]))
        assert losses["loss_kd_ct" if method == "unikd" else "loss_fitnet"] > 0
        assert reads.files() == set(), (method, reads.sites)
        assert reads.files("torchvision"), "the student's own losses read (torchvision's anchor matching)"
    cfg.distill.method = "unikd"
    student = jobs.build_detector(cfg.model, train_set(offline).num_classes)
    model, _, data = jobs._online_model(cfg, offline["teacher"], offline["ake"], student, train_set(offline), "cpu")
    losses, reads = forward(model, collate([data[i] for i in range(4)]))
    assert losses["loss_kd_ct"] > 0
    ours = {site: n for site, n in reads.sites.items() if site.startswith("unikd/")}
    assert reads.files() == {"unikd/transformer/matcher.py"} and sum(ours.values()) == 1, ours  # B̂ came with it
    _, reads = forward(model, collate([train_set(offline)[i] for i in range(4)]))  # targets without B̂
    ours = {site: n for site, n in reads.sites.items() if site.startswith("unikd/")}
    assert reads.files() == {"unikd/distill/common.py", "unikd/transformer/matcher.py"}, ours
    assert sum(ours.values()) == 2, ours  # once per batch each: the ground truth's copy and the cost matrix's
