"""The machine BitTTS runs on: the Debian tools it shells out to (installed when missing), and the CPU line
printed beside every speed figure."""
from __future__ import annotations

import os
import shutil
import subprocess

# executable -> Debian package
TOOLS = {"flite": "flite", "espeak-ng": "espeak-ng"}


def ensure_tools(tools: dict[str, str] | None = None, install: bool = True) -> None:
    """Make sure every executable in ``tools`` is on PATH, installing the Debian packages with apt-get when
    running as root; otherwise raise with the command to run."""
    tools = TOOLS if tools is None else tools
    missing = sorted({pkg for exe, pkg in tools.items() if shutil.which(exe) is None})
    if not missing:
        return
    command = "sudo apt-get install -y " + " ".join(missing)
    can_install = install and hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get")
    if not can_install:
        raise RuntimeError(f"missing Debian package(s) {', '.join(missing)}; install them with: {command}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    print(f"installing Debian package(s): {' '.join(missing)}", flush=True)
    try:
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True, env=env)
    except (OSError, subprocess.CalledProcessError) as e:
        raise RuntimeError(f"installing {', '.join(missing)} failed ({e}); run: {command}") from e
    still = sorted(exe for exe in tools if shutil.which(exe) is None)
    if still:
        raise RuntimeError(f"{', '.join(still)} still not on PATH after apt-get install; run: {command}")


def cpu_description() -> str:
    """torch's CPU capability and the int8 instruction-set flags: int8 speed depends on them (AMX-int8 >
    AVX512-VNNI > AVX2) far more than fp32 does, so a real-time factor means little without this line."""
    import torch

    from ternq.runtime import cpu_flags

    flags = cpu_flags()
    have = [f for f in ("avx512_vnni", "amx_int8") if f in flags]
    return f"CPU {torch.backends.cpu.get_cpu_capability()}" + (f" with {', '.join(have)}" if have else "")
