"""DPO family and KTO: log-probs from one concatenated forward, precomputed = live reference, every loss_type
moves the policy the right way, the best-of-N scorer agrees, and the CLIs end to end (dpo, sweep, kto)."""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from lmforge_cli import lmforge
from preference_helpers import easy_pairs, micro_model_dir, write_jsonl

from lmforge.data.preference import TokenPair, collate_pairs, collate_sequences
from lmforge.inference_scaling import dpo_reward_scorer
from lmforge.model import ModelConfig, Transformer
from lmforge.scoring import completion_logps, precompute_reference, store_pair_logps, token_kl
from lmforge.stages.dpo import DPOConfig
from lmforge.train.preference import LOSS_TYPES, dpo_loss_fn

PAIRS = [([1, 2, 3], [4, 5], [6]), ([7], [8, 9, 10], [11, 12]), ([13, 14], [15], [16, 17, 18, 19])]

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny(seed=0):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1))


def pairs():
    return [TokenPair(p, c, r) for p, c, r in PAIRS]


def brute_logp(model, prompt, completion):
    """log p(completion | prompt) from one unpadded forward and a full log_softmax."""
    ids = torch.tensor([prompt + completion])
    logp = F.log_softmax(model(ids)[0, :-1].float(), -1)
    return sum(logp[len(prompt) - 1 + i, t].item() for i, t in enumerate(completion))


def test_concatenated_forward_equals_separate_forwards_any_padding():
    model = tiny().eval()
    expected = [brute_logp(model, p, c) for p, c, _ in PAIRS] + [brute_logp(model, p, r) for p, _, r in PAIRS]
    with torch.no_grad():
        for side in ("right", "left"):
            logps, lengths = completion_logps(model, collate_pairs(pairs(), pad_id=0, side=side), chunk_size=3)
            assert logps.tolist() == pytest.approx(expected, abs=1e-4), side
            assert lengths.tolist() == [2, 3, 1, 1, 2, 4]


def test_precomputed_reference_equals_live_reference_and_starts_at_ln2():
    model = tiny(1)
    items = pairs()
    precompute_reference(model, items, lambda b: collate_pairs(b, 0), store_pair_logps,
                         lambda p: len(p.prompt_ids), batch_size=2, device="cpu")
    assert items[1].ref_rejected == pytest.approx(brute_logp(model.eval(), [7], [11, 12]), abs=1e-4)
    batch = collate_pairs(items, 0)
    cfg = DPOConfig()
    live = dpo_loss_fn(cfg, ref_model=copy.deepcopy(model).eval())
    stored = dpo_loss_fn(cfg)
    with torch.no_grad():
        loss_live, m_live = live(model, batch)
        loss_stored, m_stored = stored(model, batch)
    assert loss_live.item() == pytest.approx(math.log(2), abs=1e-5)
    assert loss_stored.item() == pytest.approx(loss_live.item(), abs=1e-5)
    for k in m_live:
        assert m_stored[k].item() == pytest.approx(m_live[k].item(), abs=1e-5), k


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_every_loss_type_raises_chosen_over_rejected(loss_type):
    model = tiny(2)
    items = pairs()
    precompute_reference(model, items, lambda b: collate_pairs(b, 0), store_pair_logps,
                         lambda p: len(p.prompt_ids), batch_size=4, device="cpu")
    batch = collate_pairs(items, 0)
    smoothing = 0.1 if loss_type in ("robust", "cdpo") else 0.0
    loss_fn = dpo_loss_fn(DPOConfig(loss_type=loss_type, beta=0.5 if loss_type != "simpo" else 2.0,
                                    label_smoothing=smoothing))

    def gap():
        with torch.no_grad():
            logps, _ = completion_logps(model, batch)
        c, r = logps.chunk(2)
        return (c - r).mean().item()

    before = gap()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(5):
        loss, metrics = loss_fn(model, batch)
        assert torch.isfinite(loss) and "rewards/margins" in metrics
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert gap() > before, loss_type


def test_implicit_reward_scorer_agrees_with_the_stage():
    policy, reference = tiny(3).eval(), tiny(4).eval()
    scorer = dpo_reward_scorer(policy, reference, beta=0.1, pad_id=0)
    rows = [(p, c) for p, c, _ in PAIRS]
    batch = collate_sequences([p for p, _ in rows], [c for _, c in rows], pad_id=0)
    with torch.no_grad():
        ours = 0.1 * (completion_logps(policy, batch)[0] - completion_logps(reference, batch)[0])
    assert scorer.score_batch(rows) == pytest.approx(ours.tolist(), abs=1e-5)


def test_token_kl_is_exact_and_zero_against_itself():
    policy, reference = tiny(5).eval(), tiny(6).eval()
    batch = collate_sequences([[1, 2]], [[3, 4, 5]], pad_id=0)
    with torch.no_grad():
        same, n = token_kl(policy, policy, batch)
        kl, _ = token_kl(policy, reference, batch)
        ids = batch["input_ids"]
        logp = F.log_softmax(policy(ids)[0].float(), -1)[1:4]
        logq = F.log_softmax(reference(ids)[0].float(), -1)[1:4]
    assert same.item() == pytest.approx(0.0, abs=1e-6) and n.item() == 3
    assert kl.item() == pytest.approx((logp.exp() * (logp - logq)).sum().item(), rel=1e-4)


# ---------------------------------------------------------------------------------------------- end to end



MICRO = ["train.batch_size=8", "train.micro_batch_size=8", "train.warmup_steps=2", "train.lr=1e-3",
         "train.eval_every=0", "train.log_every=4", "train.save_every=0", "train.num_threads=1",
         "data.eval_fraction=0.25"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("dpo")
    return micro_model_dir(d / "sft"), write_jsonl(d / "pairs.jsonl", easy_pairs(64)), d


@pytest.mark.slow
def test_dpo_cli_raises_accuracy_and_margin_and_saves_a_chat_model(setup):
    model, data, d = setup
    out = d / "dpo"
    proc = lmforge("dpo", f"model={model}", f"data.source={data}", f"out_dir={out}", "train.max_steps=12",
                   "beta=0.1", "rpo_alpha=0", *MICRO)  # pure DPO: starts at ln 2
    s = json.loads((out / "summary.json").read_text())
    assert s["initial"]["eval_rewards/accuracies"] == 0.0 and s["initial"]["eval_loss"] == pytest.approx(
        math.log(2), abs=1e-4)
    assert s["eval_rewards/accuracies"] > 0.9 and s["eval_rewards/margins"] > 0.05, s
    assert "rewards/accuracies" in proc.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("rewards/margins" in r and "logps/chosen" in r for r in rows)
    tok_cfg = json.loads((out / "model" / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tok_cfg["chat_template"]
    transformers = pytest.importorskip("transformers")
    assert type(transformers.AutoModelForCausalLM.from_pretrained(out / "model")).__name__ == "LlamaForCausalLM"


@pytest.mark.slow
def test_dpo_sweep_writes_a_kl_vs_margin_plot_and_table(setup):
    model, data, d = setup
    out = d / "sweep"
    proc = lmforge("dpo", "sweep", f"model={model}", f"data.source={data}", f"out_dir={out}",
                   "betas=[0.1,1.0]", "train.max_steps=6", *MICRO)
    sweep = json.loads((out / "sweep.json").read_text())
    assert [r["beta"] for r in sweep["table"]] == [0.1, 1.0]
    assert all(r["kl_per_token"] > 0 and r["kl_per_sequence"] > 0 for r in sweep["table"])
    assert (out / "kl_vs_margin.png").stat().st_size > 1000 and "beta sweep" in proc.stdout


@pytest.mark.slow
def test_kto_cli_separates_good_from_bad(setup):
    model, data, d = setup
    out = d / "kto"
    lmforge("kto", f"model={model}", f"data.source={data}", f"out_dir={out}", "train.max_steps=12", *MICRO)
    s = json.loads((out / "summary.json").read_text())
    assert s["data"]["desirable"] + s["data"]["undesirable"] == s["data"]["train_examples"] == 96  # 128 - 32 held
    assert s["eval_rewards/chosen"] > s["eval_rewards/rejected"], s
    assert s["initial"]["eval_rewards/chosen"] == pytest.approx(0.0, abs=1e-5)


@pytest.mark.slow
def test_dpo_cli_reference_free_loss_skips_the_reference_pass(setup):
    model, data, d = setup
    out = d / "orpo"
    lmforge("dpo", f"model={model}", f"data.source={data}", f"out_dir={out}", "loss_type=orpo",
            "train.max_steps=4", *MICRO)
    s = json.loads((out / "summary.json").read_text())
    assert math.isfinite(s["eval_loss"]) and s["loss_type"] == "orpo" and "reference_seconds" not in s["data"]
    assert "eval_nll_loss" in s and "eval_log_odds_ratio" in s


def test_rpo_alpha_adds_the_chosen_answers_per_token_nll():
    model = tiny(2).eval()
    items = pairs()
    precompute_reference(model, items, lambda b: collate_pairs(b, 0), store_pair_logps,
                         lambda p: len(p.prompt_ids), batch_size=3, device="cpu")
    batch = collate_pairs(items, 0)
    nll = -sum(brute_logp(model, p, c) for p, c, _ in PAIRS) / sum(len(c) for _, c, _ in PAIRS)
    with torch.no_grad():
        plain, _ = dpo_loss_fn(DPOConfig())(model, batch)
        rpo, metrics = dpo_loss_fn(DPOConfig(rpo_alpha=0.5))(model, batch)
    assert plain.item() == pytest.approx(math.log(2), abs=1e-5)
    assert rpo.item() == pytest.approx(math.log(2) + 0.5 * nll, abs=1e-4)
    assert metrics["nll_loss"].item() == pytest.approx(nll, abs=1e-4)
