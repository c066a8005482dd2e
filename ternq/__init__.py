"""ternq: 1.58-bit and k-bit quantization-aware training for any PyTorch model."""
__version__ = "0.1.0"
