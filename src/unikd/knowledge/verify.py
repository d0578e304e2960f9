"""``unikd store verify STORE``: check all of a knowledge store and name every problem.

Checked: the manifest; every shard against its index (present, byte count, SHA-256 of the whole file, readable
as safetensors); every record's fields (names, dtypes, shapes) and SHA-256; records stored twice, records the
manifest does not expect, and expected records that are missing (an unfinished dump); files an interrupted
dump left uncommitted.
"""
from __future__ import annotations

from pathlib import Path

from safetensors import SafetensorError, safe_open

from unikd.distill.ake_file import tensors_sha256

from .manifest import describe, expected_keys, read_manifest, variant_key
from .shards import SHARDS, field_problems, file_sha256, read_indexes, uncommitted

LISTED = 5  # missing records named one by one; the rest are counted


def verify_store(root: str | Path) -> tuple[list[str], dict]:
    """``(problems, summary)``: one line per problem (empty: the store is whole and complete), and the counts
    ``{"records", "shards", "bytes", "expected"}``. A store that cannot be opened at all raises."""
    root = Path(root)
    manifest = read_manifest(root)
    fields = manifest["fields"]
    problems: list[str] = []
    seen: dict[tuple, str] = {}
    total_bytes = 0
    indexes = read_indexes(root)
    for index in indexes:
        shard = root / SHARDS / index["shard"]
        if not shard.is_file():
            problems.append(f"{shard.name}: missing (listed by {index['name']}.json)")
            continue
        total_bytes += shard.stat().st_size
        if shard.stat().st_size != index["bytes"]:
            problems.append(f"{shard.name}: {shard.stat().st_size} bytes, {index['bytes']} were written (truncated or "
                            "extended)")
        if file_sha256(shard) != index["sha256"]:
            problems.append(f"{shard.name}: SHA-256 differs from the one recorded when it was written (altered or "
                            "damaged)")
        problems += [f"{shard.name}: {p}" for p in _record_problems(shard, index["records"], fields)]
        for record in index["records"]:
            key = variant_key(record["image_id"], record["hflip"], record["min_size"])
            if key in seen:
                problems.append(f"{describe(key)} is stored twice ({seen[key]} and {shard.name})")
            seen[key] = shard.name
    expected = expected_keys(manifest)
    missing = [key for key in expected if key not in seen]
    if missing:
        named = ", ".join(describe(k) for k in missing[:LISTED])
        more = f" and {len(missing) - LISTED} more" if len(missing) > LISTED else ""
        problems.append(f"{len(missing)} of {len(expected)} records missing (an unfinished dump: run it again to "
                        f"complete it): {named}{more}")
    unexpected = seen.keys() - set(expected)
    problems += [f"{describe(k)} in {seen[k]} is not a record the manifest expects" for k in sorted(unexpected, key=str)]
    problems += [f"{p.name}: left uncommitted by an interrupted dump (the next dump removes it)" for p in uncommitted(root)]
    summary = {"records": len(seen), "shards": len(indexes), "bytes": total_bytes, "expected": len(expected)}
    return problems, summary


def _record_problems(shard: Path, records: list[dict], fields: dict) -> list[str]:
    """What is wrong with the records of one shard file (unreadable, fields, checksums)."""
    problems = []
    try:
        with safe_open(shard, "pt") as f:
            names = set(f.keys())
            for position, record in enumerate(records):
                key = describe(variant_key(record["image_id"], record["hflip"], record["min_size"]))
                tensors = {field: f.get_tensor(f"{position}/{field}") for field in fields
                           if f"{position}/{field}" in names}
                bad = field_problems(fields, tensors)
                if bad:
                    problems.append(f"record of {key}: " + "; ".join(bad))
                elif tensors_sha256(tensors) != record["sha256"]:
                    problems.append(f"record of {key}: its tensors fail their SHA-256")
    except (SafetensorError, OSError) as err:
        problems.append(f"not a readable safetensors file ({err})")
    return problems
