"""Test support: real SGLang servers on CPU (see ``server.py``).

Importing this package never imports SGLang; servers run as subprocesses.
"""

from remp_sglang.testing.server import (
    ServerFactory,
    ServerStartError,
    SGLangServer,
    launch_sglang_server,
)

__all__ = ["SGLangServer", "ServerFactory", "ServerStartError", "launch_sglang_server"]
