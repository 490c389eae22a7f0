"""Tower checkpoint layouts: one module per layout, each registering a :class:`~.registry.Format`.

Importing this package registers them; detection tries them in the order they register (below; timm
registers before open_clip, which builds on it). A new layout is one module here that calls
:func:`~.registry.register_format`, plus its import below.
"""

# isort: off
from . import transformers  # noqa: F401  (SigLIP, SigLIP 2 incl. NaFlex, PaliGemma, LLaVA-style VLMs)
from . import open_clip  # noqa: F401
from . import timm  # noqa: F401
from . import big_vision  # noqa: F401

# isort: on
from .registry import Files, Format, detect_format, get_format, list_formats, register_format

__all__ = ["Files", "Format", "detect_format", "get_format", "list_formats", "register_format"]
