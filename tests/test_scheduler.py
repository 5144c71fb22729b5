"""The continuous-batching scheduler: a request's tokens never depend on what else runs (joining mid-way, chunked
prefill, shared prefixes, preemption), the KV pool never exceeds its budget, and cancelled requests free their
blocks."""

import threading

import pytest
import torch

from lmforge import generation
from lmforge.generation import SamplingParams, generate
from lmforge.model import ModelConfig, Transformer
from lmforge.scheduler import Scheduler

GREEDY = SamplingParams(max_new_tokens=24, temperature=0.0)
SEEDED = SamplingParams(max_new_tokens=24, seed=7, top_p=0.9, repetition_penalty=1.3, return_logprobs=True)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)).eval()


def prompt(length: int, seed: int) -> list[int]:
    return torch.randint(1, 256, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def alone(model, ids, params, **kw):
    return Scheduler(model, eos_token_ids=[], **kw).generate([ids], params)[0]


def run(sched: Scheduler, check=None) -> int:
    steps = 0
    while sched.step():
        steps += 1
        if check is not None:
            check(sched)
    return steps


def tokens(completions):
    return [c.token_ids for c in completions]


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
@pytest.mark.parametrize("max_running", [1, 8])
def test_a_request_alone_equals_it_with_others_joining_midway(model, params, max_running):
    a, b, c = prompt(9, 1), prompt(30, 2), prompt(17, 3)
    sched = Scheduler(model, eos_token_ids=[], max_running=max_running, kv_tokens=1024, block_size=8)
    ra = sched.submit(a, params)
    for _ in range(5):
        sched.step()
    rb, rc = sched.submit(b, params), sched.submit(c, SamplingParams(max_new_tokens=10, seed=1, temperature=0.7))
    run(sched)
    assert tokens(ra.completions) == tokens(alone(model, a, params))
    assert tokens(rb.completions) == tokens(alone(model, b, params))
    assert len(rc.completions[0].token_ids) == 10
    if params.return_logprobs:
        for got, ref in zip(ra.completions[0].logprobs, alone(model, a, params)[0].logprobs):
            assert got == pytest.approx(ref, abs=1e-4)


def test_generate_matches_the_static_batch(model, monkeypatch):
    prompts = [prompt(n, i) for i, n in enumerate([3, 20, 11, 40, 7])]
    for params in (GREEDY, SamplingParams(max_new_tokens=16, n=3, seed=2, min_p=0.05, return_logprobs=True)):
        scheduled = generate(model, prompts, params, eos_token_ids=[5, 9])
        monkeypatch.setattr(generation, "SCHEDULED_BY_DEFAULT", False)
        static = generate(model, prompts, params, eos_token_ids=[5, 9])
        monkeypatch.setattr(generation, "SCHEDULED_BY_DEFAULT", True)
        assert [tokens(r) for r in scheduled] == [tokens(r) for r in static]
        assert [[c.finish_reason for c in r] for r in scheduled] == [[c.finish_reason for c in r] for r in static]


def test_a_flood_of_long_requests_stays_inside_the_kv_budget(model):
    """12 requests that need 9 blocks each in a pool of 24: queued or preempted, never over, all finish, and
    preemption (recompute) gives the same tokens as a pool big enough for all."""
    prompts = [prompt(40, 10 + i) for i in range(12)]
    params = SamplingParams(max_new_tokens=30, seed=3)
    sched = Scheduler(model, eos_token_ids=[], kv_tokens=24 * 8, block_size=8, max_running=6, prefill_chunk=32)
    requests = [sched.submit(p, params) for p in prompts]

    def within_budget(s: Scheduler):
        held = {b for seq in s.prefilling + s.decoding for b in seq.table + seq.reserved}
        assert s.blocks.used <= s.blocks.total and len(held) <= s.blocks.total
        assert s.blocks.used == len(held)  # nothing leaks: every used block belongs to a running sequence

    run(sched, within_budget)
    stats = sched.stats()
    assert stats["preemptions"] > 0 and stats["kv_blocks_used"] == 0 and stats["queued"] == stats["running"] == 0
    assert all(r.done and len(r.completions[0].token_ids) == 30 for r in requests)
    roomy = Scheduler(model, eos_token_ids=[], kv_tokens=4096, block_size=8).generate(prompts, params)
    assert [tokens(r.completions) for r in requests] == [tokens(r) for r in roomy]


def test_cancellation_frees_its_blocks_and_leaves_the_others(model):
    a, b = prompt(33, 4), prompt(12, 5)
    sched = Scheduler(model, eos_token_ids=[], kv_tokens=512, block_size=8)
    ra, rb = sched.submit(a, GREEDY), sched.submit(b, SamplingParams(max_new_tokens=24, n=3, seed=1))
    for _ in range(4):
        sched.step()
    used = sched.stats()["kv_blocks_used"]
    rb.cancel()
    sched.step()
    assert rb.done and rb.cancelled and rb.completions is None
    assert sched.stats()["kv_blocks_used"] < used
    assert sched.stats()["kv_blocks_used"] == len(ra.sequences[0].table)
    run(sched)
    assert tokens(ra.completions) == tokens(alone(model, a, GREEDY))
    assert sched.stats()["kv_blocks_used"] == 0


def test_an_on_token_error_cancels_that_request_only(model):
    sched = Scheduler(model, eos_token_ids=[])

    def gone(sample, token):
        raise BrokenPipeError("client went away")

    ra, rb = sched.submit(prompt(8, 6), GREEDY, on_token=gone), sched.submit(prompt(8, 7), GREEDY)
    run(sched)
    assert ra.cancelled and ra.completions is None
    assert tokens(rb.completions) == tokens(alone(model, prompt(8, 7), GREEDY))


def test_shared_prefixes_share_blocks_and_give_the_same_tokens(model):
    system = prompt(32, 8)  # 4 full blocks of 8
    a, b = system + prompt(5, 9), system + prompt(11, 10)
    sched = Scheduler(model, eos_token_ids=[], kv_tokens=1024, block_size=8)
    ra = sched.submit(a, SEEDED)
    sched.step()  # a's prompt is prefilled and its full blocks registered
    rb = sched.submit(b, SEEDED)
    sched.step()
    shared = set(ra.sequences[0].table) & set(rb.sequences[0].table)
    assert len(shared) == 4 and sched.stats()["prefix_blocks_reused"] == 4
    run(sched)
    assert tokens(rb.completions) == tokens(alone(model, b, SEEDED))
    assert tokens(ra.completions) == tokens(alone(model, a, SEEDED))


def test_the_samples_of_a_request_share_the_prompt_blocks(model):
    ids = prompt(35, 11)  # 4 full blocks and a partial one of 3
    params = SamplingParams(max_new_tokens=4, n=4, seed=5)
    sched = Scheduler(model, eos_token_ids=[], kv_tokens=1024, block_size=8)
    request = sched.submit(ids, params)
    sched.step()
    tables = [seq.table for seq in request.sequences]
    assert all(t[:4] == tables[0][:4] for t in tables) and len({t[4] for t in tables}) == 4
    assert sched.stats()["kv_blocks_used"] == 4 + 4  # the full blocks once, the partial one per sample
    run(sched)
    static = generate(model, [ids], params, eos_token_ids=[])[0]
    assert tokens(request.completions) == tokens(static)


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_chunked_prefill_equals_one_prefill(model, params):
    ids = prompt(45, 12)
    one = alone(model, ids, params, prefill_chunk=512)
    for chunk in (1, 7, 16):
        chunked = alone(model, ids, params, prefill_chunk=chunk, block_size=8)
        assert tokens(chunked) == tokens(one)
        if params.return_logprobs:
            assert chunked[0].logprobs == pytest.approx(one[0].logprobs, abs=1e-4)


def test_a_running_stream_keeps_decoding_while_a_long_prompt_prefills(model):
    sched = Scheduler(model, eos_token_ids=[], prefill_chunk=8, block_size=8)
    ra = sched.submit(prompt(6, 13), GREEDY)
    sched.step()
    rb = sched.submit(prompt(64, 14), GREEDY)
    before = len(ra.sequences[0].generated)
    for _ in range(4):  # 64 prompt tokens at 8 per step: b is still prefilling, a gets a token every step
        sched.step()
    assert rb.sequences[0].state == "prefill"
    assert len(ra.sequences[0].generated) == before + 4


def test_the_background_thread_serves_submissions(model):
    sched = Scheduler(model, eos_token_ids=[])
    sched.start()
    try:
        seen = []
        requests = [sched.submit(prompt(10 + i, 20 + i), GREEDY, on_token=lambda j, t: seen.append(t))
                    for i in range(3)]
        assert all(r.wait(timeout=60) for r in requests)
    finally:
        sched.stop()
    assert [tokens(r.completions) for r in requests] == [tokens(alone(model, prompt(10 + i, 20 + i), GREEDY))
                                                         for i in range(3)]
    assert len(seen) == 3 * GREEDY.max_new_tokens and sched.stats()["generated_tokens"] == len(seen)


def test_run_steps_on_the_calling_thread_until_stopped(model):
    """serve's way: the engine loops on the main thread, requests come from other threads, stop() ends it."""
    sched, results, threads = Scheduler(model, eos_token_ids=[]), [], set()
    step = sched.step
    sched.step = lambda: threads.add(threading.current_thread()) or step()

    def client():
        try:
            results.extend(sched.submit(prompt(10 + i, 20 + i), GREEDY) for i in range(2))
            assert all(r.wait(timeout=60) for r in results)
        finally:
            sched.stop()

    other = threading.Thread(target=client)
    other.start()
    sched.run()
    other.join()
    assert threads == {threading.current_thread()}
    assert [tokens(r.completions) for r in results] == [tokens(alone(model, prompt(10 + i, 20 + i), GREEDY))
                                                        for i in range(2)]


def test_a_request_larger_than_the_pool_is_refused(model):
    sched = Scheduler(model, kv_tokens=64, block_size=16)
    with pytest.raises(ValueError, match="KV blocks"):
        sched.submit(prompt(40, 1), SamplingParams(max_new_tokens=40))
    with pytest.raises(ValueError, match="vocab_size"):
        sched.submit([999], GREEDY)


def test_the_cache_buffers_are_reused_and_never_read_before_written(model):
    """The mirror and the prefill cache live in ScratchKV buffers kept between steps and handed out uninitialised:
    poisoned with NaN between two runs, the second run gives the first's tokens and log-probs, in the same storage."""
    sched = Scheduler(model, eos_token_ids=[], kv_tokens=1024, prefill_chunk=16)
    shared = prompt(20, 5)
    prompts = [shared + prompt(3, 6), prompt(7, 7), shared + prompt(11, 8), prompt(30, 9)]  # ragged, shared prefix
    first = sched.generate(prompts, SEEDED)
    held = {name: [t.data_ptr() for t in kv] for name, kv in sched.scratch.flat.items()}
    assert set(held) == {"mirror", "prefill"}
    with torch.inference_mode():  # the step allocates them in inference mode
        for kv in sched.scratch.flat.values():
            for t in kv:
                t.fill_(float("nan"))
    second = sched.generate(prompts, SEEDED)
    assert {name: [t.data_ptr() for t in kv] for name, kv in sched.scratch.flat.items()} == held
    assert [tokens(c) for c in second] == [tokens(c) for c in first]
    assert [[x.logprobs for x in c] for c in second] == [[x.logprobs for x in c] for c in first]
    assert [tokens(c) for c in first] == [tokens(alone(model, p, SEEDED)) for p in prompts]


def test_an_idle_loop_gives_its_cache_buffers_back(model):
    sched = Scheduler(model, eos_token_ids=[])
    sched.IDLE_RELEASE_S = 0.0
    sched.start()
    try:
        assert sched.submit(prompt(12, 3), GREEDY).wait(timeout=60)
        for _ in range(100):  # the loop frees them at its first idle pass
            if not sched.scratch.flat:
                break
            threading.Event().wait(0.02)
        assert not sched.scratch.flat
    finally:
        sched.stop()
