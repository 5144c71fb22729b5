"""The fixed-shape decode path (Transformer.decode_step, StaticDecoder, torch.compile) against the growing-cache
engine and plain full forwards: the same greedy tokens, seeded samples and stops, log-probs within 1e-4."""

import gc
import weakref

import pytest
import torch
from test_generation import full_forward_logprobs, reference_greedy
from test_grpo import micro, run_toy, toy_config
from test_rollout import make_model_dir, tiny_model, write_rl_prompts

import lmforge.generation
import lmforge.rollout
import lmforge.scheduler
import lmforge.stages.ppo
import lmforge.stages.sample
from lmforge.config import parse_cli
from lmforge.cpu_decode import PackedDecodeStep, matmul_dtype, packable, packed_head
from lmforge.generation import SamplingParams, StaticDecoder, compiled_step, generate
from lmforge.model import KVCache, ModelConfig, Transformer
from lmforge.quant import quantize_model
from lmforge.rewards import RewardSpec
from lmforge.rollout import RLDataConfig
from lmforge.stages.generate import GenerateConfig
from lmforge.stages.grpo import GRPOConfig, run_grpo
from lmforge.stages.ppo import PPOConfig, run_ppo
from lmforge.stages.sample import SampleConfig, run_sample
from lmforge.train.loop import TrainConfig
from lmforge.train.metrics import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


PROMPTS = [[5, 9, 13], [7, 2, 30, 41, 8, 11, 3], [60], [1, 2, 3, 4]]  # mixed lengths: left padding


def both(model, prompts, **kw):
    """(growing-cache completions, static-cache completions) for the same SamplingParams."""
    out = [generate(model, prompts, SamplingParams(**kw, static_cache=static), eos_token_ids=[])
           for static in (False, True)]
    return out[0], out[1]


def assert_same(a, b):
    for row_a, row_b in zip(a, b, strict=True):
        for x, y in zip(row_a, row_b, strict=True):
            assert x.token_ids == y.token_ids and x.finish_reason == y.finish_reason
            if x.logprobs is not None:
                assert y.logprobs == pytest.approx(x.logprobs, abs=1e-4)


def test_decode_step_equals_a_cached_forward(model):
    """One static step (write at a slot, attend over the whole cache with a key mask) = forward with the cache."""
    ids = torch.tensor([[0, 0, 5, 9, 13], [7, 2, 30, 41, 8]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        grow, fixed = KVCache(model.config, 2, 9), KVCache(model.config, 2, 9, per_layer=True)
        for c in (grow, fixed):
            model(ids, attention_mask=mask, position_ids=positions, cache=c)
        nxt = torch.tensor([17, 23])
        want = model(nxt[:, None], attention_mask=torch.cat((mask, torch.ones(2, 1, dtype=torch.long)), 1),
                     position_ids=positions[:, -1:] + 1, cache=grow, return_hidden=True)[:, 0]
        key_mask = torch.ones(2, 9, dtype=torch.bool)
        key_mask[:, :5] = mask.bool()
        for length in (None, 6):  # attend over all 9 slots, or only the 6 filled ones
            k, v = [t.clone() for t in fixed.k], [t.clone() for t in fixed.v]
            got = model.decode_step(nxt, k, v, torch.tensor([5]), torch.tensor([2, 0]), key_mask, length)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            for layer in range(model.config.num_hidden_layers):
                torch.testing.assert_close(k[layer][:, :, :6], grow.k[layer][:, :, :6])
                torch.testing.assert_close(v[layer][:, :, :6], grow.v[layer][:, :, :6])


def test_static_greedy_equals_the_cache_path_and_full_forwards(model):
    cached, static = both(model, PROMPTS, max_new_tokens=10, temperature=0, return_logprobs=True)
    assert_same(cached, static)
    for prompt, (c,) in zip(PROMPTS, static):
        tokens, logps = reference_greedy(model, prompt, 10)
        assert c.token_ids == tokens and c.logprobs == pytest.approx(logps, abs=1e-4)


def test_static_seeded_samples_with_n_and_penalty_equal_the_cache_path(model):
    kw = dict(max_new_tokens=8, temperature=0.9, top_p=0.9, n=3, seed=7, repetition_penalty=1.3, return_logprobs=True)
    cached, static = both(model, PROMPTS, **kw)
    assert_same(cached, static)
    for prompt, row in zip(PROMPTS, static):
        assert len(row) == 3
        for c in row:
            assert c.logprobs == pytest.approx(full_forward_logprobs(model, prompt, c.token_ids), abs=1e-4)


def stops_that_finish_rows_early(model, prompts, n, steps):
    """Stop ids taken from an unstopped sampled run, chosen so that rows finish at different steps."""
    (run,) = [generate(model, prompts, SamplingParams(max_new_tokens=steps, temperature=1.0, n=n, seed=3),
                       eos_token_ids=[])]
    rows = [c.token_ids for r in run for c in r]
    return sorted({rows[0][1], rows[1][3], rows[2][0]})


def test_finished_rows_leave_the_static_batch_with_the_same_results(model, monkeypatch):
    """Stop tokens end rows at different steps: the static decoder keeps their slots until half the rows are
    done, then compacts the cache; tokens and log-probs stay those of the growing-cache path."""
    stops = stops_that_finish_rows_early(model, PROMPTS, 4, 12)
    sizes = []
    shrink = StaticDecoder._shrink
    monkeypatch.setattr(StaticDecoder, "_shrink", lambda self, rows: (sizes.append(len(rows)), shrink(self, rows)))
    kw = dict(max_new_tokens=12, temperature=1.0, n=4, seed=3, stop_token_ids=stops, return_logprobs=True)
    cached, static = both(model, PROMPTS, **kw)
    assert_same(cached, static)
    flat = [c for r in static for c in r]
    lengths = {len(c.token_ids) for c in flat if c.finish_reason == "stop"}
    assert len(lengths) >= 3 and any(c.finish_reason == "length" for c in flat)  # rows left at different steps
    assert sizes and all(s <= 8 for s in sizes)  # 16 rows: compacted once at most half were live


def test_static_decoder_compacts_at_half_and_keeps_min_rows():
    cfg = ModelConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    model = Transformer(cfg)
    cache = KVCache(cfg, 8, 4, per_layer=True)
    dec = StaticDecoder(model, cache, torch.zeros(8, dtype=torch.long), torch.ones(8, 4, dtype=torch.bool),
                        None, None, min_rows=2)
    dec.keep(torch.tensor([0, 2, 3, 5, 7]))  # 5 of 8 live: slots kept
    assert cache.batch_size == 8 and dec.rows.tolist() == [0, 2, 3, 5, 7]
    dec.keep(torch.tensor([1, 3, 4]))  # live rows 2, 5, 7 of 8: compacted
    assert cache.batch_size == 3 and dec.rows is None
    dec.keep(torch.tensor([2]))  # one live row: a dead copy keeps the batch at min_rows
    assert cache.batch_size == 2 and dec.rows.tolist() == [0]


def random_model(**cfg) -> Transformer:
    """A 2-layer model whose gains and biases are far from 1 and 0, so that folding them is really tested."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**(dict(vocab_size=64, num_hidden_layers=2, num_attention_heads=4,
                                            num_key_value_heads=2) | cfg))).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3 if p.dim() < 2 else 0.1)
    return model


def assert_step_matches_forward(model, rows: int, tol: float) -> None:
    """Three decode steps of PackedDecodeStep(model, rows) on a left-padded batch of 3 equal the model's forward."""
    ids = torch.tensor([[0, 0, 5, 9, 13], [7, 2, 30, 41, 8], [0, 3, 4, 5, 6]])
    mask = (ids != 0).long()
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        dtype = model.lm_head.weight.dtype
        ours, theirs = KVCache(model.config, 3, 8, dtype=dtype), KVCache(model.config, 3, 8, dtype=dtype)
        for c in (ours, theirs):
            model(ids, attention_mask=mask, position_ids=positions, cache=c)
        step = PackedDecodeStep(model, rows)
        key_mask = torch.cat((mask, torch.ones(3, 3, dtype=torch.long)), 1)
        tokens, position = torch.tensor([17, 23, 40]), positions[:, -1:] + 1
        for _ in range(3):
            want = model(tokens[:, None], attention_mask=key_mask[:, :theirs.length + 1], position_ids=position,
                         cache=theirs)[:, 0]
            got = step.head(step(tokens, key_mask[:, :ours.length + 1], position, ours))
            torch.testing.assert_close(got, want.float(), atol=tol, rtol=tol)
            tokens, position = want.argmax(-1), position + 1


def assert_chunk_matches_forward(model, rows: int, tol: float) -> None:
    """A prefill chunk of 3 tokens per row through PackedDecodeStep (the scheduler's prefill) equals the model's
    forward over the same chunk: after a left-padded past, a padded first chunk token in one row, explicit
    positions; then with no mask and default positions; then a decode step reads the keys the chunk wrote."""
    past = torch.tensor([[0, 0, 5, 9, 13], [7, 2, 30, 41, 8], [0, 3, 4, 5, 6]])
    chunk, chunk_mask = torch.tensor([[17, 18, 19], [0, 23, 24], [40, 41, 42]]), torch.tensor([[1, 1, 1], [0, 1, 1],
                                                                                               [1, 1, 1]])
    mask = (past != 0).long()
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    key_mask = torch.cat((mask, chunk_mask, torch.ones(3, 1, dtype=torch.long)), 1)
    chunk_pos = positions[:, -1:] + chunk_mask.cumsum(1).clamp(min=1)
    dtype = model.lm_head.weight.dtype
    with torch.no_grad():
        step = PackedDecodeStep(model, rows)
        ours, theirs = KVCache(model.config, 3, 9, dtype=dtype), KVCache(model.config, 3, 9, dtype=dtype)
        for c in (ours, theirs):
            model(past, attention_mask=mask, position_ids=positions, cache=c)
        want = model(chunk, attention_mask=key_mask[:, :8], position_ids=chunk_pos, cache=theirs)[:, -1]
        got = step.head(step(chunk, key_mask[:, :8], chunk_pos, ours))
        torch.testing.assert_close(got, want.float(), atol=tol, rtol=tol)
        nxt, pos = want.argmax(-1), chunk_pos[:, -1:] + 1
        want = model(nxt[:, None], attention_mask=key_mask, position_ids=pos, cache=theirs)[:, 0]
        torch.testing.assert_close(step.head(step(nxt, key_mask, pos, ours)), want.float(), atol=tol, rtol=tol)
        plain_ours, plain_theirs = KVCache(model.config, 3, 8, dtype=dtype), KVCache(model.config, 3, 8, dtype=dtype)
        for c in (plain_ours, plain_theirs):
            model(chunk[:, 1:] + 1, cache=c)
        want = model(chunk, cache=plain_theirs)[:, -1]
        torch.testing.assert_close(step.head(step(chunk, None, None, plain_ours)), want.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("rows", [3, 1], ids=["oneDNN layout", "one-row MKL layout"])
@pytest.mark.parametrize("extra", [dict(), dict(attention_bias=True, tie_word_embeddings=False),
                                   dict(qkv_bias=True, num_key_value_heads=4)])
def test_packed_decode_step_equals_the_model_forward(extra, rows):
    """PackedDecodeStep (folded norm gains and query scale, fused q/k/v and gate/up, SDPA attention) against the
    model's forward on a left-padded batch, for biases, an untied head and plain multi-head attention, with the
    weights laid out for 3 rows (oneDNN) and for one (MKL; any row count still works)."""
    assert_step_matches_forward(random_model(hidden_size=32, intermediate_size=64, **extra), rows, 1e-5)


@pytest.mark.parametrize("rows", [3, 1], ids=["oneDNN layout", "one-row MKL layout"])
@pytest.mark.parametrize("extra", [dict(), dict(attention_bias=True, tie_word_embeddings=False),
                                   dict(qkv_bias=True, num_key_value_heads=4)])
def test_a_prefill_chunk_through_the_packed_step_equals_the_model_forward(extra, rows):
    assert_chunk_matches_forward(random_model(hidden_size=32, intermediate_size=64, **extra), rows, 1e-5)


def test_a_decode_batch_and_a_prefill_chunk_in_one_pass_equal_each_alone():
    """forward_groups (the scheduler's step: decoding rows and prefill chunks over their own caches, every
    projection once over all their tokens) gives each batch the hidden states and cache writes it gets alone."""
    model = random_model(hidden_size=32, intermediate_size=64)
    step = PackedDecodeStep(model, 4)
    past, chunk = torch.tensor([[0, 5, 9, 13], [7, 2, 30, 41]]), torch.tensor([[17, 18, 19], [0, 23, 24]])
    key_mask = torch.cat(((past != 0).long(), torch.ones(2, 1, dtype=torch.long)), 1)
    position = (key_mask[:, :4].cumsum(1) - 1).clamp(min=0)[:, -1:] + 1
    chunk_mask = torch.tensor([[1, 1, 1], [0, 1, 1]])
    with torch.no_grad():
        caches = [KVCache(model.config, 2, 8) for _ in range(4)]  # decode alone, chunk alone, then together
        for c in caches[0], caches[2]:
            model(past, attention_mask=key_mask[:, :4], position_ids=(key_mask[:, :4].cumsum(1) - 1).clamp(min=0),
                  cache=c)
        groups = [(torch.tensor([3, 4]), key_mask, position, caches[0]), (chunk, chunk_mask, None, caches[1])]
        alone = [step.forward_groups([g])[0] for g in groups]
        together = step.forward_groups([(*groups[0][:3], caches[2]), (*groups[1][:3], caches[3])])
        for a, b in zip(alone, together):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
        for a, b in ((caches[0], caches[2]), (caches[1], caches[3])):
            assert a.length == b.length
            torch.testing.assert_close(a.k[:, :, :, :a.length], b.k[:, :, :, :b.length])
            torch.testing.assert_close(a.v[:, :, :, :a.length], b.v[:, :, :, :b.length])


@pytest.mark.parametrize("rows", [3, 1])
@pytest.mark.parametrize("bits", [4, 8])
def test_packed_decode_step_equals_the_forward_of_a_quantized_model(bits, rows):
    """An `lmforge quantize`d model decodes through PackedDecodeStep too (fused QuantLinears, the query scale in
    their scales, norms with their gains): the same logits as the quantized model's own forward."""
    model = random_model(hidden_size=64, intermediate_size=128, attention_bias=True)
    quantize_model(model, bits=bits, group_size=32)
    assert packable(model, rows)
    assert_step_matches_forward(model, rows, 1e-4)
    assert_chunk_matches_forward(model, rows, 1e-4)


def test_packed_weights_are_freed_with_their_step_without_a_garbage_collection():
    """The packed copy of the weights (513 MiB for SmolLM2 in fp32) goes when its step does: no reference cycle
    between the step and its projections' closures keeps it until the cyclic GC runs (it did, into the training
    phase of every RL step)."""
    model = random_model(hidden_size=32, intermediate_size=64)
    gc.collect()
    gc.disable()
    try:
        step = PackedDecodeStep(model, 3)
        packed = [weakref.ref(c.cell_contents) for c in step.layers[0]["qkv"].__closure__
                  if isinstance(c.cell_contents, torch.Tensor)]
        assert packed and all(r() is not None for r in packed)
        del step
        assert all(r() is None for r in packed)
    finally:
        gc.enable()


bf16_kernels = pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(),
                                  reason="this CPU has no oneDNN bf16 kernels (AVX512-BF16 / AMX)")


@bf16_kernels
@pytest.mark.parametrize("rows", [3, 1])
def test_bf16_decode_step_packs_bf16_weights_and_stays_close_to_the_fp32_forward(rows):
    """decode_matmul_dtype=bfloat16 (RL under train.dtype=bfloat16): every projection and the head are packed in
    bf16, at one row too (oneDNN's bf16 kernel, not MKL's fp32 one), and the logits stay within bf16 rounding of
    the fp32 model's forward; unset, the same model packs fp32 and matches to 1e-5 (the test above)."""
    model = random_model(hidden_size=32, intermediate_size=64, attention_bias=True)
    model.decode_matmul_dtype = torch.bfloat16
    assert packable(model, rows) and matmul_dtype(model) == torch.bfloat16
    assert PackedDecodeStep(model, rows).lm_head.dtype == torch.bfloat16
    with pytest.raises(AssertionError):  # bf16 rounding really happens: not within fp32's tolerance
        assert_step_matches_forward(model, rows, 1e-5)
    assert_step_matches_forward(model, rows, 3e-2)
    model.decode_matmul_dtype = None
    assert PackedDecodeStep(model, rows).lm_head.dtype == torch.float32


@bf16_kernels
def test_a_bf16_model_decodes_through_the_packed_step_with_its_own_forwards_logprobs():
    """`lmforge serve dtype=bfloat16` loads bf16 weights: the packed step takes them (bf16 matmuls, activations
    and cache, as the model's own bf16 forward): seeded samples carry the log-probs its full forward gives."""
    model = random_model(hidden_size=64, intermediate_size=128).to(torch.bfloat16)
    assert packable(model, 4) and matmul_dtype(model) == torch.bfloat16
    assert_step_matches_forward(model, 3, 5e-2)
    prompts = [[5, 9, 13], [7, 2], [30, 41, 8, 1]]
    params = SamplingParams(max_new_tokens=8, temperature=1.0, seed=3, return_logprobs=True)
    for prompt, (out,) in zip(prompts, generate(model, prompts, params, eos_token_ids=[])):
        want = full_forward_logprobs(model, prompt, out.token_ids)  # the bf16 model's own forward, no cache
        assert len(out.token_ids) == 8
        torch.testing.assert_close(torch.tensor(out.logprobs), torch.tensor(want).float(), atol=0.1, rtol=0)


@bf16_kernels
def test_grpo_under_bf16_training_samples_its_rollouts_with_bf16_matmuls(tmp_path, monkeypatch):
    """train.dtype=bfloat16 trains under autocast; its rollouts (and greedy evals) sample from the same policy with
    bf16 matmuls too (rollout.sample_as_trained), and fp32 training samples in fp32."""
    packed = []
    init = PackedDecodeStep.__init__

    def spy(self, model, rows):
        init(self, model, rows)
        packed.append(self.lm_head.dtype)
    monkeypatch.setattr(PackedDecodeStep, "__init__", spy)
    args = micro(tmp_path)
    for dtype, want in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        cfg = parse_cli([f"out_dir={tmp_path / dtype}", *args, "train.max_steps=2", "train.warmup_steps=0",
                         "train.save_every=0", f"train.dtype={dtype}"], GRPOConfig, prog="grpo", description="")
        summary = run_grpo(cfg)
        assert summary["steps"] == 2 and packed and set(packed) == {want}
        packed.clear()


def test_one_row_decodes_through_the_packed_step_with_the_generic_paths_tokens(monkeypatch):
    """A single prompt (lmforge generate / chat / sample at batch 1) takes PackedDecodeStep, measured faster than the
    generic forward at one row, and gives the generic forward's greedy tokens and seeded samples."""
    model = tiny_model(vocab=64).eval()
    built = []
    init = PackedDecodeStep.__init__
    monkeypatch.setattr(PackedDecodeStep, "__init__", lambda self, m, rows: (built.append(rows), init(self, m, rows))[1])
    for kw in (dict(temperature=0.0), dict(temperature=1.0, seed=5, return_logprobs=True)):
        params = SamplingParams(max_new_tokens=12, **kw)
        packed = generate(model, [[5, 9, 13]], params, eos_token_ids=[])
        assert built and built[-1] == 1
        with monkeypatch.context() as m:
            m.setattr(lmforge.scheduler, "packable", lambda model, rows: False)
            m.setattr(lmforge.generation, "packable", lambda model, rows: False)
            generic = generate(model, [[5, 9, 13]], params, eos_token_ids=[])
        assert_same(packed, generic)


def test_prepacked_head_equals_lm_head(model):
    h = torch.randn(16, 32)
    with torch.no_grad():
        torch.testing.assert_close(packed_head(model, 16)(h), model.lm_head(h), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(packed_head(model, 1)(h[:1]), model.lm_head(h[:1]), atol=1e-5, rtol=1e-5)


def test_compiled_decoding_equals_eager_reads_live_weights_and_compiles_once(tmp_path):
    """One compiled test (the compile dominates: ~10 s on an idle 2-core CPU, ~30 s loaded). The tiny GRPO run
    trains between rollouts: identical rewards mean the compiled step reads the updated weights, not constants."""
    model = tiny_model(vocab=16).eval()
    prompts = [[1, 2], [3], [4, 6, 7, 9], [8]]
    stops = stops_that_finish_rows_early(model, prompts, 2, 6)
    kw = dict(max_new_tokens=6, temperature=1.0, n=2, seed=3, stop_token_ids=stops, return_logprobs=True)
    eager = generate(model, prompts, SamplingParams(**kw), eos_token_ids=[])
    compiled = generate(model, prompts, SamplingParams(**kw, compile=True), eos_token_ids=[])
    assert_same(eager, compiled)
    assert compiled_step(model).compiled is compiled_step(tiny_model(vocab=16)).compiled  # one compiled function

    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    greedy = SamplingParams(max_new_tokens=5, temperature=0, compile=True, return_logprobs=True)
    for batch in ([[5, 1, 2, 3, 4, 5, 6, 7, 8]], prompts[:3]):  # one row, other lengths and batch sizes
        out = generate(model, batch, greedy, eos_token_ids=[])
        for prompt, (c,) in zip(batch, out):
            tokens, logps = reference_greedy(model, prompt, 5)
            assert c.token_ids == tokens and c.logprobs == pytest.approx(logps, abs=1e-4)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs  # no recompile

    runs = {}
    for flag in (False, True):
        run_toy(tmp_path / str(flag), toy_config(max_steps=3, epochs=1, batch_size=16, compile_generation=flag))
        runs[flag] = [(r["reward"], r["completions/mean_length"]) for r in read_metrics(tmp_path / str(flag))]
    assert runs[True] == runs[False] and len(runs[True]) == 3


def test_cli_configs_pass_the_compile_switch_to_generate(tmp_path, monkeypatch):
    """`lmforge generate/sample compile=true` and ppo's compile_generation (rollouts and greedy eval) reach
    SamplingParams.compile (grpo's is run for real above)."""
    cfg = parse_cli(["model=m", "input=i.jsonl", "output=o.jsonl", "compile=true"], GenerateConfig,
                    prog="generate", description="")
    assert cfg.sampling_params().compile

    seen = []

    class Seen(Exception):
        pass

    def fake_generate(model, prompts, params, **kw):
        seen.append(("sample", params.compile))
        raise Seen

    policy = make_model_dir(tmp_path / "policy")
    monkeypatch.setattr(lmforge.stages.sample, "generate", fake_generate)
    with pytest.raises(Seen):
        run_sample(SampleConfig(model=str(policy), compile=True, device="cpu"))

    def fake_sample_and_score(policy, tokenizer, rows, prompt_ids, params, reward):
        seen.append(("ppo", params.compile))
        raise Seen

    monkeypatch.setattr(lmforge.stages.ppo, "sample_and_score", fake_sample_and_score)  # the rollouts
    monkeypatch.setattr(lmforge.rollout, "sample_and_score", fake_sample_and_score)  # the greedy eval
    data = write_rl_prompts(tmp_path / "rl.jsonl")
    rm = make_model_dir(tmp_path / "rm", seed=3, num_labels=1)
    ppo = PPOConfig(out_dir=str(tmp_path / "ppo"), model=str(policy), compile_generation=True,
                    data=RLDataConfig(source=str(data), eval_source=str(data), eval_size=2),
                    rewards=[RewardSpec(kind="model", path=str(rm))], prompts_per_rollout=2,
                    train=TrainConfig(max_steps=1, warmup_steps=0, batch_size=2, micro_batch_size=2, device="cpu",
                                      num_threads=1, eval_every=0, save_every=0,
                                      eval_on_start=False))  # straight to the rollout; the eval is checked below
    with pytest.raises(Seen):
        run_ppo(ppo)
    run = lmforge.rollout.start_rl_run(ppo)
    with pytest.raises(Seen):
        run.eval_fn()
    assert seen == [("sample", True), ("ppo", True), ("ppo", True)]
