"""Reading a knowledge store: random access to the record of an image under an augmentation, checked.

Opening a store reads its manifest and every shard index, and refuses a shard whose file is missing or whose
size differs from the one its index records (a truncated shard), and a record stored twice. Reading a record
checks its fields' dtypes and shapes against the manifest and the SHA-256 of its tensors against the one
recorded when it was written: damaged bytes are refused, never served. ``unikd store verify`` checks whole
shards (:mod:`unikd.knowledge.verify`).
"""
from __future__ import annotations

from pathlib import Path

from safetensors import SafetensorError, safe_open
from torch import Tensor

from unikd.distill.ake_file import tensors_sha256
from unikd.errors import CorruptFileError

from .manifest import KnowledgeStoreError, describe, read_manifest, variant_key
from .shards import SHARDS, field_problems, read_indexes

VERIFY_HINT = "run 'unikd store verify' on it, and 'unikd dump' again to remake the store"


class KnowledgeStore:
    """The store in folder ``root``; ``record(image_id, hflip, min_size)`` gives one record's fields.

    Attributes: ``root``, ``manifest`` (:mod:`unikd.knowledge.manifest`), ``fields`` (its field specs).
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        self.fields = self.manifest["fields"]
        self._where: dict[tuple, tuple[Path, int, dict]] = {}
        for index in read_indexes(self.root):
            shard = self.root / SHARDS / index["shard"]
            if not shard.is_file():
                raise CorruptFileError(f"{shard} is missing (its index {index['name']}.json lists it); {VERIFY_HINT}")
            size = shard.stat().st_size
            if size != index["bytes"]:
                raise CorruptFileError(f"{shard} has {size} bytes, {index['bytes']} were written: it is truncated or "
                                       f"altered; {VERIFY_HINT}")
            for position, record in enumerate(index["records"]):
                key = variant_key(record["image_id"], record["hflip"], record["min_size"])
                if key in self._where:
                    raise CorruptFileError(f"{self.root}: {describe(key)} is stored twice ({self._where[key][0].name} "
                                           f"and {shard.name}); {VERIFY_HINT}")
                self._where[key] = (shard, position, record)

    def __len__(self) -> int:
        return len(self._where)

    def keys(self) -> list[tuple[int, bool, int | None]]:
        """Every stored ``(image_id, hflip, min_size)``."""
        return list(self._where)

    def record(self, image_id: int, hflip: bool, min_size: int | None,
               image_size: tuple[int, int] | None = None) -> dict[str, Tensor]:
        """The fields of the record of ``image_id`` flipped or not, resized to shorter side ``min_size`` (None: the
        longer-side rule), as the manifest describes them (CPU tensors).

        ``image_size`` ``(h, w)``: the size of the sample the record is for; refused unless it is the size the
        record was computed at. A variant that is not stored is refused (:class:`KnowledgeStoreError`), as is a
        record whose bytes or fields are damaged (:class:`~unikd.errors.CorruptFileError`).
        """
        key = variant_key(image_id, hflip, min_size)
        if key not in self._where:
            stored = "; ".join(describe(k) for k in sorted(self._where, key=str) if k[0] == key[0]) or "none"
            raise KnowledgeStoreError(f"{self.root} has no record of {describe(key)} (stored: {stored}); dump the "
                                      "store with the training's augmentation (data.hflip, data.size or "
                                      "data.min_size / data.max_size)")
        shard, position, entry = self._where[key]
        if image_size is not None and list(image_size) != entry["image_size"]:
            raise KnowledgeStoreError(f"{self.root}: the record of {describe(key)} was computed at {entry['image_size']}"
                                      f" (h, w), the sample is {list(image_size)}: the dataset's images are not "
                                      "those the store was dumped from")
        try:
            with safe_open(shard, "pt") as f:
                tensors = {field: f.get_tensor(f"{position}/{field}") for field in self.fields}
        except (SafetensorError, OSError) as err:
            raise CorruptFileError(f"{shard}: cannot read the record of {describe(key)} ({err}); {VERIFY_HINT}") \
                from None
        problems = field_problems(self.fields, tensors)
        if problems:
            raise CorruptFileError(f"{shard}: the record of {describe(key)} does not fit the manifest ("
                                   + "; ".join(problems) + f"); {VERIFY_HINT}")
        if tensors_sha256(tensors) != entry["sha256"]:
            raise CorruptFileError(f"{shard}: the record of {describe(key)} fails its SHA-256 (the shard was altered "
                                   f"or damaged after it was written); {VERIFY_HINT}")
        return tensors
