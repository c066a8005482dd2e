"""``ternq.uses``, the documented path of `ternq.find.uses` (parameter uses): the same module object."""
import sys

from .find import uses as _module

sys.modules[__name__] = _module
