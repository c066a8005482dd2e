"""What the multi-process tests share: a free local port and a gloo process group for one worker."""
from __future__ import annotations

import contextlib
import os
import socket
import sys
from collections.abc import Iterator

import torch
import torch.distributed as dist


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def process_group(rank: int, port: int, world: int) -> Iterator[None]:
    """One CPU thread and a gloo group on 127.0.0.1:`port`, destroyed on the way out.

    A worker that finishes leaves through `os._exit(0)`: gloo's threads can abort the interpreter's finalization
    ("terminate called without an active exception", SIGABRT, seen once in CI after the work was saved), so the
    worker skips it. The barrier keeps one rank from tearing the group down while the other still uses it.
    """
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        yield
        dist.barrier()
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
