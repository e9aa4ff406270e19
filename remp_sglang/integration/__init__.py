"""SGLang integration of remp_sglang: the ``sglang.srt.plugins`` entry point and its hooks.

This is the only subpackage of ``remp_sglang`` that imports SGLang, and it does so lazily:
importing ``remp_sglang.integration`` or ``remp_sglang.integration.plugin`` imports nothing
from SGLang; ``register()`` (called by SGLang's ``load_plugins()``) does. See
``docs/design/sglang-reshape-notes.md`` for the plan this implements.
"""
