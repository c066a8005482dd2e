"""Turn `bittts evaluate` reports and training runs into the figures, audio samples and tables of
docs/bittts-results.md.

    python examples/bittts/scripts/publish_results.py --results reports \\
        --run fp32=runs/fp32 --run ternary=runs/all \\
        --histogram examples/bittts/pretrained/bittts-ternary.safetensors --out docs/assets/bittts

--results reads a `bittts evaluate --out DIR` directory (DIR/results.json and each system's DIR/NAME/report.json,
table order as evaluated); --report NAME=DIR adds one system's directory (DIR/report.json) under NAME.

Writes to --out: mels.png (the same held-out sentence: flite reference, then each system), histogram.png (share
of -1 / 0 / +1 weights per packed layer), curves.png (training losses per run), audio/<name>-<k>.wav (the first
--samples held-out sentences, reference included), and prints the Markdown tables (results: system, size,
reduction, WER, CER, DNSMOS SIG / BAK / OVRL, MCD, RTF; training records) for the page. Every number comes from
the report.json / metrics.jsonl files given.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from bittts.data import audio
from bittts.evaluation.evaluate import format_results, result_row
from bittts.extras import require
from bittts.training.loop import mel_figure as train_mel_figure

try:
    require("publish", "publish_results.py (the results page's figures)")
except RuntimeError as e:
    raise SystemExit(str(e)) from None
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402 (after the check that it exists)
from matplotlib.figure import Figure  # noqa: E402


def _pairs(items: list[str], what: str) -> dict[str, Path]:
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"{what} {item!r}: expected NAME=PATH")
        out[name] = Path(path)
    return out


def _load_report(path: Path, name: str | None = None) -> dict[str, Any]:
    """A system's report.json; one written before reports had a "system" entry (a BitTTS model, no DNSMOS) gets
    one, so old and new reports tabulate alike. `name` renames the system."""
    file = path / "report.json"
    if not file.is_file():
        raise SystemExit(f"{file} not found: run `bittts evaluate --out DIR` first (a system's report is in DIR/NAME)")
    report = json.loads(file.read_text())
    if "system" not in report:
        report["system"] = {"name": name or path.name, "kind": "bittts", "bytes": report["model"]["bytes"]}
        report.setdefault("dnsmos", None)
    if name:
        report["system"]["name"] = name
    return report


def _load_results(path: Path) -> dict[str, Path]:
    """name -> report directory of every system in a `bittts evaluate --out` directory, in table order."""
    file = path / "results.json"
    if not file.is_file():
        raise SystemExit(f"{file} not found: give the --out directory of `bittts evaluate`")
    return {row["name"]: path / Path(row["report"]).parent for row in json.loads(file.read_text())["systems"]}


def _save(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig)
    fig.tight_layout()
    fig.savefig(path)
    print(f"wrote {path}")


def mel_figure(reports: dict[str, dict[str, Any]], roots: dict[str, Path], index: int, path: Path) -> None:
    """One row per system for held-out sentence `index`: flite's reference, then each system (drawn like the
    training run's mel images; a flite system in the reference voice would repeat the first row and is left out)."""
    first = next(iter(reports))
    utt = reports[first]["utterances"][index]
    voice = reports[first]["reference"]["voice"]
    rows = [(f"flite reference ({voice})", roots[first] / utt["reference_wav"])]
    rows += [(name, roots[name] / r["utterances"][index]["wav"]) for name, r in reports.items()
             if not (r["system"]["kind"] == "flite" and r["system"].get("voice") == voice)]
    panels = [(f"{title}: \"{utt['text']}\"", audio.log_mel(audio.read_wav(wav_path)[0].unsqueeze(0))[0])
              for title, wav_path in rows]
    train_mel_figure(panels, path)
    print(f"wrote {path}")


def histogram_figure(model: Path, path: Path) -> None:
    """Stacked share of -1 / 0 / +1 per packed layer of a ternary file, in file order (`ternq inspect` data)."""
    from ternq.cli import inspect_file

    layers = [r for r in inspect_file(model)["tensors"] if r["kind"] == "packed"]
    if not layers:
        raise SystemExit(f"{model} has no packed layers")
    share = np.array([[r["share"]["-"], r["share"]["0"], r["share"]["+"]] for r in layers])
    x = np.arange(len(layers))
    fig = Figure(figsize=(11, 4), dpi=90)
    ax = fig.add_subplot(1, 1, 1)
    bottom = np.zeros(len(layers))
    for k, (label, color) in enumerate((("-1", "#4477aa"), ("0", "#bbbbbb"), ("+1", "#ee6677"))):
        ax.bar(x, share[:, k], bottom=bottom, color=color, label=label, width=0.9)
        bottom += share[:, k]
    n_ac = sum(r["name"].startswith("acoustic.") for r in layers)
    ax.axvline(n_ac - 0.5, color="black", lw=0.8)
    ax.text(n_ac / 2, 1.02, "acoustic model", ha="center", fontsize=8)
    ax.text(n_ac + (len(layers) - n_ac) / 2, 1.02, "vocoder", ha="center", fontsize=8)
    ax.set_xlim(-0.5, len(layers) - 0.5)
    ax.set_ylim(0, 1.08)
    ax.set_xlabel(f"packed layer (file order, {len(layers)} layers)")
    ax.set_ylabel("share of weights")
    ax.legend(loc="lower right", fontsize=8, ncol=3)
    zero = share[:, 1]
    ax.set_title(f"ternary weights per layer: zeros {zero.min():.0%} to {zero.max():.0%} "
                 f"(weighted mean {np.average(zero, weights=[r['count'] for r in layers]):.0%})", fontsize=9)
    _save(fig, path)


def _metrics(run: Path) -> list[dict[str, float]]:
    file = run / "metrics.jsonl"
    if not file.is_file():
        raise SystemExit(f"{file} not found (is {run} a `bittts train` run directory?)")
    return [json.loads(line) for line in file.read_text().splitlines() if line.strip()]


def curves_figure(runs: dict[str, Path], path: Path) -> None:
    fig = Figure(figsize=(14, 3.2), dpi=90)
    for i, key in enumerate(("mel", "stft", "mel_aux", "dur")):
        ax = fig.add_subplot(1, 4, i + 1)
        for name, run in runs.items():
            rows = [r for r in _metrics(run) if key in r]
            ax.plot([r["step"] for r in rows], [r[key] for r in rows], label=name, lw=1)
        ax.set_title({"mel": "vocoder mel L1 (segment)", "stft": "multi-resolution STFT loss (segment)",
                      "mel_aux": "decoder mel-head L1",
                      "dur": "duration NLL"}[key], fontsize=9)
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    _save(fig, path)


def copy_samples(reports: dict[str, dict[str, Any]], roots: dict[str, Path], count: int, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    first = next(iter(reports))
    for k in range(count):
        shutil.copyfile(roots[first] / reports[first]["utterances"][k]["reference_wav"], out / f"reference-{k + 1}.wav")
        for name, r in reports.items():
            shutil.copyfile(roots[name] / r["utterances"][k]["wav"], out / f"{name}-{k + 1}.wav")
    print(f"wrote {count * (len(reports) + 1)} wavs to {out}")


def results_table(reports: dict[str, dict[str, Any]], baseline: str) -> str:
    """system, quantization, size, reduction against `baseline`, WER, CER, DNSMOS SIG / BAK / OVRL, MCD, RTF at
    one thread (`bittts.evaluation.evaluate.format_results`); without a flite system, flite's reference WER / CER as a
    last row."""
    rows = [result_row(r) for r in reports.values()]
    table = format_results({"systems": rows}, baseline if baseline in reports else None)
    if not any(r["system"]["kind"] == "flite" for r in reports.values()):
        r = next(iter(reports.values()))
        table += (f"\n| flite `{r['reference']['voice']}` (reference) | - | - | - | {r['reference_wer']:.3f} "
                  f"| {r['reference_cer']:.3f} | - | - | - | 0 | - |")
    return table


def training_table(runs: dict[str, Path]) -> str:
    lines = ["| run | steps | wall time | steps/s | last mel L1 | last mel-head L1 | last dur NLL |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, run in runs.items():
        last = _metrics(run)[-1]
        # wall_s: cumulative over resumed segments; older logs have only this process' steps_per_s
        wall = last.get("wall_s") or last["step"] / max(last["steps_per_s"], 1e-9)
        lines.append(f"| {name} | {last['step']} | {wall / 3600:.2f} h | {last['step'] / wall:.2f} | {last['mel']:.3f} "
                     f"| {last.get('mel_aux', float('nan')):.3f} | {last['dur']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", action="append", default=[], metavar="DIR",
                        help="a `bittts evaluate --out` directory: all its systems (repeatable; table order)")
    parser.add_argument("--report", action="append", default=[], metavar="NAME=DIR",
                        help="one system's report directory (DIR/report.json), named NAME (repeatable)")
    parser.add_argument("--run", action="append", default=[], metavar="NAME=RUN_DIR",
                        help="a `bittts train` run directory (repeatable)")
    parser.add_argument("--histogram", metavar="MODEL.safetensors", help="ternary model for the histogram")
    parser.add_argument("--baseline", default="fp32",
                        help="system NAME the size reduction is against (default fp32; without one: the first "
                             "float BitTTS model)")
    parser.add_argument("--sentence", type=int, default=0, help="held-out sentence (0-based) for the mel figure")
    parser.add_argument("--samples", type=int, default=2, help="held-out sentences copied as audio samples")
    parser.add_argument("--out", required=True, metavar="DIR", help="assets directory, e.g. docs/assets/bittts")
    args = parser.parse_args()
    roots = {name: path for d in args.results for name, path in _load_results(Path(d)).items()}
    roots.update(_pairs(args.report, "--report"))
    if not roots:
        parser.error("give --results DIR (a `bittts evaluate` output) or --report NAME=DIR")
    reports = {name: _load_report(path, name) for name, path in roots.items()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    mel_figure(reports, roots, args.sentence, out / "mels.png")
    if args.histogram:
        histogram_figure(Path(args.histogram), out / "histogram.png")
    runs = _pairs(args.run, "--run")
    if runs:
        curves_figure(runs, out / "curves.png")
    copy_samples(reports, roots, args.samples, out / "audio")
    print()
    print(results_table(reports, args.baseline))
    if runs:
        print()
        print(training_table(runs))


if __name__ == "__main__":
    main()
