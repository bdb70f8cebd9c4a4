"""The transformers releases export was tested with. Export reaches into transformers' internals (attention
functions, cache keywords, decoder layers), so a release outside this range is refused up front rather than
failing half way through an export."""

from __future__ import annotations

from importlib.metadata import version

from packaging.version import Version

from ..runtime.errors import ExportError

# Keep in step with pyproject.toml's `export` extra and the README's "Tested versions".
TESTED_TRANSFORMERS = ("5.21.0", "5.24.0")  # the lowest and the highest release the test suite ran with
SUPPORTED_BELOW = "5.25"


def check_transformers(installed: str | None = None) -> None:
    """Raise `ExportError` naming the supported range when the installed transformers is outside it."""
    installed = installed or version("transformers")
    release = Version(installed).release
    if not Version(TESTED_TRANSFORMERS[0]).release <= release < Version(SUPPORTED_BELOW).release:
        lowest, highest = TESTED_TRANSFORMERS
        raise ExportError(
            f"transformers {installed} is not supported by this llava-rt export (tested: {lowest} to {highest}); "
            f'install one with: pip install "transformers>={lowest},<{SUPPORTED_BELOW}"'
        )
