"""Smoke test of benchmarks/bench_qat.py (issue 19): tiny sizes, 20 steps; the figures are not checked."""
from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_qat.py"


@pytest.fixture(scope="module")
def bench():
    pytest.importorskip("bittts", reason="the char-GPT's text comes from bittts")
    spec = importlib.util.spec_from_file_location("bench_qat", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(BENCH.parent))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH.parent))
    return module


@pytest.mark.parametrize("peer", ["ternq", "ternq-layernorm", "bitlinear20"])
def test_a_char_gpt_run_trains_and_reports(bench, peer: str) -> None:
    result = bench.run_one("gpt", peer, 20, 0, True, None)
    assert math.isfinite(result["value"]) and 0 < result["value"] < 10  # nats per character
    assert result["ms"] > 0 and result["peak"] > 0


def test_a_cnn_run_reports_an_accuracy(bench) -> None:
    pytest.importorskip("sklearn", reason="scikit-learn holds the digits")
    result = bench.run_one("cnn", "ternq", 20, 0, True, None)
    assert 0 <= result["value"] <= 100


def test_the_table_has_the_machine_line_and_a_row_per_peer(bench, capsys) -> None:
    bench.main(["--small", "--steps", "20", "--tasks", "gpt", "--peers", "fp32"])
    out = capsys.readouterr().out
    assert "torch threads" in out  # the machine line
    rows = [line.split("|") for line in out.splitlines() if line.startswith("| fp32 ")]
    assert len(rows) == 1, out
    assert float(rows[0][3]) > 0 and rows[0][5].strip() == "1.00x"


def test_a_peer_that_does_not_apply_is_skipped_with_a_reason(bench) -> None:
    with pytest.raises(bench.Skip, match="BitTTS builds its QAT with ternq"):
        bench.run_one("bittts", "brevitas", 20, 0, True, None)



def test_bittts_seeds_are_different_runs(bench, monkeypatch) -> None:
    """`train` seeds itself from its config (initial weights, batch order): the suite's seed must reach that config,
    or "3 seeds" on a prepared corpus is one run three times."""
    from bittts.training import loop

    seeds = []

    def fake_train(cfg, out, **kwargs):
        seeds.append(cfg.train.seed)
        return {"history": [{"mel": 1.0}]}

    monkeypatch.setattr(loop, "train", fake_train)
    for seed in (0, 1, 2):
        bench.run_one("bittts", "ternq", 3, seed, True, "unused-corpus-dir")
    assert len(set(seeds)) == 3, seeds
