"""Quantization-aware training: the fake quantizers, the quantized layers and functional calls, and the
descriptor through which a model reads its quantized weight (``ternq.qat.weight_attr``)."""
