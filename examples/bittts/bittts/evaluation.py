"""`evaluate_model`: size, intelligibility, mel-cepstral distortion and speed of an exported BitTTS model.

* size: the file, and the bytes of each part's tensors (by name prefix; packed = codes + scales), plus the
  paper's size table for the model's architecture (`bittts.sizes.size_table`);
* intelligibility: WER / CER of pocketsphinx transcripts of the synthesized sentences (`bittts.metrics`), next to
  the same numbers for flite's reference rendering of the same sentences (the recognizer's floor on this text);
* MCD: mel-cepstral distortion (dB, DTW-aligned) between each synthesized sentence and its flite reference;
* speed: real-time factor (model seconds / audio seconds; espeak-ng excluded) at each thread count, after one
  warm-up utterance.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from . import audio, metrics
from .inference import Synthesis, Synthesizer
from .limits import MAX_SENTENCE_CHARS, MAX_TEXT_BYTES
from .sizes import PARTS, format_size_table, part_bytes, size_table

__all__ = ["check_sentence", "read_sentences", "file_sizes", "fastest_pass", "evaluate_model", "format_report", "write_report"]


def check_sentence(sentence: str, what: str) -> str:
    """`sentence` stripped, if it is non-empty and at most MAX_SENTENCE_CHARS long; ValueError otherwise."""
    text = sentence.strip()
    if not text:
        raise ValueError(f"{what} is empty: give a sentence to speak")
    if len(text) > MAX_SENTENCE_CHARS:
        raise ValueError(f"{what} has {len(text):,} characters, more than the {MAX_SENTENCE_CHARS:,} of one "
                         "utterance: split it into sentences (one per line with --text-file)")
    return text


def read_sentences(path: str | os.PathLike[str], limit: int | None = None) -> list[str]:
    """Non-empty lines of a UTF-8 text file (the first `limit`), each checked by `check_sentence`.

    Reads at most MAX_TEXT_BYTES and one line of at most ~4 x MAX_SENTENCE_CHARS bytes at a time, so memory is
    bounded whatever the file is (a device such as /dev/zero, a huge or binary file)."""
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    name = os.fspath(path)
    if os.path.isdir(name):
        raise ValueError(f"{name} is a directory: give a text file with one sentence per line")
    sentences: list[str] = []
    total, line_bytes = 0, 4 * MAX_SENTENCE_CHARS + 8  # UTF-8: at most 4 bytes per character, and the newline
    with open(name, "rb") as f:
        for number in itertools.count(1):
            raw = f.readline(line_bytes)
            if not raw:
                break
            total += len(raw)
            if total > MAX_TEXT_BYTES:
                raise ValueError(f"{name} is larger than {MAX_TEXT_BYTES:,} bytes: split it into smaller files")
            if len(raw) == line_bytes and not raw.endswith(b"\n"):
                raise ValueError(f"{name}: line {number} is longer than {MAX_SENTENCE_CHARS:,} characters (one "
                                 "utterance): split it into sentences")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{name}: line {number} is not UTF-8 text (byte {e.start}): give a text file") from None
            if line.strip():
                sentences.append(check_sentence(line, f"{name}: line {number}"))
                if limit is not None and len(sentences) == limit:
                    break
    if not sentences:
        raise ValueError(f"{name} has no non-empty line to synthesize")
    return sentences


def file_sizes(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Bytes of a ternq file: total, header (with the metadata), and per part: all tensors, and the packed
    ones (codes + scales) among them. Read from the header alone."""
    import ternq

    with ternq.open(path) as f:
        stored = f.tensor_bytes()
        sizes = {name: n for name, (_, n) in stored.items()}
        packed = {name: n for name, (role, n) in stored.items() if role != "float"}
        weights = sum(math.prod(shape) for shape in f.shapes().values())
        return {"bytes": f.file_size, "header_bytes": f.header_size, "parts": part_bytes(sizes),
                "packed_parts": part_bytes(packed), "packed_layers": len(f.layers), "parameters": weights}


def fastest_pass(synth: Synthesizer, ids: Sequence[Sequence[int]], threads: int, repeats: int = 3
                 ) -> list[Synthesis]:
    """Synthesize every utterance `repeats` times at `threads` torch threads, after a warm-up utterance (the
    first calls at a thread count or input length pay one-time costs); returns the pass with the least model
    time."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        synth.synthesize_ids(ids[0])
        passes = [[synth.synthesize_ids(x) for x in ids] for _ in range(repeats)]
    finally:
        torch.set_num_threads(before)
    return min(passes, key=lambda runs: sum(r.seconds for r in runs))


def _rtf(synth: Synthesizer, ids: list[list[int]], threads: int, repeats: int = 3) -> float:
    """Model seconds / audio seconds over all utterances at `threads` threads, in the fastest of `repeats`
    passes."""
    runs = fastest_pass(synth, ids, threads, repeats)
    return sum(r.seconds for r in runs) / max(sum(r.duration for r in runs), 1e-9)


def evaluate_model(model: str | os.PathLike[str] | None, sentences: Sequence[str], out_dir: str | os.PathLike[str],
                   *, reference_voice: str = "slt", threads: Sequence[int] = (1, 2),
                   progress: bool = True) -> dict[str, Any]:
    """Evaluate an exported model on `sentences`; writes the wavs under `out_dir` and returns the report dict
    (what report.json holds). `model` None = the shipped pretrained model."""
    from tqdm import tqdm

    from .corpus import synthesize_flite

    out = Path(out_dir)
    (out / "wavs").mkdir(parents=True, exist_ok=True)
    (out / "reference").mkdir(parents=True, exist_ok=True)
    synth = Synthesizer(model)
    utterances: list[dict[str, Any]] = []
    all_ids: list[list[int]] = []
    for i, sentence in enumerate(tqdm(sentences, desc="evaluate", unit="sentence", disable=not progress), 1):
        phonemes, ids = synth.text_to_ids(sentence)
        result = synth.synthesize_ids(ids, phonemes)
        ref, ref_rate = synthesize_flite(sentence, reference_voice)
        ref = audio.resample(ref, ref_rate, synth.sample_rate)
        wav_path, ref_path = out / "wavs" / f"{i:04d}.wav", out / "reference" / f"{i:04d}.wav"
        audio.write_wav(wav_path, result.wav, synth.sample_rate)
        audio.write_wav(ref_path, ref, synth.sample_rate)
        hyp, ref_hyp = metrics.transcribe(result.wav), metrics.transcribe(ref)
        utterances.append({
            "text": sentence, "phonemes": phonemes, "wav": os.path.relpath(wav_path, out),
            "reference_wav": os.path.relpath(ref_path, out), "duration_s": result.duration,
            "transcript": hyp, "reference_transcript": ref_hyp,
            "wer": metrics.wer(sentence, hyp), "cer": metrics.cer(sentence, hyp),
            "mcd_db": metrics.mcd_dtw(ref, result.wav),
        })
        all_ids.append(ids)
    texts = [u["text"] for u in utterances]
    model_rates = metrics.error_rates(texts, [u["transcript"] for u in utterances])
    ref_rates = metrics.error_rates(texts, [u["reference_transcript"] for u in utterances])
    mcds = [u["mcd_db"] for u in utterances]
    rows = size_table(synth.cfg)
    sizes = file_sizes(synth.path)
    return {
        "model": {"path": os.fspath(synth.path), "preset": synth.cfg.name,
                  "quant": {"scheme": synth.cfg.quant.scheme, "scope": synth.cfg.quant.scope,
                            "bits": getattr(synth.cfg.quant.config, "bits", None)},
                  "training_step": synth.training.get("step"), **sizes},
        "sentences": len(utterances),
        "audio_seconds": sum(u["duration_s"] for u in utterances),
        "recognizer": "pocketsphinx (bundled US-English model)",
        "reference": {"system": "flite", "voice": reference_voice},
        "wer": model_rates["wer"], "cer": model_rates["cer"],
        "reference_wer": ref_rates["wer"], "reference_cer": ref_rates["cer"],
        "mcd_db": statistics.fmean(mcds), "mcd_db_median": statistics.median(mcds),
        "rtf": {str(n): _rtf(synth, all_ids, n) for n in threads},
        "size_table": [r.as_dict() for r in rows],
        "size_table_markdown": format_size_table(rows),
        "utterances": utterances,
    }


def _mb(n: int) -> str:
    return f"{n / 1e6:.3f} MB ({n:,} bytes)"


def format_report(report: dict[str, Any]) -> str:
    """report.md: the numbers of `evaluate_model` as Markdown."""
    m = report["model"]
    lines = [
        f"# BitTTS evaluation: {os.path.basename(m['path'])}", "",
        f"Preset `{m['preset']}`, quantization {m['quant']['scheme']} / {m['quant']['scope']}, trained "
        f"{m['training_step']} steps, {m['parameters']:,} parameters, {m['packed_layers']} packed layers. "
        f"{report['sentences']} sentences, {report['audio_seconds']:.1f} s of synthesized audio.", "",
        "## Size", "",
        "| part | tensors | of which packed (codes + scales) |", "|---|---:|---:|",
        *(f"| {p} | {_mb(m['parts'].get(p, 0))} | {_mb(m['packed_parts'].get(p, 0))} |"
          for p in (*PARTS, *sorted(set(m["parts"]) - set(PARTS)))),
        f"| header (manifest + metadata) | {_mb(m['header_bytes'])} | |",
        f"| **file** | **{_mb(m['bytes'])}** | |", "",
        "Size comparison of the paper, measured for this architecture (every row is a packed file of this "
        "architecture; \"without\" weight indexing stores each quantized weight in one int8, the paper's "
        "baseline; \"with\" is ternq's packing: 5 ternary or 2 four-bit weights per byte; MB = 10^6 bytes):", "",
        report["size_table_markdown"], "",
        "## Quality", "",
        "| metric | this model | flite reference |", "|---|---:|---:|",
        f"| WER (pocketsphinx) | {report['wer']:.1%} | {report['reference_wer']:.1%} |",
        f"| CER (pocketsphinx) | {report['cer']:.1%} | {report['reference_cer']:.1%} |",
        f"| MCD vs flite `{report['reference']['voice']}` (dB, DTW) | {report['mcd_db']:.2f} "
        f"(median {report['mcd_db_median']:.2f}) | - |", "",
        "## Speed", "",
        "Real-time factor = model seconds / audio seconds over all sentences, best of 3 passes after a warm-up "
        "(espeak-ng phonemization excluded; < 1 is faster than real time).", "",
        "| threads | RTF |", "|---:|---:|",
        *(f"| {n} | {r:.3f} |" for n, r in report["rtf"].items()), "",
        "## Sentences", "",
        "| # | text | transcript | WER | MCD (dB) |", "|---:|---|---|---:|---:|",
        *(f"| {i} | {u['text']} | {u['transcript']} | {u['wer']:.0%} | {u['mcd_db']:.2f} |"
          for i, u in enumerate(report["utterances"], 1)),
    ]
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], out_dir: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write report.json and report.md atomically; returns their paths."""
    from .atomic import atomic_write

    out = Path(out_dir)
    json_path, md_path = out / "report.json", out / "report.md"
    atomic_write(json_path, (json.dumps(report, indent=1, ensure_ascii=False) + "\n").encode())
    atomic_write(md_path, format_report(report).encode())
    return json_path, md_path
