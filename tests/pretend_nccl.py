"""NCCL's one hard rule on a CPU machine: a collective given a CPU tensor fails.

Inside ``pretend_nccl()`` a gloo process group answers "nccl" to ``torch.distributed.get_backend``,
torch accepts ``device="cuda"`` (the data stays on the CPU inside a tensor that reports cuda:0), and
every tensor collective of ``torch.distributed`` raises, as NCCL does, unless each tensor it gets is
such a CUDA tensor; then gloo runs on the CPU data.  Code that picks the collective device from the
backend passes; code that hands CPU tensors to collectives fails here as it would on GPUs.
Object collectives (``all_gather_object``...) choose their own device inside torch and run unchanged.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

CUDA = torch.device("cuda", 0)
TENSOR_COLLECTIVES = (
    "all_reduce", "broadcast", "send", "recv", "isend", "irecv", "all_gather", "reduce", "all_gather_into_tensor",
    "reduce_scatter_tensor", "all_to_all_single", "scatter", "gather",
)  # fmt: skip


class NCCLRejectsCPUTensor(RuntimeError):
    pass


class OnPretendCuda(torch.Tensor):
    """Reports cuda:0; holds its data in ``inner``, a CPU tensor."""

    @staticmethod
    def __new__(cls, inner: torch.Tensor):
        t = torch.Tensor._make_wrapper_subclass(
            cls, inner.shape, strides=inner.stride(), dtype=inner.dtype, device=CUDA,
            storage_offset=inner.storage_offset(),
        )  # fmt: skip
        t.inner = inner
        return t

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return _run(func, args, kwargs or {})


def _run(func, args, kwargs):
    """Run an aten op on the CPU data; the result is (pretend) CUDA when an input was or device=cuda."""
    wanted = kwargs.get("device")
    wanted = torch.device(wanted).type if wanted is not None else None
    if wanted == "cuda":
        kwargs = {**kwargs, "device": torch.device("cpu")}
    seen = []

    def unwrap(x):
        if isinstance(x, OnPretendCuda):
            seen.append(x)
            return x.inner
        return x

    args, kwargs = tree_map(unwrap, (args, kwargs))
    out = func(*args, **kwargs)
    if wanted == "cuda" or (seen and wanted != "cpu"):
        return tree_map(lambda x: OnPretendCuda(x) if type(x) is torch.Tensor else x, out)
    return out


class _CudaFactories(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return _run(func, args, kwargs or {})


def _checked(name: str, original):
    def collective(*args, **kwargs):
        for t in _leaves((args, kwargs)):
            if not t.is_cuda:
                raise NCCLRejectsCPUTensor(
                    f"{name} got a CPU tensor (shape {tuple(t.shape)}, {t.dtype}): NCCL accepts CUDA tensors only"
                )
        args, kwargs = tree_map(lambda x: x.inner if isinstance(x, OnPretendCuda) else x, (args, kwargs))
        return original(*args, **kwargs)

    return collective


def _leaves(tree) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []
    tree_map(lambda x: found.append(x) if isinstance(x, torch.Tensor) else None, tree)
    return found


@contextmanager
def pretend_nccl():
    """The current (gloo) process group behaves, for the caller, like NCCL on a GPU (see module doc)."""
    saved = {name: getattr(dist, name) for name in (*TENSOR_COLLECTIVES, "get_backend")}
    saved_to, saved_init, saved_current = torch.Tensor.to, torch.cuda._lazy_init, torch.cuda.current_device

    def to(self, *args, **kwargs):  # Tensor.to checks for a CUDA build before dispatching: route around it
        target = kwargs.get("device", next((a for a in args if isinstance(a, (str, torch.device))), None))
        if target is None or torch.device(target).type != "cuda":
            return saved_to(self, *args, **kwargs)
        dtype = kwargs.get("dtype", next((a for a in args if isinstance(a, torch.dtype)), None))
        return torch.ops.aten._to_copy.default(self, device=CUDA, **({"dtype": dtype} if dtype else {}))

    try:
        for name in TENSOR_COLLECTIVES:
            setattr(dist, name, _checked(name, saved[name]))
        dist.get_backend = lambda group=None: "nccl"
        torch.Tensor.to = to
        torch.cuda._lazy_init = lambda: None
        torch.cuda.current_device = lambda: 0
        with _CudaFactories():
            yield
    finally:
        for name, value in saved.items():
            setattr(dist, name, value)
        torch.Tensor.to, torch.cuda._lazy_init, torch.cuda.current_device = saved_to, saved_init, saved_current
