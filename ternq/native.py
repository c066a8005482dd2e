"""``ternq.native``, the documented path of `ternq.runtime.native` (the native kernels): the same module object."""
import sys

from .runtime import native as _module

sys.modules[__name__] = _module
