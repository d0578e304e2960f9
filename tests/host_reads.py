"""Count, by source line, the calls that make the host read the values of a tensor that lives on the training
device: on CUDA each is a host-device sync (the host waits for the device's queue to drain); on the CPU they cost
nothing, so a test on the CPU has to find the calls themselves.

Which tensors "live on the device" is tracked, since on the CPU every tensor is a host tensor: the ones marked by
:meth:`HostReads.on_device` (a model's parameters and buffers, the batch as the trainer moves it), whatever a
torch call makes from a marked tensor, and what ``.to`` sends to a device (:func:`unikd.host_copy.to_device`); a
factory call's output (``torch.zeros(..., device=d)``) once combined with a marked tensor (one read back on its
own is missed). Reads: values into Python (``item``, ``tolist``,
``numpy``, ``bool()`` / ``int()`` / ``float()``), outputs whose size depends on values (``nonzero``,
``masked_select``, ``unique``, indexing with a boolean mask), ``equal`` / ``allclose`` and ``cpu`` — of a marked
tensor. A ``.to("cpu")`` of a marked tensor is not told apart from a copy to the CPU as the training device.

Seen: Python-level torch calls (a :class:`~torch.overrides.TorchFunctionMode`). Not seen: what C++ kernels and
autograd's backward do inside; the GPU check (``benchmarks/gpu_check.py``, ``torch.cuda.set_sync_debug_mode``)
measures those.
"""
from __future__ import annotations

import traceback
from collections import Counter
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

READS = {"item", "tolist", "numpy", "__array__", "__bool__", "__int__", "__float__", "__index__", "nonzero",
         "argwhere", "masked_select", "unique", "unique_consecutive", "equal", "allclose", "cpu"}
MASK_INDEXING = {"__getitem__", "__setitem__", "index_put", "index_put_"}
MARK = "_host_reads_on_device"
TORCH = Path(torch.__file__).parent


def _tensors(*trees) -> list[torch.Tensor]:
    return [t for t in tree_flatten(trees)[0] if isinstance(t, torch.Tensor)]


def _marked(t: torch.Tensor) -> bool:
    return getattr(t, MARK, False)


def _site() -> str:
    """``package/file.py:line`` of the innermost caller outside torch and this file."""
    for frame in reversed(traceback.extract_stack()):
        path = Path(frame.filename)
        if path != Path(__file__) and TORCH not in path.parents:
            parts = path.parts
            package = max((i for i, p in enumerate(parts[:-1]) if p in ("unikd", "torchvision")),
                          default=len(parts) - 1)
            return f"{'/'.join(parts[package:])}:{frame.lineno}"
    return "?"


class HostReads(TorchFunctionMode):
    """``with HostReads() as reads: reads.on_device(model, images, targets); ...``; then ``reads.sites``, a
    Counter of ``file:line`` → reads, and :meth:`files`."""

    def __init__(self):
        super().__init__()
        self.sites: Counter[str] = Counter()

    @staticmethod
    def on_device(*things) -> None:
        """Mark tensors, and modules' parameters and buffers, as living on the device."""
        for thing in things:
            tensors = ([*thing.parameters(), *thing.buffers()] if isinstance(thing, torch.nn.Module)
                       else _tensors(thing))
            for t in tensors:
                setattr(t, MARK, True)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        inputs = _tensors(args, kwargs)
        if name in READS and inputs and _marked(inputs[0]):
            self.sites[_site()] += 1
        if name in MASK_INDEXING and len(args) > 1 and any(
                t.dtype == torch.bool and _marked(t) for t in _tensors(args[1])):
            self.sites[_site()] += 1
        out = func(*args, **kwargs)
        if name == "cpu" and out is args[0]:  # on the CPU, .cpu() gives the tensor itself: a host copy of it
            out = out.view(out.shape)
        sent = name == "to" and any(isinstance(a, (torch.device, str)) for a in [*args[1:], kwargs.get("device")])
        if name != "cpu" and (sent or any(_marked(t) for t in inputs)):
            self.on_device(out)
            if name.endswith("_") or name == "__setitem__":
                self.on_device(args[0])
        return out

    def files(self, package: str = "unikd") -> set[str]:
        """The files of ``package`` with a read, without line numbers."""
        return {site.rsplit(":", 1)[0] for site in self.sites if site.startswith(f"{package}/")}
