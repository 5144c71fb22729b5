"""EleutherAI's lm-evaluation-harness on lmforge models, through lm-eval's model interface.

:class:`LmforgeLM` implements the three requests every harness task is made of, on lmforge's own engine:

    loglikelihood(context, continuation) -> (log p(continuation | context), is it the greedy continuation)
        batched forward passes, longest first, right-padded (a causal model's scores before the padding do not
        see it); log-probs only at the continuation's positions, so no (batch, length, vocabulary) tensor is kept
    loglikelihood_rolling(text) -> log p(text), over disjoint windows of the model's context (perplexity tasks)
    generate_until(context, {until, max_gen_toks, do_sample, temperature, ...}) -> text
        lmforge.generation's batched KV-cache sampler, cut at the first stop string

Tokenization follows lm-eval's own ``hf`` model exactly (context and continuation encoded together and split
where the context ends, trailing spaces moved into the continuation, an empty context replaced by the prefix token,
no BOS unless ``add_bos_token``; generation contexts left-truncated to ``max_length - max_gen_toks``), so an
lmforge checkpoint gets the same scores here as when transformers opens it under ``--model hf``.

    lmforge eval model=DIR harness=TASK[,TASK] [harness_include=DIR_OF_TASK_YAMLS] [limit=N]
    lm_eval --model lmforge --model_args pretrained=DIR ...   (after ``import lmforge.harness``)
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from lm_eval import simple_evaluate
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.tasks import TaskManager
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window, make_table
from tqdm import tqdm

from lmforge.errors import ConfigError
from lmforge.generation import SamplingParams, generate
from lmforge.modelio import load_model_dir, load_tokenizer


@register_model("lmforge")
class LmforgeLM(TemplateLM):
    """An lmforge Transformer + Tokenizer as an lm-eval model. Give ``model`` and ``tokenizer`` objects, or
    ``pretrained=DIR`` (what ``--model_args`` passes)."""

    def __init__(self, pretrained: str | None = None, model=None, tokenizer=None, batch_size: int | str = 32,
                 max_length: int | None = None, max_gen_toks: int = 256, add_bos_token: bool = False,
                 device: str = "cpu", dtype: str = "float32", **kwargs):
        super().__init__()
        if model is None:
            if not pretrained:
                raise ValueError("LmforgeLM needs model= and tokenizer=, or pretrained=DIR")
            model = load_model_dir(pretrained, device=torch.device(device), dtype=getattr(torch, dtype))
            tokenizer = load_tokenizer(pretrained)
        self.model, self.tokenizer = model.eval(), tokenizer
        self.pretrained = str(pretrained or "")
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 32
        self._max_length = int(max_length or model.config.max_position_embeddings)
        self._max_gen_toks = int(max_gen_toks)
        self.add_bos_token = bool(add_bos_token)

    # ---- what TemplateLM asks for ----

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context is replaced by, and what rolling windows start with: bos, else eos (as hf)."""
        bos = self.tokenizer.bos_id
        return bos if bos is not None else self.tokenizer.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    @property
    def tokenizer_name(self) -> str:
        return self.pretrained or "lmforge"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        bos = add_special_tokens if add_special_tokens is not None else self.add_bos_token
        if add_special_tokens is None and self.tokenizer.bos_token and string.startswith(self.tokenizer.bos_token):
            bos = False  # the text brings its own
        return self.tokenizer.encode(string, add_bos=bos)

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens if isinstance(tokens, list) else [tokens],
                                     skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt)

    # ---- log-likelihoods: batched forward passes ----

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: [((context, continuation), context_ids, continuation_ids)] -> [(log p, is_greedy)]."""
        rows = []
        for _, context, continuation in requests:
            ids = (context + continuation)[-(self.max_length + 1):][:-1]  # left-truncated, as hf does
            rows.append((ids, len(continuation), continuation))
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))  # longest first: least padding
        results: list[tuple[float, bool] | None] = [None] * len(rows)
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        for batch in tqdm(batches, desc="lmforge loglikelihood", disable=disable_tqdm or len(batches) < 2):
            for i, result in zip(batch, self._score_batch([rows[i] for i in batch])):
                results[i] = result
        return results

    @torch.inference_mode()
    def _score_batch(self, rows) -> list[tuple[float, bool]]:
        width = max(len(ids) for ids, _, _ in rows)
        pad = self.tokenizer.pad_id
        x = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _, _ in rows], device=self.device)
        hidden = self.model(x, return_hidden=True)  # (B, T, D); right padding is never attended to
        out = []
        for b, (ids, n, continuation) in enumerate(rows):
            positions = torch.arange(len(ids) - n, len(ids), device=self.device)
            logp = F.log_softmax(self.model.lm_head(hidden[b, positions]).float(), dim=-1)
            target = torch.tensor(continuation, device=self.device)
            out.append((float(logp.gather(1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all())))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """log p(text), summed over disjoint windows of max_length tokens that start with the prefix token."""
        windows, owners = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owners.append(i)
        totals = [0.0] * len(requests)
        for owner, (logp, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
            totals[owner] += logp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ---- generation: lmforge.generation ----

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Requests grouped by their generation settings, each group one batched generate call per batch_size."""
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        results: list[str | None] = [None] * len(requests)
        eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        for indices in groups.values():
            kwargs = normalize_gen_kwargs(requests[indices[0]].args[1], self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            params = self._sampling_params(kwargs, until)
            max_context = self.max_length - params.max_new_tokens
            if max_context <= 0:
                raise ValueError(f"max_gen_toks ({params.max_new_tokens}) must be below the model's context "
                                 f"({self.max_length})")
            for start in tqdm(range(0, len(indices), self.batch_size), desc="lmforge generate_until",
                              disable=disable_tqdm or len(indices) <= self.batch_size):
                batch = indices[start:start + self.batch_size]
                prompts = [self.tok_encode(requests[i].args[0])[-max_context:] or [self.prefix_token_id]
                           for i in batch]
                outs = generate(self.model, prompts, params, tokenizer=self.tokenizer, pad_id=self.tokenizer.pad_id)
                for i, out in zip(batch, outs):
                    text = self.tok_decode(out[0].token_ids)
                    results[i] = postprocess_generated_text(text, stop=until, think_end_token=None)
                    self.cache_hook.add_partial("generate_until", requests[i].args, results[i])
        return results

    def _sampling_params(self, kwargs: dict, until: list[str]) -> SamplingParams:
        sample = bool(kwargs.get("do_sample")) and float(kwargs.get("temperature") or 0) > 0
        return SamplingParams(max_new_tokens=int(kwargs["max_gen_toks"]),
                              temperature=float(kwargs.get("temperature", 1.0)) if sample else 0.0,
                              top_k=int(kwargs.get("top_k") or 0) if sample else 0,
                              top_p=float(kwargs.get("top_p") or 1.0) if sample else 1.0,
                              stop_strings=[s for s in until if s], seed=int(kwargs.get("seed", 0)))


def run_harness(model, tokenizer, tasks: list[str], *, include_path: str = "", limit: int = 0,
                num_fewshot: int | None = None, batch_size: int = 32, chat: bool = False, seed: int = 0,
                pretrained: str = "") -> dict:
    """lm-eval's simple_evaluate on an lmforge model -> {"results": {task: {metric: value}}, "table": lm-eval's
    printed table, "versions", "n-shot"}. Metric names are lm-eval's ("acc",
    "acc_norm", "exact_match", "word_perplexity", ...), with ",FILTER" kept when the filter is not "none"."""
    if include_path and not Path(include_path).is_dir():
        raise ConfigError(f"harness_include={include_path}: no such directory of task YAMLs")
    lm = LmforgeLM(model=model, tokenizer=tokenizer, batch_size=batch_size, pretrained=pretrained)
    manager = TaskManager(include_path=include_path, include_defaults=False) if include_path else None
    if manager is None or any(t not in manager.all_tasks for t in tasks):  # indexing lm-eval's ~15k tasks is slow
        manager = TaskManager(include_path=include_path or None)
    missing = [t for t in tasks if t not in manager.all_tasks]
    if missing:
        raise ConfigError(f"harness task {missing[0]!r} is not known to lm-eval"
                         + (f" or in {include_path}" if include_path else " (harness_include=DIR adds local YAMLs)"))
    raw = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit or None, num_fewshot=num_fewshot,
                          log_samples=False, apply_chat_template=chat, random_seed=seed, numpy_random_seed=seed,
                          torch_random_seed=seed, fewshot_random_seed=seed, bootstrap_iters=1000)
    results = {task: {_metric_name(k): v for k, v in metrics.items()
                      if "," in k and isinstance(v, (int, float)) and not isinstance(v, bool)}
               for task, metrics in raw["results"].items()}
    return {"results": results, "table": make_table(raw), "versions": raw.get("versions", {}),
            "n-shot": raw.get("n-shot", {})}


def _metric_name(key: str) -> str:
    """lm-eval's "acc,none" -> "acc"; "exact_match,strict-match" stays as it is."""
    metric, _, filt = key.partition(",")
    return metric if filt == "none" else key
