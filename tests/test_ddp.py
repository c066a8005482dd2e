"""A QAT model under DistributedDataParallel: two gloo processes on CPU give one process's gradients."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from gloo import free_port, process_group
from torch import nn
from torch.nn.utils import parametrizations

import ternq

WORLD = 2
BATCH = 8  # global batch, split evenly over the processes


def _model() -> nn.Module:
    """A small conv stack like the BitTTS vocoder's: weight-normed conv, transposed-conv upsampler, head."""
    torch.manual_seed(0)
    model = nn.Sequential(
        parametrizations.weight_norm(nn.Conv1d(3, 8, 3, padding=1)),
        nn.LeakyReLU(0.1),
        nn.ConvTranspose1d(8, 4, 4, stride=2, padding=1),
        nn.Flatten(1),
        nn.Linear(4 * 12, 2),
    )
    return ternq.quantize(model, config=ternq.TernaryConfig(granularity="channel"))


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, 3, 6, generator=g), torch.randn(BATCH, 2, generator=g)


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name.removeprefix("module."): p.grad.detach().clone() for name, p in model.named_parameters()}


def _worker(rank: int, port: int, out_dir: str) -> None:
    with process_group(rank, port, WORLD):
        ddp = nn.parallel.DistributedDataParallel(_model())
        x, y = _batch()
        shard = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
        # DDP averages the gradients over processes: the per-shard mean loss gives the global mean's gradient
        nn.functional.mse_loss(ddp(x[shard]), y[shard]).backward()
        torch.save(_grads(ddp), Path(out_dir) / f"rank{rank}.pt")


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch built without gloo")
def test_ddp_gradients_equal_single_process(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)

    model = _model()
    assert all(ternq.is_quantized(model[i]) for i in (0, 2, 4))
    x, y = _batch()
    nn.functional.mse_loss(model(x), y).backward()
    expected = _grads(model)

    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert set(got) == set(expected)
        for name, grad in expected.items():
            assert grad.abs().sum() > 0, name
            torch.testing.assert_close(got[name], grad, rtol=0, atol=1e-6, msg=f"rank {rank}: {name}")
