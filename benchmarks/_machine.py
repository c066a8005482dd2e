"""The machine line every benchmark prints beside its figures.

int8 GEMM speed depends on the instruction set far more than fp32 does (AMX-int8 > AVX512-VNNI > AVX2), so a
speed ratio means nothing without it: the line names torch's CPU capability, the VNNI / AMX flags of
/proc/cpuinfo, the CPU, the core and thread counts, and the load average (the figures of a busy machine are
noisy; every benchmark here reports best-of-N times for that reason).
"""
from __future__ import annotations

import os
import platform

import torch

from ternq.native import cpu_flags

_FLAGS = ("avx2", "avx512f", "avx_vnni", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")
_ENV = ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "TERNQ_NATIVE_ARCH", "OMP_WAIT_POLICY")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, object]:
    flags = cpu_flags()
    return {
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "flags": {f: f in flags for f in _FLAGS},
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "loadavg": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "env": {k: os.environ[k] for k in _ENV if k in os.environ},
    }


def machine_line() -> str:
    """One line: torch, CPU capability, int8-relevant flags, CPU, cores, threads, load, ISA / OpenMP settings."""
    info = machine_info()
    flags = info["flags"]
    assert isinstance(flags, dict)
    shown = " ".join(f"{name}={'yes' if on else 'no'}" for name, on in flags.items()
                     if name in ("avx512_vnni", "avx_vnni", "amx_int8", "amx_tile"))
    load = info["loadavg"]
    load_text = "n/a" if load is None else "/".join(f"{v:.1f}" for v in load)  # type: ignore[union-attr]
    env = info["env"]
    env_text = f" | {' '.join(f'{k}={v}' for k, v in env.items())}" if env else ""  # type: ignore[union-attr]
    return (f"torch {info['torch']} | get_cpu_capability()={info['cpu_capability']} | {shown} | {info['cpu']} | "
            f"{info['cores']} cores | torch threads {info['threads']} | loadavg {load_text}{env_text}")


if __name__ == "__main__":
    print(machine_line())
