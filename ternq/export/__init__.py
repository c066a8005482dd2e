"""Exporting a quantized model to other runtimes' formats: ONNX (``onnx``). The weights stay in ternq's packed
codes, decoded inside the exported graph, so the file keeps the size of the packed safetensors file.

Nothing is imported here: the exporters need optional packages (``pip install ternq[onnx]``).
"""
