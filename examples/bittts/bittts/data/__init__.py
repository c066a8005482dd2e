"""Text and audio in, a prepared training corpus out.

`text` (normalizer, espeak-ng phonemes, symbol table) and `audio` (wav I/O, mel, pitch, energy) are the front
ends that synthesis uses too; `sentences` generates the offline corpus' text, `corpus` builds a prepared corpus
from it (or from recordings), and `dataset` reads a prepared corpus in training.
"""
