"""Checkpoints that survive a kill at any moment and resume a run exactly, with no pickle anywhere.

    ckpt_root/step_0000200/   the model directory written by the stage's save_model (config.json,
                              model.safetensors, tokenizer files) + lmforge's training state beside it:
                              optimizer.safetensors   AdamW moments, one tensor per (parameter, slot)
                              rng.safetensors         torch (+ CUDA) and numpy generator states, per rank
                              trainer_state.json      step, tokens, data position and python RNG per rank,
                                                      optimizer structure, resolved config, lmforge version
    ckpt_root/latest          the name of the newest complete step directory

A step directory is written as ``step_N.tmp`` and renamed when complete (trainer_state.json is its last file);
``latest`` is replaced atomically after that, so it never names a partial directory. Everything is read back
with ``safetensors.torch.load_file`` and ``json``: loading a checkpoint cannot run code, unlike torch.load.

Under FSDP (train.parallel=fsdp) the files are the same: every rank helps gather whole weights and whole AdamW
moments, rank 0 writes them, and resuming hands each rank its shard again, so a checkpoint opens in a single
process and resumes under ddp, fsdp or one process alike.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as td
from safetensors.torch import load_file, save_file
from safetensors.torch import save_model as save_weights

import lmforge
from lmforge.atomic import replace_dir, write_atomic
from lmforge.model import unwrap
from lmforge.train.dist import barrier, full_tensor, is_distributed, is_dtensor

STEP_DIR = re.compile(r"step_(\d+)")


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def save_checkpoint(ckpt_root: str | Path, step: int, save_model, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, train_state: dict, data_state: dict, *,
                    keep: int = 2) -> Path:
    """Write ``ckpt_root/step_NNNNNNN`` and point ``latest`` at it; returns the directory.

    Under torchrun every rank must call this (it gathers each rank's RNG and data position; rank 0 writes;
    all wait for it). ``save_model(dir)`` writes the model files; None writes just model.safetensors.
    ``train_state`` must be JSON-able. ``keep``: how many step directories to keep (0 = all).
    """
    root = Path(ckpt_root)
    final = root / step_dir_name(step)
    rng_tensors, rng_meta = capture_rng()
    ranks = [{"data": data_state, "rng": rng_meta, "rng_tensors": rng_tensors}]
    if is_distributed():
        ranks = [None] * td.get_world_size()
        td.all_gather_object(ranks, {"data": data_state, "rng": rng_meta, "rng_tensors": rng_tensors})
    main = not is_distributed() or td.get_rank() == 0
    optimizer_state = _gather_sharded(optimizer.state_dict(), keep=main)
    if main:
        tmp = root / (final.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        if save_model is None:
            save_weights(unwrap(model), str(tmp / "model.safetensors"))
        else:
            save_model(tmp)
        if not (tmp / "model.safetensors").exists():
            raise RuntimeError(f"save_model({tmp}) wrote no model.safetensors; a checkpoint needs the weights")
        tensors, structure = _flatten_optimizer(optimizer_state)
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        save_file({f"rank{r}.{k}": v.contiguous() for r, s in enumerate(ranks) for k, v in s["rng_tensors"].items()},
                  str(tmp / "rng.safetensors"))
        state = {"step": step, "lmforge_version": lmforge.__version__, "world_size": len(ranks), **train_state,
                 "data": [s["data"] for s in ranks], "rng": [s["rng"] for s in ranks], "optimizer": structure}
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1, default=_json_default) + "\n")
        replace_dir(tmp, final)
        write_atomic(root / "latest", final.name + "\n")
        _prune(root, keep, step)
    barrier()
    return final


def load_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    *, rank: int | None = None) -> dict:
    """Restore weights, optimizer and this rank's RNG from a step directory; returns trainer_state.json's
    contents with ``data`` (and ``rng``) narrowed to this rank's entry."""
    path = Path(path)
    state = json.loads((path / "trainer_state.json").read_text())
    _load_weights(path / "model.safetensors", unwrap(model))
    if optimizer is not None:
        load_optimizer(path, optimizer, state["optimizer"])
    if rank is None:
        rank = td.get_rank() if is_distributed() else 0
    saved_world = len(state["rng"])
    if rank >= saved_world:
        warnings.warn(f"{path} was saved by {saved_world} processes; rank {rank} reuses rank "
                      f"{rank % saved_world}'s RNG and data position", stacklevel=2)
    r = rank % saved_world
    rng = {k.split(".", 1)[1]: v for k, v in load_file(str(path / "rng.safetensors")).items()
           if k.startswith(f"rank{r}.")}
    restore_rng(rng, state["rng"][r])
    state["data"], state["rng"] = state["data"][r], state["rng"][r]
    return state


def load_optimizer(path: str | Path, optimizer: torch.optim.Optimizer, structure: dict) -> None:
    """Restore the optimizer from a step directory (``structure``: trainer_state.json's "optimizer"). The file
    holds whole tensors; for sharded (DTensor) parameters each rank keeps its own shard of every moment."""
    sd = _unflatten_optimizer(load_file(str(Path(path) / "optimizer.safetensors")), structure)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for idx, slots in sd["state"].items():
        p = params[idx] if idx < len(params) else None
        if not is_dtensor(p):
            continue
        from torch.distributed.tensor import distribute_tensor

        for name, value in slots.items():
            if torch.is_tensor(value) and value.shape == p.shape:  # a moment, not the scalar step count
                slots[name] = distribute_tensor(value.to(p.to_local().device), p.device_mesh, p.placements,
                                                src_data_rank=None)  # every rank read the file: no traffic
    optimizer.load_state_dict(sd)


def _gather_sharded(sd: dict, keep: bool) -> dict:
    """An optimizer state_dict with every DTensor gathered whole (all ranks take part, in the same order); the
    whole tensors are kept, on the CPU, only where ``keep``. Unsharded state comes back as it is."""
    if not any(is_dtensor(v) for slots in sd["state"].values() for v in slots.values()):
        return sd
    state = {}
    for idx, slots in sd["state"].items():
        state[idx] = {}
        for name, value in slots.items():
            whole = full_tensor(value)
            if keep:
                state[idx][name] = whole.cpu() if torch.is_tensor(whole) else whole
    return {"state": state, "param_groups": sd["param_groups"]}


def latest_checkpoint(ckpt_root: str | Path) -> Path | None:
    """The newest complete step directory: the one ``latest`` names, or, if that is missing or stale (a kill
    between renaming a directory and updating the pointer), the highest-numbered complete one."""
    root = Path(ckpt_root)
    pointer = root / "latest"
    if pointer.exists():
        named = root / pointer.read_text().strip()
        if _complete(named):
            return named
    done = sorted((_step_of(d), d) for d in root.glob("step_*") if _complete(d))
    return done[-1][1] if done else None


def _complete(d: Path) -> bool:
    return STEP_DIR.fullmatch(d.name) is not None and (d / "trainer_state.json").is_file()


def _step_of(d: Path) -> int:
    return int(STEP_DIR.fullmatch(d.name).group(1))


def _load_weights(file: Path, model: torch.nn.Module) -> None:
    """Strict load, except that a tied weight saved once under one of its names counts for all of them."""
    weights = load_file(str(file))
    expected = model.state_dict()
    loaded_storage = {expected[k].data_ptr() for k in expected if k in weights}
    missing = [k for k in expected if k not in weights and expected[k].data_ptr() not in loaded_storage]
    unexpected = [k for k in weights if k not in expected]
    if missing or unexpected:
        raise ValueError(f"{file} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    try:
        model.load_state_dict(weights, strict=False)
    except RuntimeError as e:
        raise ValueError(f"{file} does not match the model: {e}") from None


def _flatten_optimizer(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """optimizer.state_dict() -> tensors named "<param index>.<slot>" + a JSON-able rest."""
    tensors, scalars = {}, {}
    for idx, slots in sd["state"].items():
        for name, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{idx}.{name}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], structure: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in [*tensors.items(), *structure["scalars"].items()]:
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in structure["param_groups"]]
    return {"state": state, "param_groups": groups}


def capture_rng() -> tuple[dict[str, torch.Tensor], dict]:
    """This process's torch (+ CUDA) and numpy generator states as tensors, python's ``random`` as JSON."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = s
    name, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy"] = torch.from_numpy(keys.astype(np.int64))
    version, py_state, py_gauss = random.getstate()
    return tensors, {"numpy": [name, int(pos), int(has_gauss), float(cached)],
                     "python": [version, list(py_state), py_gauss]}


def restore_rng(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = sorted((int(k[4:]), v) for k, v in tensors.items() if k.startswith("cuda"))
    if cuda and torch.cuda.is_available():
        for i, s in cuda[:torch.cuda.device_count()]:
            torch.cuda.set_rng_state(s, i)
    name, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, py_state, py_gauss = meta["python"]
    random.setstate((version, tuple(py_state), py_gauss))


def _json_default(obj):
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"checkpoint state holds a {type(obj).__name__} ({obj!r:.80}), which JSON cannot store; "
                    "state_dict() values must be numbers, strings, lists or dicts")


def _prune(root: Path, keep: int, current: int) -> None:
    """Drop leftovers of killed writes and all but the ``keep`` newest step directories up to ``current``.
    Directories of later steps (left by an earlier run that got further) are not this run's to delete."""
    for d in [*root.glob("step_*.tmp"), *root.glob("step_*.old")]:
        shutil.rmtree(d, ignore_errors=True)
    if keep <= 0:
        return
    done = sorted((_step_of(d), d) for d in root.glob("step_*") if _complete(d) and _step_of(d) <= current)
    for _, d in done[:-keep]:
        shutil.rmtree(d, ignore_errors=True)
