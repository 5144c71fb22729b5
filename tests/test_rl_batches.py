"""RL batches: a token-mean loss is the whole optimizer step's mean, however the step is cut into micro-batches
and processes (issue 15: it used to be each micro-batch's mean, TRL's bnpo); packed rollouts give the padded
path's numbers."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rl_ddp import step_gradient
from safetensors.torch import load_file
from test_rollout import tiny_model

from lmforge.rollout import (
    RolloutStream,
    batch_tokens,
    epoch_micro_batches,
    micro_batch,
    pack_rollout,
    policy_logprobs,
    policy_scores,
    response_columns,
    row_inputs,
    score_buffer,
)

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


# ---- packed rollouts ----

def uneven_buffer():
    prompts = [[1 + i % 5] * (1 + i % 3) for i in range(8)]
    completions = [[2 + (i * 7 + j) % 20 for j in range((i * 5) % 11)] for i in range(8)]  # one is empty
    return pack_rollout(prompts, completions, pad_id=0)


def test_packed_micro_batch_layout():
    buffer = pack_rollout([[1, 2], [3], [4]], [[5, 6, 7], [8], [9, 10]], pad_id=0)
    b = micro_batch(buffer, torch.tensor([0, 1, 2]), packed=True)  # lengths 5, 2, 3 -> rows [5], [3, 2]
    assert b["input_ids"].tolist() == [[1, 2, 5, 6, 7], [4, 9, 10, 3, 8]]
    assert b["document_ids"].tolist() == [[0, 0, 0, 0, 0], [0, 0, 0, 1, 1]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 0, 1]]
    # flat row * 5 + column of the token before each response token: 2 5 6 -> 1 2 3; 3 -> 8; 4 9 -> 5 6
    assert b["response_index"].tolist() == [[1, 2, 3], [8, 0, 0], [5, 6, 0]]
    assert b["labels"].tolist() == [[5, 6, 7], [8, -100, -100], [9, 10, -100]]
    assert batch_tokens(b) == 10 and "attention_mask" not in b


def test_packed_rollouts_give_the_padded_log_probs_entropies_and_values():
    model = tiny_model(vocab=32, num_labels=1).eval()
    torch.nn.init.normal_(model.score.weight)
    buffer = uneven_buffer()
    plan = epoch_micro_batches(8, 4, seed=0, iteration=0, epoch=0)
    padded = score_buffer(policy_scores(model, 0.7, entropy=True), buffer, plan, "cpu")
    packed = score_buffer(policy_scores(model, 0.7, entropy=True), buffer, plan, "cpu", packed=True)
    for key in ("logprobs", "entropy"):
        torch.testing.assert_close(packed[key], padded[key], atol=1e-5, rtol=1e-5)
    assert (padded["logprobs"] != 0).sum() == buffer["response_mask"].sum()

    def values(batch):  # a critic's values read where the response tokens are predicted (ppo.response_values)
        hidden = model(batch["input_ids"], **row_inputs(batch), return_hidden=True)
        return {"values": response_columns(model.score(hidden).squeeze(-1), batch) * batch["response_mask"]}
    torch.testing.assert_close(score_buffer(values, buffer, plan, "cpu", packed=True)["values"],
                               score_buffer(values, buffer, plan, "cpu")["values"], atol=1e-5, rtol=1e-5)


def test_packed_stream_trains_with_a_first_ratio_of_exactly_one():
    model = tiny_model(vocab=32)
    buffer = uneven_buffer()
    plan = epoch_micro_batches(8, 4, seed=0, iteration=0, epoch=0)
    model.eval()
    buffer["old_logprobs"] = score_buffer(policy_scores(model), buffer, plan, "cpu", packed=True)["logprobs"]
    model.train()
    stream = RolloutStream(lambda it, p: (buffer, {}), epochs=1, micro_batch_size=4, seed=0, packed=True)
    for _ in plan:
        batch = next(stream)
        assert "document_ids" in batch and batch["input_ids"].shape[0] < 4  # fewer rows than sequences
        assert torch.equal(policy_logprobs(model, batch).detach(), batch["old_logprobs"])


def test_packing_that_saves_nothing_falls_back_to_padded_rows():
    buffer = pack_rollout([[1, 2], [3, 4]], [[5, 6, 7], [8, 9]], pad_id=0)  # lengths 5, 4: no two fit in a row
    packed, padded = (micro_batch(buffer, torch.tensor([0, 1]), packed=p) for p in (True, False))
    assert packed.keys() == padded.keys() and "document_ids" not in packed
    assert all(torch.equal(packed[k], padded[k]) for k in padded)
