"""`skeleton`: build the float model `ternq.load_packed` fills, on the meta device, without initializing it.

Here rather than beside `load_packed` because the runtime builds skeletons too (a packed functional call's
Linear)."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["skeleton"]

# in-place ops that only write values, and every initializer of torch.nn.init (which dispatches as itself
# first): on a meta tensor (no values) they change nothing, but the random fills among them run Python
# decompositions there that import torch._dynamo (1-3 s, the bulk of a one-shot load)
_VALUE_FILLS = frozenset([*(getattr(torch.Tensor, name) for name in (
    "normal_", "uniform_", "random_", "exponential_", "log_normal_", "cauchy_", "geometric_", "bernoulli_",
    "erfinv_", "fill_", "zero_", "clamp_", "mul_", "add_", "sub_", "div_", "copy_")),
    *(getattr(nn.init, name) for name in dir(nn.init) if name.endswith("_") and not name.startswith("_"))])


class _Skeleton(torch.overrides.TorchFunctionMode):
    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in _VALUE_FILLS:
            target = args[0] if args else kwargs.get("tensor")  # nn.init passes its tensor by keyword
            if isinstance(target, Tensor) and target.is_meta:
                return target
        return func(*args, **kwargs)


@contextlib.contextmanager
def skeleton() -> Iterator[None]:
    """Build the float skeleton for `load_packed` under this: every tensor created goes to the ``meta`` device
    (no memory) and the weight initializations (``reset_parameters``, ``nn.init``) are skipped, since the file
    brings the values. Equivalent to ``with torch.device("meta"):`` but without its cost: initializing meta
    tensors runs torch's Python decompositions, which import ``torch._dynamo`` on first use (1-3 s, more than the
    rest of a one-shot load)::

        with ternq.skeleton():
            model = MyModel(config)
        model = ternq.load_packed("model.safetensors", model)
    """
    with torch.device("meta"), _Skeleton():
        yield
