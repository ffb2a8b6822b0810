"""Code and library versions, for manifests and cache keys."""

from __future__ import annotations

import functools
import hashlib
import subprocess
from importlib import metadata
from pathlib import Path

__version__ = "0.1.0"
LIBRARIES = ("torch", "diffusers", "transformers", "peft", "accelerate", "pillow", "numpy")


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """`0.1.0+g<commit>[.dirty]` inside a git checkout, else the package version."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=5).stdout.strip()
        if not sha:
            return __version__
        diff = subprocess.run(["git", "diff", "HEAD"], cwd=root, capture_output=True, timeout=10).stdout
        # an edited tree gets a hash of its diff, so caches keyed by the code version see every edit
        return f"{__version__}+g{sha}" + (f".dirty{hashlib.sha256(diff).hexdigest()[:8]}" if diff else "")
    except (OSError, subprocess.SubprocessError):
        return __version__


@functools.lru_cache(maxsize=1)
def library_versions() -> dict[str, str]:
    out = {}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out
