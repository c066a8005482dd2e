"""The network, and nothing else: no files, no command line (those are `bittts.training` and `bittts.synthesis`).

Read in this order: `alignment` (learned text-to-speech alignment, MAS, length regulator) -> `acoustic` (JETS:
phonemes -> frame-rate features) -> `vocoder` (HiFi-GAN: features -> waveform) -> `bittts` (the two joined, and
`build_model`) -> `quantization` (which layers ternq quantizes) -> `discriminators` and `losses` (training only).
"""
