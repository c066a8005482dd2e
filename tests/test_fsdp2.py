"""A QAT model under FSDP2 (`fully_shard`): two gloo processes on CPU compute what one unsharded process does.

FSDP2 reads and replaces each parameter through its module attribute; a quantized weight's attribute gives the
sharded parameter itself while it is sharded, and the quantized value of the gathered tensor FSDP2 puts there for
each forward and backward (`ternq.weight_attr`)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from gloo import free_port, process_group
from torch import nn

import ternq

WORLD = 2


class _Net(nn.Module):
    """A layer, a parameter read through einsum (weight-only), a tie to it, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.mix = nn.Parameter(torch.randn(8, 8) / 3)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inp(x))
        return self.head(torch.tanh(torch.einsum("bi,oi->bo", h, self.mix)))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return ternq.quantize(_Net(), config=ternq.TernaryConfig(act_bits=None, input_norm=None))


def _batch() -> torch.Tensor:
    return torch.randn(4, 6, generator=torch.Generator().manual_seed(1))


def _worker(rank: int, port: int, out_dir: str) -> None:
    from torch.distributed.fsdp import fully_shard

    with process_group(rank, port, WORLD):
        model = _model()
        fully_shard(model.inp)
        fully_shard(model)
        out = model(_batch())
        out.square().sum().backward()
        grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
        torch.save({"out": out.detach(), "grads": grads}, Path(out_dir) / f"rank{rank}.pt")


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch built without gloo")
def test_fsdp2_sharded_qat_model_equals_the_unsharded_one(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    model = _model()
    out = model(_batch())
    out.square().sum().backward()
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(got["out"], out.detach(), msg=f"rank {rank}: output")
        for name, p in model.named_parameters():
            torch.testing.assert_close(got["grads"][name], p.grad, msg=f"rank {rank}: gradient of {name}")
