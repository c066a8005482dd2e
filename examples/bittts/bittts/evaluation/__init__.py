"""Scoring text-to-speech systems side by side: `evaluate` (the harness behind `bittts evaluate` and its report),
`systems` (BitTTS, flite and Piper behind one interface), `metrics` (WER / CER, MCD), `dnsmos` (naturalness),
`sizes` (model file sizes and the paper's size table), and `sentences/` (the test text, package data)."""
