"""Detect the one way this shim can end up shadowing a real sgl-kernel install."""

import warnings
from importlib import metadata

#: Distribution names under which the real kernels are published.
REAL_KERNEL_DISTRIBUTIONS = ("sglang-kernel", "sgl-kernel")


def warn_if_real_kernel_installed() -> None:
    """Warn when a real sgl-kernel distribution is installed next to this shim.

    Both provide the top-level package ``sgl_kernel``; pip does not detect the
    clash, so installing the shim over a real (even unimportable) wheel replaces its
    ``__init__.py``. The set-up only installs the shim when ``import sgl_kernel``
    fails, but a later ``pip install sglang-kernel`` can still collide with it.
    """
    for name in REAL_KERNEL_DISTRIBUTIONS:
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        warnings.warn(
            f"sgl_kernel resolves to the CPU compatibility shim, but the real kernel "
            f"distribution {name}=={version} is also installed and shares the package "
            f"directory. Run `pip uninstall sgl-kernel-cpu-compat` and "
            f"`pip install --force-reinstall {name}` to use the real kernels.",
            RuntimeWarning,
            stacklevel=2,
        )
