"""The training set seen sample by sample with the key of the augmentation each sample was drawn under: what the
loader-side views of the training set (the seeded ``B̂``, the stored knowledge) add to a sample is looked up or
seeded by that key."""
from __future__ import annotations

from torch import Tensor
from torch.utils.data import Dataset

from unikd.data import CocoDetection

from .manifest import variant_key


def min_size_of(dataset: CocoDetection, choice: int) -> int | None:
    """The shorter side of scale ``choice`` of the dataset's resize (None under a longer-side rule)."""
    return dataset.resize.min_sizes[choice] if dataset.resize.min_sizes else None


class AugmentedSamples(Dataset):
    """A view of ``dataset`` that follows its epoch (``set_epoch``, ``epoch``) and serves each sample with the key
    of its augmentation (:meth:`sample`); subclasses add to the target in ``__getitem__``."""

    def __init__(self, dataset: CocoDetection):
        self.dataset = dataset
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def sample(self, index: int) -> tuple[Tensor, dict, tuple[int, bool, int | None]]:
        """``(image [3, H, W], target, key)``: sample ``index`` this epoch and
        :func:`unikd.knowledge.manifest.variant_key` of its image, flip and shorter side."""
        image, target = self.dataset[index]
        _, choice = self.dataset.augmentation(index)
        return image, target, variant_key(target["image_id"], target["flipped"], min_size_of(self.dataset, choice))
