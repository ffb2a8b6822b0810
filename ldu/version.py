"""Code and library versions, for manifests and cache keys."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
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


@functools.lru_cache(maxsize=1)
def machine() -> dict:
    """Where a run ran: the CPU's model and the kernels torch picked for it, its cores, torch's threads, the GPU and
    the libraries. A long CPU attack repeats to the last digit on one machine but not across machines
    (docs/RESULTS.md, "These clean attacks are not the v3 table's"), so a run file says which machine it ran on."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cpu_kernels": torch.backends.cpu.get_cpu_capability(),  # the ISA torch's kernels use
            "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "libraries": library_versions()}


def distinct_machines(records) -> list[dict]:
    """The different machines among records' `machine` entries (each a dict, a list of them as in a merged run, or
    None for a run from before the field), in first-seen order."""
    seen = {}
    for ms in records:
        for m in (ms if isinstance(ms, list) else [ms]) if ms else []:
            seen.setdefault(json.dumps(m, sort_keys=True), dict(m))
    return list(seen.values())
