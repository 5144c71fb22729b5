"""FSDP2 (train.parallel=fsdp) on CPU over gloo: 2 processes under torchrun against 1 process, on the toy model and
on a tiny lmforge Transformer sharded per block; checkpoints that open in one process; exact resume; the CLI."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import ddp_train
import pytest
import torch
from safetensors.torch import load_file

from lmforge.modelio import load_model_dir
from lmforge.train.checkpointing import load_checkpoint
from lmforge.train.loop import TrainConfig
from lmforge.train.metrics import read_metrics
from lmforge.train.optim import build_optimizer

HERE = Path(__file__).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(HERE.parent / "src"), str(HERE)])}


def torchrun(*args) -> subprocess.CompletedProcess:
    with socket.socket() as s:  # a free loopback port: no hostname lookup, no clash with a parallel run
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
                           "--master_addr=127.0.0.1", f"--master_port={port}", *map(str, args)],
                          env=ENV, timeout=300, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + "\n" + proc.stderr[-6000:]
    return proc


def logged(out, key="loss"):
    return [r[key] for r in read_metrics(out) if key in r]


def close(a, b, tol=1e-5):
    return len(a) == len(b) and max(abs(x - y) for x, y in zip(a, b)) < tol


def test_parallel_is_validated():
    with pytest.raises(ValueError, match=r"unknown parallel 'zero' \(ddp, fsdp\)"):
        TrainConfig(parallel="zero").validate()


@pytest.mark.slow
def test_two_process_fsdp_matches_one_process_and_resumes_exactly(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    torchrun(HERE / "ddp_train.py", two, "fsdp")  # toy, Transformer, and an interrupted + resumed Transformer
    ddp_train.main(one / "toy")  # one process: 2 micro-batches of 2 rows per step
    plain = ddp_train.run_transformer(one / "transformer")  # one process: 4 micro-batches of 1 row

    for name in ("toy", "transformer"):  # same losses, gradient norms (clipping on sharded grads), eval
        a, b = logged(one / name), logged(two / name)
        assert len(a) == 6 and a[0] != a[-1] and close(a, b), (name, a, b)
        assert close(logged(one / name, "grad_norm"), logged(two / name, "grad_norm")), name
    assert close(logged(one / "toy", "val_loss"), logged(two / "toy", "val_loss"))

    # the interrupted run left its step-3 checkpoint; resumed, it is bit-identical to the uninterrupted one
    assert [r["step"] for r in read_metrics(two / "cut") if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert logged(two / "cut") == logged(two / "transformer")
    state = json.loads((two / "cut" / "checkpoints" / "step_0000006" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["data"] == [{"index": 12}, {"index": 12}]

    # a NaN loss on one rank: every rank skips that update, and training goes on
    assert [r["step"] for r in read_metrics(two / "nan") if r.get("skipped_steps")] == [2, 3, 4, 5, 6]
    nan_run = load_model_dir(two / "nan" / "checkpoints" / "step_0000006")
    assert all(torch.isfinite(t).all() for t in nan_run.state_dict().values())

    # the sharded run's checkpoint is a plain HF model directory: one process opens it, same weights
    step = two / "transformer" / "checkpoints" / "step_0000006"
    sharded_model = load_model_dir(step)
    for (name, a), b in zip(plain.state_dict().items(), sharded_model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name
    # ... and its optimizer file holds whole moments, under the same names as a one-process run's
    opt_one = load_file(str(one / "transformer" / "checkpoints" / "step_0000006" / "optimizer.safetensors"))
    opt_two = load_file(str(step / "optimizer.safetensors"))
    assert opt_one.keys() == opt_two.keys()
    for k in opt_one:
        assert opt_one[k].shape == opt_two[k].shape and torch.allclose(opt_one[k], opt_two[k], atol=1e-6), k
    optimizer = build_optimizer(sharded_model, TrainConfig())
    assert load_checkpoint(step, sharded_model, optimizer, rank=0)["step"] == 6  # resumable in one process
    assert torch.equal(optimizer.state_dict()["state"][0]["exp_avg"], opt_two["0.exp_avg"])

    # after train() every rank holds the whole trained model again, equal to the checkpoint
    for rank in (0, 1):
        returned = load_file(str(two / f"returned{rank}.safetensors"))
        for name, t in sharded_model.state_dict().items():
            assert torch.equal(returned[name], t), (rank, name)


@pytest.mark.slow
def test_pretrain_cli_under_torchrun_with_fsdp(tmp_path):
    out = tmp_path / "pre"
    torchrun("-m", "lmforge", "pretrain", f"out_dir={out}", "data.filters.max_chars=2000", "seq_len=32",
             "vocab_size=320", "model.hidden_size=32", "model.intermediate_size=64", "model.num_hidden_layers=2",
             "model.num_attention_heads=2", "model.num_key_value_heads=1", "train.max_steps=8",
             "train.batch_size=8", "train.micro_batch_size=2", "train.warmup_steps=2", "train.eval_every=4",
             "train.eval_batches=2", "train.save_every=4", "train.log_every=2", "train.lr=1e-2",
             "sample_tokens=10", "train.parallel=fsdp")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["sample"].startswith("ROMEO:")
    losses = logged(out)
    assert len(losses) == 4 and losses[-1] < losses[0], losses
    model = load_model_dir(out / "model")  # the final model dir: plain safetensors, equal to the last checkpoint
    last = load_file(str(out / "checkpoints" / "step_0000008" / "model.safetensors"))
    for name, t in model.state_dict().items():
        if name in last:
            assert torch.equal(t, last[name]), name
    state = json.loads((out / "checkpoints" / "step_0000008" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["train_config"]["parallel"] == "fsdp"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_node_start_up_on_localhost_equals_one_node(tmp_path):
    """torchrun --nnodes=2 with one process per node, both nodes on this machine (GLOO_SOCKET_IFNAME=lo, as a
    cluster names its interface): the same run as 2 processes on one node, loss for loss."""
    args = ["-m", "lmforge", "pretrain", "data.filters.max_chars=2000", "seq_len=32", "vocab_size=320",
            "model.hidden_size=32", "model.intermediate_size=64", "model.num_hidden_layers=2",
            "model.num_attention_heads=2", "model.num_key_value_heads=1", "train.max_steps=4", "train.batch_size=4",
            "train.micro_batch_size=2", "train.warmup_steps=1", "train.eval_every=0", "train.save_every=0",
            "train.log_every=1", "sample_tokens=4", "train.parallel=fsdp"]
    port = free_port()
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={rank}",
                               "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}", *args,
                               f"out_dir={tmp_path / 'two_nodes'}"], env={**ENV, "GLOO_SOCKET_IFNAME": "lo"},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    outputs = [node.communicate(timeout=300) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][1][-3000:] + outputs[1][1][-3000:]
    torchrun(*args, f"out_dir={tmp_path / 'one_node'}")
    for key in ("loss", "grad_norm"):
        two, one = logged(tmp_path / "two_nodes", key), logged(tmp_path / "one_node", key)
        assert len(two) == 4 and two[0] != two[-1] and close(two, one, 1e-6), (two, one)
    state = json.loads((tmp_path / "two_nodes" / "checkpoints" / "step_0000004" / "trainer_state.json").read_text())
    assert state["world_size"] == 2
