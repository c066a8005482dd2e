"""``ternq.numpy_format``, the documented path of `ternq.format.reader` (the torch-free reference reader): the same module object."""
import sys

from .format import reader as _module

sys.modules[__name__] = _module
