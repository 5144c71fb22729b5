"""RL batches: a token-mean loss is the whole optimizer step's mean, however the step is cut into micro-batches
and processes (issue 15: it used to be each micro-batch's mean, TRL's bnpo)."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from rl_ddp import step_gradient
from safetensors.torch import load_file

HERE = Path(__file__).parent


def max_difference(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize("loss_type", ["grpo", "cispo", "gspo"])
def test_one_big_batch_and_its_accumulated_micro_batches_give_the_same_gradient(loss_type):
    whole = step_gradient(8, "token-mean", loss_type)  # one micro-batch of 8 rows
    accumulated = step_gradient(2, "token-mean", loss_type)  # 4 micro-batches of 2 rows, accumulated
    assert max(float(g.abs().max()) for g in whole.values()) > 0.01
    assert max_difference(whole, accumulated) < 1e-6


def test_bnpo_weighs_each_micro_batch_alike_so_it_differs():
    """The old behaviour (still there as loss_agg=bnpo): with uneven lengths the gradient depends on the cut."""
    assert max_difference(step_gradient(8, "bnpo"), step_gradient(2, "bnpo")) > 1e-3
    assert max_difference(step_gradient(8, "bnpo"), step_gradient(8, "token-mean")) < 1e-7  # one micro-batch: equal


@pytest.mark.slow
def test_two_processes_give_the_one_process_gradient(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(HERE.parent / "src"), str(HERE)])}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "two.safetensors"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
                           "--master_addr=127.0.0.1", f"--master_port={port}", str(HERE / "rl_ddp.py"), str(out),
                           "2", "token-mean"], env=env, timeout=300, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + "\n" + proc.stderr[-4000:]
    two = load_file(str(out))  # 2 processes x 2 micro-batches of 2 rows each
    assert max_difference(step_gradient(8, "token-mean"), two) < 1e-6
