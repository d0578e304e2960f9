"""The store's shards: append-only safetensors files, each committed by its index file.

A shard ``STORE/shards/rankRRR-SSSSSS.safetensors`` holds the fields of its records as tensors named
``"{position}/{field}"``. Its index ``rankRRR-SSSSSS.json`` lists the records in order (image id, flip, shorter
side, image size after the resize, SHA-256 of the record's tensors) with the shard's byte count and SHA-256.
Both are written to a temporary file and renamed, the index last: a shard counts once its index exists, so a
dump killed at any point leaves whole committed shards and, at worst, an uncommitted shard file that the next
dump removes and redoes. Each DDP rank writes its own ``rankRRR`` files, so ranks never write the same file.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from safetensors.torch import save_file
from torch import Tensor

from unikd.distill.ake_file import tensors_sha256
from unikd.errors import CorruptFileError, OutputError

SHARDS = "shards"
NAME = re.compile(r"rank(\d{3})-(\d{6})")


def file_sha256(path: Path) -> str:
    """SHA-256 (hex) of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_indexes(root: Path) -> list[dict]:
    """The index of every committed shard of the store ``root``, by name; each with ``"name"`` added."""
    indexes = []
    for path in sorted((Path(root) / SHARDS).glob("rank*.json")):
        try:
            index = json.loads(path.read_text())
            index["records"], index["sha256"], index["bytes"]  # noqa: B018 (the keys must be there)
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
            raise CorruptFileError(f"{path}: not a readable shard index ({err!r})") from None
        indexes.append({**index, "name": path.stem})
    return indexes


def uncommitted(root: Path) -> list[Path]:
    """Files a killed dump left: temporary files and shards without an index."""
    folder = Path(root) / SHARDS
    return sorted([*folder.glob("*.tmp"),
                   *(p for p in folder.glob("rank*.safetensors") if not p.with_suffix(".json").is_file())])


class ShardWriter:
    """Collects records and writes them as shards of ``records_per_shard`` records, named for ``rank``.

    ``add(augmentation, tensors)`` appends one record (``tensors``: field -> tensor, exactly the manifest's
    ``fields``); ``flush()`` commits the records collected so far. Numbering continues after the rank's committed
    shards.
    """

    def __init__(self, root: Path, rank: int, records_per_shard: int, fields: dict):
        if records_per_shard < 1:
            raise ValueError(f"records_per_shard must be at least 1, got {records_per_shard}")
        self.folder = Path(root) / SHARDS
        self.folder.mkdir(parents=True, exist_ok=True)
        self.rank, self.records_per_shard, self.fields = rank, records_per_shard, fields
        done = [int(m.group(2)) for p in self.folder.glob(f"rank{rank:03d}-*.json") if (m := NAME.fullmatch(p.stem))]
        self.next = max(done, default=-1) + 1
        self.records: list[dict] = []
        self.tensors: dict[str, Tensor] = {}

    def add(self, augmentation: dict, tensors: dict[str, Tensor]) -> None:
        problems = field_problems(self.fields, tensors)
        if problems:
            raise ValueError("a record that does not fit the manifest: " + "; ".join(problems))
        position = len(self.records)
        named = {f"{position}/{field}": t.detach().cpu().contiguous() for field, t in tensors.items()}
        self.records.append({**augmentation, "sha256": tensors_sha256(tensors)})
        self.tensors.update(named)
        if len(self.records) == self.records_per_shard:
            self.flush()

    def flush(self) -> None:
        """Write the collected records as one shard, then its index (the commit)."""
        if not self.records:
            return
        name = f"rank{self.rank:03d}-{self.next:06d}"
        shard = self.folder / f"{name}.safetensors"
        try:
            save_file(self.tensors, shard.with_suffix(".safetensors.tmp"))
            shard.with_suffix(".safetensors.tmp").replace(shard)
            index = {"shard": shard.name, "bytes": shard.stat().st_size, "sha256": file_sha256(shard),
                     "records": self.records}
            tmp = self.folder / f"{name}.json.tmp"
            tmp.write_text(json.dumps(index) + "\n")
            self._commit(tmp, shard.with_suffix(".json"))
        except OSError as err:
            raise OutputError(f"cannot write {shard}: {err.strerror or err}") from None
        self.next += 1
        self.records, self.tensors = [], {}

    @staticmethod
    def _commit(tmp: Path, index: Path) -> None:
        tmp.replace(index)


def field_problems(fields: dict, tensors: dict[str, Tensor]) -> list[str]:
    """What differs between a record's ``tensors`` and the manifest's ``fields`` (names, dtypes, shapes; a
    ``None`` in a spec's shape matches any size)."""
    problems = [f"field {f} missing" for f in sorted(fields.keys() - tensors.keys())]
    problems += [f"unexpected field {f}" for f in sorted(tensors.keys() - fields.keys())]
    for field in sorted(fields.keys() & tensors.keys()):
        t, spec = tensors[field], fields[field]
        fits = t.ndim == len(spec["shape"]) and all(s is None or s == n for s, n in zip(spec["shape"], t.shape))
        if str(t.dtype).removeprefix("torch.") != spec["dtype"] or not fits:
            problems.append(f"{field} is {str(t.dtype).removeprefix('torch.')} {list(t.shape)}, the manifest says "
                            f"{spec['dtype']} {spec['shape']}")
    return problems
