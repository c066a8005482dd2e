"""DNSMOS P.835: a non-intrusive estimate of how people would rate speech (SIG = the speech signal itself, BAK =
the background, OVRL = overall; 1 = bad .. 5 = excellent). Reed et al., "DNSMOS P.835", ICASSP 2022.

The model is Microsoft's ONNX network as shipped in PyPI `speechmos` (MIT; `dnsmos_models/sig_bak_ovr.onnx`),
run on onnxruntime. We do not call `speechmos.dnsmos.run`: that module imports librosa at import time, which
drags scipy, scikit-learn and numba into the `eval` extra (~150 MB) only to compute the mel spectrogram of the
P.808 model, a fourth score we do not report. P.835 reads the raw 16 kHz waveform, so this module reproduces
Microsoft's reference loop (DNS-Challenge `DNSMOS/dnsmos_local.py`, the same code as `speechmos.dnsmos`) without
it, step for step:

* the clip is repeated (doubled) until it is at least 9.01 s long;
* 9.01 s windows start every second (``int(floor(len / fs) - 9.01) + 1`` of them; the reference computes a
  window's end in floating point and skips a window that comes out one sample short, as those starting at 7 to
  10 s do, so this module does too); each window gets raw scores from the network, which a cubic (personalized)
  or quadratic (default) polynomial maps to the MOS scale;
* the clip's scores are the means over its windows.

Default: the **non-personalized** model and polynomials (`dnsmos_local.py` without `-p`, `speechmos.dnsmos.run`'s
default ``model_type="dnsmos"``): it rates any voice present, as suits TTS output with one speaker. The
personalized model (`pdnsmos_models`, made for personalized noise suppression, which penalizes interfering
talkers) is available with ``personalized=True``. `tests/test_bittts_dnsmos.py` checks the numbers against
`speechmos.dnsmos` itself where librosa is importable.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import torch

from ..data import audio
from ..extras import install_hint

__all__ = ["SAMPLE_RATE", "INPUT_LENGTH", "POLYNOMIALS", "model_path", "segments", "DNSMOS"]

SAMPLE_RATE = 16000  # the only rate the network was trained on
INPUT_LENGTH = 9.01  # seconds per window, as in Microsoft's reference

# raw network output -> MOS: np.poly1d coefficients (highest power first), copied from `get_polyfit_val` of
# Microsoft's dnsmos_local.py (identical in speechmos.dnsmos)
POLYNOMIALS: dict[bool, dict[str, tuple[float, ...]]] = {
    False: {"sig": (-0.08397278, 1.22083953, 0.0052439),
            "bak": (-0.13166888, 1.60915514, -0.39604546),
            "ovrl": (-0.06766283, 1.11546468, 0.04602535)},
    True: {"sig": (-0.01019296, 0.02751166, 1.19576786, -0.24348726),
           "bak": (-0.04976499, 0.44276479, -0.1644611, 0.96883132),
           "ovrl": (-0.00533021, 0.005101, 1.18058466, -0.11236046)},
}


def _version(distribution: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return "(version unknown)"


def model_path(personalized: bool = False) -> Path:
    """The ONNX file inside the installed `speechmos` package (found without importing it: its modules import
    librosa); RuntimeError naming the `eval` extra if it is not installed."""
    spec = importlib.util.find_spec("speechmos")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("DNSMOS needs the speechmos package (Microsoft's DNSMOS models): " + install_hint("eval"))
    folder = "pdnsmos_models" if personalized else "dnsmos_models"
    path = Path(next(iter(spec.submodule_search_locations))) / folder / "sig_bak_ovr.onnx"
    if not path.is_file():
        raise RuntimeError(f"{path} is missing: reinstall speechmos (pip install --force-reinstall speechmos)")
    return path


def segments(wav: np.ndarray, fs: int = SAMPLE_RATE) -> np.ndarray:
    """The 9.01 s windows Microsoft's reference scores, stacked [N, int(9.01 * fs)] (float32).

    The expressions are the reference's own (float arithmetic included), so the windows are the same samples."""
    x = np.asarray(wav, dtype=np.float32).reshape(-1)
    if x.size == 0:
        raise ValueError("DNSMOS of empty audio: nothing to rate")
    len_samples = int(INPUT_LENGTH * fs)
    while len(x) < len_samples:
        x = np.append(x, x)
    num_hops = int(np.floor(len(x) / fs) - INPUT_LENGTH) + 1
    out = []
    for idx in range(num_hops):
        seg = x[int(idx * fs): int((idx + INPUT_LENGTH) * fs)]
        if len(seg) < len_samples:
            continue
        out.append(seg)
    return np.stack(out)


class DNSMOS:
    """DNSMOS P.835 scorer: loads the network once (~1 MB), then rates clips.

    ``threads`` sets onnxruntime's intra-op threads (1 by default: evaluation measures speed at one thread and
    must not compete with it)."""

    def __init__(self, personalized: bool = False, threads: int = 1) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise RuntimeError("DNSMOS needs onnxruntime: " + install_hint("eval")) from None
        self.personalized = personalized
        self.path = model_path(personalized)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.session = ort.InferenceSession(os.fspath(self.path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.polynomials = {k: np.asarray(v) for k, v in POLYNOMIALS[personalized].items()}
        self.description = (f"DNSMOS P.835, Microsoft's {'personalized' if personalized else 'non-personalized'} "
                            f"model and polynomials ({self.path.parent.name}/{self.path.name} of speechmos "
                            f"{_version('speechmos')}), mean over 9.01 s windows as in dnsmos_local.py")

    def raw(self, wav: np.ndarray | torch.Tensor, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
        """The network's raw [N, 3] (sig, bak, ovrl) outputs for each window of the clip, before the polynomials."""
        x = wav.detach().float().cpu().reshape(-1) if isinstance(wav, torch.Tensor) else torch.from_numpy(
            np.ascontiguousarray(np.asarray(wav, dtype=np.float32).reshape(-1)))
        if x.numel() and not torch.isfinite(x).all():
            raise ValueError("DNSMOS: the audio has NaN or infinite samples")
        if x.numel() and x.abs().max() > 1:
            raise ValueError(f"DNSMOS: samples must lie in [-1, 1] (got peak {float(x.abs().max()):.3g})")
        x = audio.resample(x, sample_rate, SAMPLE_RATE).clamp(-1, 1)
        # one window per run, as the reference does (a batch of windows gave the same scores, no faster)
        return np.concatenate([self.session.run(None, {self.input_name: seg[None, :]})[0]
                               for seg in segments(x.numpy(), SAMPLE_RATE)])

    def __call__(self, wav: np.ndarray | torch.Tensor, sample_rate: int = SAMPLE_RATE) -> dict[str, float]:
        """{"sig", "bak", "ovrl"}: the clip's P.835 scores (means over its windows, as the reference)."""
        raw = self.raw(wav, sample_rate)
        return {name: float(np.mean([np.polyval(self.polynomials[name], r) for r in raw[:, k]]))
                for k, name in enumerate(("sig", "bak", "ovrl"))}
