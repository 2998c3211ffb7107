"""The megatron-core line bigpt is built and tested on, checked in one place.

The CPU compatibility layer and the fixes for megatron-core bugs reach into its internals, which
move between releases: outside the tested line bigpt stops at start with a clear error rather than
fail somewhere deep inside megatron-core, or silently run without a fix it needs.
"""

from packaging.version import InvalidVersion, Version

from bigpt.errors import BigptError

TESTED_LINE = (0, 19)
"""megatron-core major.minor; every 0.19.x release (pyproject asks for >= 0.19.2, < 0.20)."""
_INSTALL = "pip install 'megatron-core>=0.19.2,<0.20'"


def installed_version() -> str:
    import megatron.core

    return megatron.core.__version__


def check_megatron_line(version: str | None = None) -> None:
    version = version or installed_version()
    if _line(version) != TESTED_LINE:
        line = ".".join(map(str, TESTED_LINE))
        raise BigptError(
            f"megatron-core {version} is installed, but bigpt is built and tested on the {line} line "
            f"(its CPU compatibility layer and its fixes for megatron-core bugs reach into that line's "
            f"internals); install it with {_INSTALL} (scripts/setup.sh does, Python 3.11 included)."
        )


def _line(version: str) -> tuple:
    try:
        return Version(version).release[:2]
    except InvalidVersion:
        return ()


def patch_target_error(what: str, why: str) -> BigptError:
    """A fix's target has moved or changed in this megatron-core: stop, never run without the fix."""
    return BigptError(
        f"bigpt's fix for megatron-core ({what}) cannot be applied to megatron-core {installed_version()}: "
        f"{why}. The fix is in bigpt/runtime/megatron_fixes.py; install the tested line "
        f"({_INSTALL}) or update the fix for this version."
    )
