"""bench/bench_fsdp_memory.py on a small model at 1 and 2 processes: the local shards of parameters, gradients and
AdamW state halve (to within one row of a parameter's dim 0) and the table prints them."""

import subprocess
import sys
from pathlib import Path

import pytest
from test_fsdp import ENV

BENCH = Path(__file__).parent.parent / "bench" / "bench_fsdp_memory.py"


@pytest.mark.slow
def test_training_state_per_process_halves_with_two_processes():
    proc = subprocess.run([sys.executable, str(BENCH), "--procs", "1", "2", "--layers", "2", "--hidden", "512",
                           "--vocab", "8192"], env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = {int(line.split("|")[0]): [float(v) for v in line.split("|")[1:5]]
            for line in proc.stdout.splitlines() if line.strip()[:1].isdigit()}
    one, two = rows[1], rows[2]
    assert one[3] > 0 and one[3] == pytest.approx(one[0] * 4, rel=1e-2)  # state = params + grads + 2 AdamW moments
    for a, b in zip(one, two):
        assert b == pytest.approx(a / 2, rel=0.02), (one, two)
