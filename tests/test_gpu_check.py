"""bench/gpu_check.py's CPU smoke run (tiny shapes): every row of the GPU table is produced, finite, and FSDP2 over a
1-process group trains exactly like the plain model, so the GPU check cannot rot between GPU machines."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_fsdp import ENV

BENCH = Path(__file__).parent.parent / "bench" / "gpu_check.py"


@pytest.mark.slow
def test_gpu_check_smoke_prints_every_row(tmp_path):
    proc = subprocess.run([sys.executable, str(BENCH), "--smoke", "--json", str(tmp_path / "rows.json")], env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = {r["row"]: r for r in json.loads((tmp_path / "rows.json").read_text())}
    assert list(rows) == ["pretrain tiny", "packed sdpa fwd+bwd", "packed flex fwd+bwd", "fsdp2 = plain (3 steps)", "sft steps/s", "dpo steps/s", "grpo steps/s",
                          "decode b1", "decode b16", "decode b64"]
    for name, r in rows.items():
        assert name.startswith("fsdp2") or r["value"] > 0, r
        assert name in proc.stdout
    assert rows["fsdp2 = plain (3 steps)"]["value"] < 1e-6
    assert "|loss - sdpa's| " in rows["packed flex fwd+bwd"]["reference"]
    assert float(rows["packed flex fwd+bwd"]["reference"].rsplit(" ", 1)[1]) < 1e-5
    assert rows["pretrain tiny"]["mfu"] is None  # no peak FLOPs on a CPU: MFU is not made up
    proc = subprocess.run([sys.executable, str(BENCH)], env={**ENV, "CUDA_VISIBLE_DEVICES": ""}, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0 and "run with --smoke" in proc.stderr
