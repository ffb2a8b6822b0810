"""The benchmark scripts measure what they say they measure (their timings are not tested: bench/ prints them)."""

import subprocess
import sys
from pathlib import Path

from ldu import methods

ROOT = Path(__file__).resolve().parents[1]


def test_protect_bench_iterations_sets_each_methods_effort_field():
    """`--iterations` sets the field the app's effort slider sets: ASPL's rounds, which it once ignored (ASPL has no
    `iterations`), so a GPU run 'at 10 iterations' ran ASPL's default 50 rounds and overran its limit."""
    proc = subprocess.run([sys.executable, "bench/protect.py", "--model", "tiny", "--device", "cpu", "--methods", "aspl,advdm",
                           "--iterations", "1"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    steps = {}
    for line in proc.stdout.splitlines():
        cells = line.split()
        if cells and cells[0] in ("aspl", "advdm"):
            steps[cells[0]] = int(cells[1])
    aspl = methods["aspl"].make_params("tiny", rounds=1)
    assert steps == {"aspl": methods["aspl"].steps(aspl), "advdm": 1}, proc.stdout
    assert steps["aspl"] < methods["aspl"].steps(methods["aspl"].make_params("tiny")), "the default rounds, not 1"
