"""A checkpoint's classes against a dataset's: the same category ids and names, or a refusal saying what
differs. A dataset whose categories are a subset of the checkpoint's is accepted only when asked for
(``unikd eval --subset``): the detections of the classes the dataset lacks are then dropped.
"""
from __future__ import annotations

from .errors import UserError


class CategoryMismatchError(UserError, ValueError):
    """A checkpoint trained on other categories than the dataset it is used with."""


def dataset_categories(dataset) -> list[dict]:
    """``[{"id", "name"}, ...]`` of a :class:`~unikd.data.CocoDetection`, by ascending id (= label order)."""
    return [{"id": c, "name": dataset.coco.cats[c]["name"]} for c in dataset.category_ids]


def checkpoint_categories(meta: dict) -> list[dict]:
    """The categories a checkpoint's meta records; names are None in checkpoints that stored only the ids."""
    if "categories" in meta:
        return meta["categories"]
    return [{"id": c, "name": None} for c in meta["category_ids"]]


def check_categories(what: str, trained: list[dict], data: list[dict], subset: bool = False) -> None:
    """Raise a CategoryMismatchError unless ``trained`` and ``data`` name the same categories (by id, and by
    name where ``trained`` records names); with ``subset``, ``data`` may lack some of ``trained``'s."""
    names = {c["id"]: c["name"] for c in trained}
    data_names = {c["id"]: c["name"] for c in data}
    problems = []
    extra = sorted(data_names.keys() - names.keys())
    if extra:
        problems.append(f"the data has category ids {extra} that {what} was not trained on")
    missing = sorted(names.keys() - data_names.keys())
    if missing and not subset:
        problems.append(f"{what} has category ids {missing} that the data lacks (pass --subset to evaluate "
                        "on the data's categories only)")
    renamed = [f"{i}: {names[i]!r} vs {data_names[i]!r}" for i in sorted(names.keys() & data_names.keys())
               if names[i] is not None and names[i] != data_names[i]]
    if renamed:
        problems.append("category names differ (id: trained vs data) " + ", ".join(renamed))
    if problems:
        raise CategoryMismatchError(f"{what} does not fit the data: " + "; ".join(problems))
