"""``ternq.weight_attr``, the documented path of `ternq.qat.weight_attr` (the quantized-weight descriptor): the same module object."""
import sys

from .qat import weight_attr as _module

sys.modules[__name__] = _module
