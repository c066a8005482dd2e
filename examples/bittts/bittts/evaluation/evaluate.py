"""`evaluate`: size, intelligibility, naturalness, mel-cepstral distortion and speed of text-to-speech systems, all
measured by the same code on the same sentences: exported BitTTS models, and flite and Piper as reference rows
(`bittts.evaluation.systems`).

* size: the model file (for a BitTTS model also the bytes of each part's tensors, by name prefix; packed = codes
  + scales, and the paper's size table for the model's architecture, `bittts.evaluation.sizes.size_table`);
* intelligibility: WER / CER of pocketsphinx transcripts of the spoken sentences (`bittts.evaluation.metrics`),
  next to the same numbers for flite's reference rendering of the same sentences (the recognizer's floor on this
  text);
* naturalness: DNSMOS P.835 SIG / BAK / OVRL (`bittts.evaluation.dnsmos`; Microsoft's non-personalized model by
  default);
* MCD: mel-cepstral distortion (dB, DTW-aligned) between each spoken sentence and its flite reference (0 for
  flite in the reference voice itself; a different speaker, such as Piper's, is far from it by construction);
* speed: real-time factor (model seconds / audio seconds) at each thread count, the fastest of 3 passes after a
  warm-up utterance (what the model seconds include: `bittts.evaluation.systems`).

Every wav is scored as written to disk (16-bit PCM, 16 kHz), so all systems go through the same quantization.
"""
from __future__ import annotations

import json
import math
import os
import re
import statistics
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from ..data import audio
from ..synthesis.long_text import check_sentence, read_sentences
from ..synthesis.synthesizer import Synthesis, Synthesizer
from . import metrics
from .dnsmos import DNSMOS
from .sizes import PARTS, format_size_table, size_table
from .systems import BitTTSSystem, TTSSystem

__all__ = ["DEFAULT_SENTENCES", "check_sentence", "read_sentences", "default_sentences", "fastest_pass",
           "evaluate", "evaluate_system", "result_row", "format_results", "format_report", "write_report"]


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


DEFAULT_SENTENCES = "evaluation/sentences/harvard.txt"  # package data, inside the bittts package
DEFAULT_SENTENCES_NOTE = ("the 40 Harvard sentences of lists 1-4 (IEEE 1969; natural English that no part of the "
                          "training corpus contains: scripts/check_heldout.py)")


def default_sentences() -> Path:
    """The natural held-out sentences `bittts evaluate` speaks by default (`DEFAULT_SENTENCES`)."""
    path = Path(str(resources.files("bittts") / DEFAULT_SENTENCES)).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"no --sentences given and this installation lacks {DEFAULT_SENTENCES} (it ships "
                                f"with the source checkout, examples/bittts/bittts/{DEFAULT_SENTENCES}): pass "
                                "--sentences FILE")
    return path


def _references(sentences: Sequence[str], out: Path, voice: str, progress: bool) -> list[dict[str, Any]]:
    """flite's rendering of each sentence in the reference voice (OUT/reference/NNNN.wav, 16 kHz) and what
    pocketsphinx hears in it: the MCD target and the recognizer's floor, computed once for all systems."""
    from tqdm import tqdm

    from ..data.corpus import synthesize_flite

    (out / "reference").mkdir(parents=True, exist_ok=True)
    refs = []
    for i, sentence in enumerate(tqdm(sentences, desc=f"flite {voice} reference", unit="sentence",
                                      disable=not progress), 1):
        wav, rate = synthesize_flite(sentence, voice)
        path = out / "reference" / f"{i:04d}.wav"
        audio.write_wav(path, audio.resample(wav, rate, audio.SAMPLE_RATE), audio.SAMPLE_RATE)
        wav = audio.read_wav(path)[0]
        refs.append({"path": path, "wav": wav, "transcript": metrics.transcribe(wav)})
    return refs


def evaluate_system(system: TTSSystem, sentences: Sequence[str], out_dir: str | os.PathLike[str],
                    references: Sequence[dict[str, Any]], *, threads: Sequence[int] = (1, 2),
                    scorer: DNSMOS | None = None, reference_voice: str = "slt", progress: bool = True
                    ) -> dict[str, Any]:
    """Speak `sentences` with `system` into OUT_DIR/wavs and score them; returns the report dict (what its
    report.json holds). `references`: `_references` of the same sentences."""
    from tqdm import tqdm

    out = Path(out_dir)
    (out / "wavs").mkdir(parents=True, exist_ok=True)
    utterances: list[dict[str, Any]] = []
    for i, (sentence, ref) in enumerate(zip(tqdm(sentences, desc=system.name, unit="sentence",
                                                 disable=not progress), references, strict=True), 1):
        spoken = system.speak(sentence)
        wav_path = out / "wavs" / f"{i:04d}.wav"
        audio.write_wav(wav_path, spoken.wav, audio.SAMPLE_RATE)
        wav = audio.read_wav(wav_path)[0]  # scored as written: 16-bit, as every other system
        hyp = metrics.transcribe(wav)
        utterances.append({
            "text": sentence, "phonemes": spoken.phonemes, "wav": os.path.relpath(wav_path, out),
            "reference_wav": os.path.relpath(ref["path"], out), "duration_s": spoken.duration,
            "transcript": hyp, "reference_transcript": ref["transcript"],
            "wer": metrics.wer(sentence, hyp), "cer": metrics.cer(sentence, hyp),
            "mcd_db": metrics.mcd_dtw(ref["wav"], wav),
            "dnsmos": scorer(wav) if scorer is not None else None,
        })
    texts = [u["text"] for u in utterances]
    rates = metrics.error_rates(texts, [u["transcript"] for u in utterances])
    ref_rates = metrics.error_rates(texts, [u["reference_transcript"] for u in utterances])
    mcds = [u["mcd_db"] for u in utterances]
    info = system.info()
    report: dict[str, Any] = {
        "system": {"name": system.name, "kind": system.kind, "rtf_timing": system.timing, **info},
        "sentences": len(utterances),
        "audio_seconds": sum(u["duration_s"] for u in utterances),
        "recognizer": "pocketsphinx (bundled US-English model)",
        "reference": {"system": "flite", "voice": reference_voice},
        "wer": rates["wer"], "cer": rates["cer"],
        "reference_wer": ref_rates["wer"], "reference_cer": ref_rates["cer"],
        "mcd_db": statistics.fmean(mcds), "mcd_db_median": statistics.median(mcds),
        "dnsmos": None if scorer is None else {
            **{k: statistics.fmean(u["dnsmos"][k] for u in utterances) for k in ("sig", "bak", "ovrl")},
            "model": scorer.description},
        "rtf": {str(n): system.rtf(texts, n) for n in threads
                if system.max_threads is None or n <= system.max_threads},
        "utterances": utterances,
    }
    if isinstance(system, BitTTSSystem):  # the model's own numbers: parts, quantization, the paper's size table
        rows = size_table(system.synth.cfg)
        report["model"] = info
        report["size_table"] = [r.as_dict() for r in rows]
        report["size_table_markdown"] = format_size_table(rows)
    return report


def evaluate(systems: Sequence[TTSSystem], sentences: Sequence[str], out_dir: str | os.PathLike[str], *,
             reference_voice: str = "slt", threads: Sequence[int] = (1, 2), dnsmos: bool = True,
             personalized: bool = False, sentences_file: str | os.PathLike[str] | None = None,
             progress: bool = True) -> dict[str, Any]:
    """Score each system on `sentences` by the same code: OUT_DIR/NAME/ (wavs, report.json, report.md) per
    system, OUT_DIR/reference/ (flite's renderings), and OUT_DIR/results.json / results.md (one table).
    Returns the results dict."""
    from ..machine import cpu_description

    names = [s.name for s in systems]
    if not systems:
        raise ValueError("nothing to evaluate: give --model and/or --system")
    if len(set(names)) != len(names):
        raise ValueError(f"two systems are named alike ({', '.join(names)}): name models with --model NAME=FILE")
    for name in names:
        if not re.fullmatch(r"[\w.+-]+", name) or name in ("reference", ".", ".."):
            raise ValueError(f"system name {name!r}: use letters, digits, '.', '_', '+' or '-' (not 'reference')")
    scorer = DNSMOS(personalized=personalized) if dnsmos else None  # fails here, before any synthesis
    out = Path(out_dir)
    references = _references(sentences, out, reference_voice, progress)
    reports = {}
    for system in systems:
        report = evaluate_system(system, sentences, out / system.name, references, threads=threads, scorer=scorer,
                                 reference_voice=reference_voice, progress=progress)
        report["sentences_file"] = None if sentences_file is None else os.fspath(sentences_file)
        write_report(report, out / system.name)
        reports[system.name] = report
    results = {
        "sentences": len(sentences),
        "sentences_file": None if sentences_file is None else os.fspath(sentences_file),
        "reference": {"system": "flite", "voice": reference_voice},
        "dnsmos_model": None if scorer is None else scorer.description,
        "threads": list(threads), "cpu": cpu_description(),
        "systems": [result_row(r, f"{name}/report.json") for name, r in reports.items()],
    }
    from ternq.atomic import atomic_write

    atomic_write(out / "results.json", (json.dumps(results, indent=1, ensure_ascii=False) + "\n").encode())
    atomic_write(out / "results.md", (format_results(results) + "\n").encode())
    return results


def result_row(report: dict[str, Any], path: str | None = None) -> dict[str, Any]:
    """One system's row of the results table, from its report dict."""
    s = report["system"]
    d = report.get("dnsmos") or {}
    quant = report["model"]["quant"] if "model" in report else None
    return {"name": s["name"], "kind": s["kind"], "report": path, "bytes": s.get("bytes"), "quant": quant,
            "training_step": report["model"].get("training_step") if "model" in report else None,
            "wer": report["wer"], "cer": report["cer"], "dnsmos_sig": d.get("sig"), "dnsmos_bak": d.get("bak"),
            "dnsmos_ovrl": d.get("ovrl"), "mcd_db": report["mcd_db"], "rtf": report["rtf"],
            "reference_wer": report["reference_wer"]}


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def quant_label(quant: dict[str, Any] | None) -> str:
    """"float", "1.58-bit all", "4-bit acoustic", ... ("-" for a system that is not a BitTTS model)."""
    if quant is None:
        return "-"
    if quant["scheme"] == "none":
        return "float"
    return f"{'1.58-bit' if quant['scheme'] == 'ternary' else str(quant['bits']) + '-bit'} {quant['scope']}"


def format_results(results: dict[str, Any], baseline: str | None = None) -> str:
    """The results table as Markdown: system, size, reduction, WER, CER, DNSMOS SIG/BAK/OVRL, MCD, RTF at one
    thread. The reduction is against `baseline` (a system name), by default the first float BitTTS model."""
    rows = results["systems"]
    if baseline is None:
        baseline = next((r["name"] for r in rows if r["quant"] and r["quant"]["scheme"] == "none"), None)
    base = next((r["bytes"] for r in rows if r["name"] == baseline), None)
    lines = ["| system | quantization | size (MB) | reduction | WER | CER | DNSMOS SIG | DNSMOS BAK | DNSMOS OVRL "
             "| MCD (dB) | RTF, 1 thread |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        size = r["bytes"]
        reduction = ("baseline" if r["name"] == baseline else f"{size / base - 1:+.1%}") if size and base else "-"
        lines.append(f"| {r['name']} | {quant_label(r['quant'])} | {_fmt(size and size / 1e6, '.2f')} | {reduction} "
                     f"| {r['wer']:.3f} | {r['cer']:.3f} | {_fmt(r['dnsmos_sig'], '.2f')} "
                     f"| {_fmt(r['dnsmos_bak'], '.2f')} | {_fmt(r['dnsmos_ovrl'], '.2f')} | {r['mcd_db']:.2f} "
                     f"| {_fmt(r['rtf'].get('1'), '.3f')} |")
    return "\n".join(lines)


def _mb(n: int) -> str:
    return f"{n / 1e6:.3f} MB ({n:,} bytes)"


def format_report(report: dict[str, Any]) -> str:
    """report.md: one system's numbers of `evaluate_system` as Markdown."""
    s = report["system"]
    lines = [f"# Evaluation: {s['name']}", ""]
    if "model" in report:
        m = report["model"]
        lines += [
            f"BitTTS model `{os.path.basename(m['path'])}`: preset `{m['preset']}`, quantization "
            f"{m['quant']['scheme']} / {m['quant']['scope']}, trained {m['training_step']} steps, "
            f"{m['parameters']:,} parameters, {m['packed_layers']} packed layers.", "",
            "## Size", "",
            "| part | tensors | of which packed (codes + scales) |", "|---|---:|---:|",
            *(f"| {p} | {_mb(m['parts'].get(p, 0))} | {_mb(m['packed_parts'].get(p, 0))} |"
              for p in (*PARTS, *sorted(set(m["parts"]) - set(PARTS)))),
            f"| header (manifest + metadata) | {_mb(m['header_bytes'])} | |",
            f"| **file** | **{_mb(m['bytes'])}** | |", "",
            "Size comparison of the paper, measured for this architecture (every row is a packed file of this "
            "architecture; \"without\" weight indexing stores each quantized weight in one int8, the paper's "
            "baseline; \"with\" is ternq's packing: 5 ternary or 2 four-bit weights per byte; MB = 10^6 bytes):", "",
            report["size_table_markdown"], ""]
    else:
        details = ", ".join(f"{k} {v}" for k, v in s.items() if k not in ("name", "kind", "rtf_timing") and v)
        lines += [f"Reference system `{s['kind']}` ({details}).", ""]
    d = report.get("dnsmos")
    lines += [
        f"{report['sentences']} sentences, {report['audio_seconds']:.1f} s of speech.", "",
        "## Quality", "",
        "| metric | this system | flite reference |", "|---|---:|---:|",
        f"| WER (pocketsphinx) | {report['wer']:.1%} | {report['reference_wer']:.1%} |",
        f"| CER (pocketsphinx) | {report['cer']:.1%} | {report['reference_cer']:.1%} |",
        f"| MCD vs flite `{report['reference']['voice']}` (dB, DTW) | {report['mcd_db']:.2f} "
        f"(median {report['mcd_db_median']:.2f}) | - |",
    ]
    if d:
        lines += [f"| DNSMOS SIG / BAK / OVRL | {d['sig']:.2f} / {d['bak']:.2f} / {d['ovrl']:.2f} | - |", "",
                  f"DNSMOS: {d['model']}."]
    lines += [
        "", "## Speed", "",
        f"Real-time factor = model seconds / audio seconds over all sentences, best of 3 passes after a warm-up "
        f"(< 1 is faster than real time). Model seconds: {s['rtf_timing']}.", "",
        "| threads | RTF |", "|---:|---:|",
        *(f"| {n} | {r:.3f} |" for n, r in report["rtf"].items()), "",
        "## Sentences", "",
        "| # | text | transcript | WER | MCD (dB) | DNSMOS OVRL |", "|---:|---|---|---:|---:|---:|",
        *(f"| {i} | {u['text']} | {u['transcript']} | {u['wer']:.0%} | {u['mcd_db']:.2f} "
          f"| {_fmt(u['dnsmos'] and u['dnsmos']['ovrl'], '.2f')} |"
          for i, u in enumerate(report["utterances"], 1)),
    ]
    return "\n".join(lines) + "\n"



def write_report(report: dict[str, Any], out_dir: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write report.json and report.md atomically; returns their paths."""
    from ternq.atomic import atomic_write

    out = Path(out_dir)
    json_path, md_path = out / "report.json", out / "report.md"
    atomic_write(json_path, (json.dumps(report, indent=1, ensure_ascii=False) + "\n").encode())
    atomic_write(md_path, format_report(report).encode())
    return json_path, md_path
