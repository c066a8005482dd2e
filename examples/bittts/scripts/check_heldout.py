"""Check that held-out evaluation text was never seen in training: no sentence of it occurs in a corpus, and no
long run of words is shared with one.

    python examples/bittts/scripts/check_heldout.py examples/bittts/bittts/evaluation/sentences/harvard.txt \\
        --corpus ~/.cache/bittts-runs/data/train.jsonl --corpus ~/.cache/bittts-runs/data/val.jsonl

A corpus is a `bittts prepare` metadata file (JSON lines with "text") or a plain text file (one sentence per
line); with no --corpus, the first --generated sentences of the generator `bittts prepare` draws its text from
(seed 0) are checked. Texts are compared after the scoring normalizer
(`bittts.evaluation.metrics.normalize_for_scoring`: numbers spelled out, punctuation and case dropped). Exit status 1, naming the sentence, if a held-out sentence
occurs in a corpus sentence or shares --max-ngram or more consecutive words with one.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path


def corpus_texts(path: Path) -> list[str]:
    """The sentences of a JSON-lines corpus ("text" of each line) or a plain text file."""
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix == ".jsonl":
        return [json.loads(line)["text"] for line in lines]
    return lines


def ngrams(words: Sequence[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def longest_shared_run(sentence: Sequence[str], index: dict[int, set[tuple[str, ...]]]) -> int:
    """The most consecutive words of `sentence` that also occur consecutively in the corpus (`index`: n ->
    the corpus' n-grams)."""
    best = 0
    for n in sorted(index):
        if ngrams(sentence, n) & index[n]:
            best = n
        else:
            break
    return best


def check(heldout: Iterable[str], corpus: Iterable[str], max_ngram: int = 5) -> list[tuple[str, int, bool]]:
    """(sentence, longest word run shared with the corpus, whether the whole sentence occurs in a corpus
    sentence) for each held-out sentence, after the scoring normalizer."""
    from bittts.evaluation.metrics import normalize_for_scoring

    corpus_norm = [normalize_for_scoring(t) for t in corpus]
    joined = "\n".join(f" {t} " for t in corpus_norm)
    index = {n: set().union(*(ngrams(t.split(), n) for t in corpus_norm)) for n in range(1, max_ngram + 1)}
    out = []
    for sentence in heldout:
        norm = normalize_for_scoring(sentence)
        out.append((sentence, longest_shared_run(norm.split(), index), f" {norm} " in joined))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("heldout", type=Path, help="held-out sentences, one per line")
    parser.add_argument("--corpus", type=Path, action="append", default=[],
                        help="training text: a prepare metadata .jsonl or a text file (repeatable)")
    parser.add_argument("--generated", type=int, default=20000,
                        help="without --corpus: how many generator sentences to check against (default 20000)")
    parser.add_argument("--max-ngram", type=int, default=5,
                        help="fail when a sentence shares this many consecutive words with the corpus (default 5)")
    args = parser.parse_args(argv)
    from bittts.evaluation.evaluate import read_sentences

    heldout = read_sentences(args.heldout)
    if args.corpus:
        corpus = [t for path in args.corpus for t in corpus_texts(path.expanduser())]
        source = ", ".join(str(p) for p in args.corpus)
    else:
        from bittts.data.sentences import generate_sentences

        corpus, source = generate_sentences(args.generated), f"the first {args.generated} generated sentences"
    rows = check(heldout, corpus, args.max_ngram)
    bad = [(s, run, whole) for s, run, whole in rows if whole or run >= args.max_ngram]
    runs = [run for _, run, _ in rows]
    print(f"{len(heldout)} held-out sentences against {len(corpus)} corpus sentences ({source}): longest shared "
          f"run of words {max(runs)}, median {sorted(runs)[len(runs) // 2]}; whole sentences found: "
          f"{sum(whole for *_, whole in rows)}")
    for sentence, run, whole in bad:
        print(f"  SEEN: {sentence!r} ({'occurs in the corpus' if whole else f'{run} consecutive words shared'})")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
