"""The packed file format: the torch-free reference reader (``reader``, one copyable file), the code
encodings (``encoding``), the torch front end that packs, saves and loads models (``torch``, like
``safetensors.torch``) and the crash-safe file write (``atomic``).

Nothing is imported here, so that ``ternq.format.reader`` loads without torch.
"""
