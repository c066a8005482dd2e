"""``ternq.atomic``, the documented path of `ternq.format.atomic` (crash-safe file writes): the same module object."""
import sys

from .format import atomic as _module

sys.modules[__name__] = _module
