"""``lmforge scaling {sweep,fit,optimal,predict}``: measure, fit and use scaling laws.

  sweep    train an IsoFLOP grid of model sizes x compute budgets with the pretrain stage -> sweep.csv, then fit
           (``--config scaling_tiny [key=value ...]``; keys of the ``pretrain`` section start with ``pretrain.``)
  fit      fit L(N, D) = E + A/N^α + B/D^β (Chinchilla approach 3), IsoFLOP minima (approach 2) and L(C) to a
           table, with bootstrap confidence intervals -> fit.json, fit.md and plots
  optimal  compute-optimal N and D for a FLOP budget (C = 6ND) from a fitted law or published ones, with the
           training time it implies
  predict  fit the sweep (training what is missing of it), predict a larger model's loss before training it,
           train it, report the error

The formulas and their sources are in ``lmforge.scaling.laws``; the sweep's FLOP accounting in
``lmforge.train.sweep``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from rich.console import Console
from rich.markdown import Markdown
from rich.table import Table

from lmforge.config import describe, from_dict, parse_override, read_yaml, recipe_path, set_dotted
from lmforge.errors import ConfigError
from lmforge.scaling import plots
from lmforge.scaling.laws import CHINCHILLA, ChinchillaLaw, analyze, tokens_per_param_rule
from lmforge.train.lm import PretrainConfig
from lmforge.train.sweep import ScalingConfig, read_table, run_predict, run_sweep, table_arrays

SUBCOMMANDS = ("sweep", "fit", "optimal", "predict")


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(__doc__)
        return 0
    sub, rest = argv[0], argv[1:]
    if sub not in SUBCOMMANDS:
        print(f"lmforge scaling: unknown subcommand {sub!r} (one of {', '.join(SUBCOMMANDS)})", file=sys.stderr)
        return 2
    return {"sweep": cmd_sweep, "fit": cmd_fit, "optimal": cmd_optimal, "predict": cmd_predict}[sub](rest)


# ---------------------------------------------------------------------------------------------- configs


def load_configs(recipe: str, overrides: list[str]):
    """(ScalingConfig, PretrainConfig) from a two-section recipe; ``pretrain.x=…`` overrides the base run."""
    path = recipe_path(recipe)
    data = read_yaml(path)
    unknown = [k for k in data if k not in ("scaling", "pretrain")]
    if unknown:
        raise ConfigError(f"{path}: unknown section {unknown[0]!r} (a scaling recipe has 'scaling' and 'pretrain')")
    scaling, pretrain = dict(data.get("scaling") or {}), dict(data.get("pretrain") or {})
    for text in overrides:
        key, value = parse_override(text)
        if key.startswith("pretrain."):
            set_dotted(pretrain, key.removeprefix("pretrain."), value)
        else:
            set_dotted(scaling, key.removeprefix("scaling."), value)
    source = f"{path} + overrides" if overrides else str(path)
    return from_dict(ScalingConfig, scaling, source), from_dict(PretrainConfig, pretrain, source)


def _recipe_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys (override with key=value; the base pretrain run with pretrain.KEY=value, "
               "see `lmforge pretrain --help`):\n" + describe(ScalingConfig))
    parser.add_argument("--config", "-c", default="scaling_tiny", help="recipe file or built-in name")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    return parser


# ---------------------------------------------------------------------------------------------- sweep / predict


def cmd_sweep(argv: list[str]) -> int:
    args = _recipe_parser("lmforge scaling sweep", "Train the IsoFLOP grid, then fit it.").parse_args(argv)
    scfg, base = load_configs(args.config, args.overrides)

    rows = run_sweep(scfg, base)
    table = Path(scfg.out_dir) / "sweep.csv"
    if len(rows) >= 5:
        return cmd_fit(["--table", str(table), "--n-column", scfg.n_column, "--n-boot", str(scfg.n_boot),
                        "--seed", str(scfg.seed)])
    print(f"{len(rows)} runs: too few to fit 5 parameters; table at {table}")
    return 0


def cmd_predict(argv: list[str]) -> int:
    args = _recipe_parser("lmforge scaling predict",
                          "Fit the sweep, predict a larger model's loss, train it, compare.").parse_args(argv)
    scfg, base = load_configs(args.config, args.overrides)

    result = run_predict(scfg, base)
    Console().print(Markdown(Path(result["report"]).read_text()))
    print(f"report: {result['report']}")
    return 0


# ---------------------------------------------------------------------------------------------- fit


def cmd_fit(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lmforge scaling fit", description="Fit scaling laws to a sweep table.")
    parser.add_argument("--table", required=True, help="sweep.csv (or .jsonl): columns tokens, val_loss, N, [budget]")
    parser.add_argument("--out", help="output directory (default: <table dir>/fit)")
    parser.add_argument("--n-column", default="n_params", help="the column used as N (default n_params)")
    parser.add_argument("--n-boot", type=int, default=50, help="bootstrap refits for the intervals (0 = none)")
    parser.add_argument("--level", type=float, default=0.95, help="confidence level of the intervals")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)

    if not 0 < args.level < 1 or args.n_boot < 0:
        raise ConfigError("--level must be in (0, 1) and --n-boot >= 0")
    rows = read_table(args.table, required=("tokens", "val_loss", args.n_column))
    N, D, budget, L = table_arrays(rows, args.n_column)
    analysis = analyze(N, D, budget, L, n_boot=args.n_boot, seed=args.seed, level=args.level)
    if analysis.chinchilla is None and analysis.isoflop is None:
        raise ConfigError(f"{args.table}: no law could be fitted: {analysis.errors}")
    out = Path(args.out) if args.out else Path(args.table).parent / "fit"
    out.mkdir(parents=True, exist_ok=True)
    summary = {"table": str(args.table), "n_column": args.n_column, "n_runs": len(rows), "n_boot": args.n_boot,
               "level": args.level, **analysis.to_dict(), "plots": []}
    if not args.no_plots:
        summary["plots"] = [str(p) for p in make_plots(out, N, D, budget, L, analysis)]
    (out / "fit.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "fit.md").write_text(fit_markdown(summary))

    Console().print(Markdown(fit_markdown(summary)))
    print(f"wrote {out / 'fit.json'}, {out / 'fit.md'}" + (f" and {len(summary['plots'])} plots" if summary["plots"]
                                                            else ""))
    return 0


def make_plots(out: Path, N, D, budget, L, analysis) -> list[Path]:
    paths = []
    if analysis.chinchilla is not None:
        paths.append(plots.plot_fit(out / "fit.png", N, D, L, analysis.chinchilla.law))
    if analysis.isoflop is not None:
        paths.append(plots.plot_isoflop(out / "isoflop.png", N, budget, L, analysis.isoflop))
    law = analysis.chinchilla.law if analysis.chinchilla else None
    paths.append(plots.plot_frontier(out / "frontier.png", 6 * N * D, L, law=law, iso=analysis.isoflop,
                                     compute_law=analysis.compute_law))
    return paths


def _ci(value: float, ci: dict, key: str) -> str:
    lo, hi = ci.get(key, (math.nan, math.nan))
    return f"{value:.4g}" + (f" [{lo:.4g}, {hi:.4g}]" if math.isfinite(lo) else "")


def fit_markdown(s: dict) -> str:
    pct = f"{s['level']:.0%}"
    lines = [f"# Scaling-law fit of {s['table']}", "",
             f"{s['n_runs']} runs, N = `{s['n_column']}`, {pct} percentile intervals from {s['n_boot']} "
             f"bootstrap refits.", ""]
    law, ci = s["law"], s["law_ci"]
    if law:
        a, b = law["beta"] / (law["alpha"] + law["beta"]), law["alpha"] / (law["alpha"] + law["beta"])
        lines += ["## L(N, D) = E + A/N^α + B/D^β (Hoffmann et al. 2022, approach 3)", "",
                  "| parameter | estimate [interval] |", "|---|---|"]
        lines += [f"| {k} | {_ci(law[k], ci, k)} |" for k in ("E", "A", "B", "alpha", "beta")]
        lines += [f"| a in N_opt ∝ C^a | {_ci(a, ci, 'a')} |", f"| b in D_opt ∝ C^b | {_ci(b, ci, 'b')} |",
                  "", f"Huber objective {law['objective']:.3g} over {law['n_points']} runs.", ""]
    else:
        lines += [f"L(N, D) not fitted: {s['errors'].get('law')}", ""]
    iso, ici = s["isoflop"], s["isoflop_ci"]
    if iso:
        lines += ["## IsoFLOP profiles (approach 2)", "", "| budget C | runs | N_opt | D_opt | D/N | loss at N_opt |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {p['budget']:.3g} | {p['n_runs']} | {p['n_opt']:.3g} | {p['d_opt']:.3g} | "
                  f"{p['d_opt'] / p['n_opt']:.2f} | {p['loss_opt']:.4f} |" for p in iso["profiles"]]
        lines += ["", f"N_opt = {iso['n_coef']:.3g} · C^{_ci(iso['n_exp'], ici, 'n_exp')}, "
                      f"D_opt = {iso['d_coef']:.3g} · C^{_ci(iso['d_exp'], ici, 'd_exp')}", ""]
        lines += [f"Budget {k} skipped: {v}" for k, v in iso["skipped"].items()]
    else:
        lines += [f"IsoFLOP profiles not fitted: {s['errors'].get('isoflop')}", ""]
    cl = s["compute_law"]
    if cl:
        offset = f"{cl['E']:.4g} + " if cl["E"] else ""
        lines += ["## L(C) (Kaplan et al. 2020)", "",
                  f"L(C) = {offset}({cl['C_c']:.4g} / C)^{_ci(cl['alpha_C'], ici, 'alpha_C')}, fitted to the "
                  f"{cl['points']}.", ""]
    if s.get("plots"):
        lines += ["## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in s["plots"]]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- optimal


def cmd_optimal(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="lmforge scaling optimal",
        description="Compute-optimal parameters N and tokens D for a training budget C = 6ND.")
    parser.add_argument("--flops", type=float, nargs="+", required=True, help="training FLOPs budget(s), e.g. 1e23")
    parser.add_argument("--law", default="chinchilla",
                        help="chinchilla (approach 3 as published), 20tokens, or a fit.json from `scaling fit`")
    parser.add_argument("--ratio", type=float, default=20.0, help="tokens per parameter of the rule of thumb")
    parser.add_argument("--throughput-flops", type=float, default=989e12,
                        help="peak FLOP/s per accelerator (default: H100 dense bf16)")
    parser.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation")
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)

    if any(c <= 0 for c in args.flops) or args.throughput_flops <= 0 or not 0 < args.mfu <= 1 or args.gpus < 1:
        raise ConfigError("--flops and --throughput-flops must be positive, --mfu in (0, 1], --gpus >= 1")
    rows = [dict(row, flops=c, hours=c / (args.throughput_flops * args.mfu * args.gpus) / 3600)
            for c in args.flops for row in allocations(c, resolve_laws(args.law), args.ratio)]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0

    table = Table(title=f"compute-optimal allocation (C = 6ND; time at {args.gpus} x "
                        f"{args.throughput_flops:.3g} FLOP/s x {args.mfu:.0%} MFU)")
    for col in ("C (FLOPs)", "law", "N (params)", "D (tokens)", "tokens/param", "predicted loss", "training time"):
        table.add_column(col, justify="left" if col == "law" else "right")
    for r in rows:
        loss = f"{r['loss']:.3f}" if r["loss"] is not None else "—"
        table.add_row(f"{r['flops']:.3g}", r["law"], _si(r["N"]), _si(r["D"]), f"{r['D'] / r['N']:.1f}", loss,
                      _duration(r["hours"]))
    Console(width=max(130, Console().width)).print(table)
    return 0


def resolve_laws(spec: str) -> list[tuple[str, object]]:
    """(label, law) pairs: the requested law first, then the published references it is compared with."""
    chin = ("Chinchilla approach 3 (published)", CHINCHILLA)
    rule = ("tokens/param rule", None)
    if spec == "chinchilla":
        return [chin, rule]
    if spec == "20tokens":
        return [rule, chin]
    path = Path(spec)
    if not path.exists():
        raise ConfigError(f"--law {spec!r}: expected chinchilla, 20tokens or a JSON file written by `scaling fit`")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"--law {path}: not JSON ({e})") from None
    laws = []
    law = data.get("law", data)
    if law and "alpha" in law:
        try:
            laws.append((f"{path.name}: L(N, D) fit", ChinchillaLaw.from_dict(law)))
        except ValueError as e:
            raise ConfigError(f"--law {path}: {e}") from None
    if data.get("isoflop"):
        laws.append((f"{path.name}: IsoFLOP fit", data["isoflop"]))
    if not laws:
        raise ConfigError(f"--law {path}: holds neither a 'law' (E, A, B, alpha, beta) nor an 'isoflop' fit")
    return [*laws, chin, rule]


def allocations(C: float, laws, ratio: float) -> list[dict]:
    rows = []
    for label, law in laws:
        loss = None
        if law is None:
            N, D = tokens_per_param_rule(C, ratio)
            label = f"{ratio:g} tokens/param: N = √(C/{6 * ratio:g})"
        elif isinstance(law, ChinchillaLaw):
            N, D = law.optimal(C)
            loss = float(law.loss(N, D))
        else:  # an IsoFLOP fit: N_opt = k C^a, D_opt = k' C^b
            N, D = law["n_coef"] * C ** law["n_exp"], law["d_coef"] * C ** law["d_exp"]
        rows.append({"law": label, "N": float(N), "D": float(D), "loss": loss})
    return rows


def _duration(hours: float) -> str:
    if hours < 1 / 60:
        return f"{hours * 3600:.1f} s"
    if hours < 1:
        return f"{hours * 60:.1f} min"
    return f"{hours:,.1f} h ({hours / 24:,.1f} d)"


def _si(x: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if x >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"
