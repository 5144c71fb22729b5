"""``lmforge report RUN_DIR``: one Markdown and one self-contained HTML page for a pipeline run.

A run directory holds one directory per stage (``runs/tiny/{pretrain,sft,dpo,...}``), each with any of
summary.json, metrics.jsonl, config.yaml, PNG plots and an ``eval/eval.json`` written by ``lmforge eval`` (or
eval.json itself, for an eval stage of its own).
The report shows:

1. a table, one row per stage, in the order the pipeline ran them (pipeline.json; else the usual order). A column shows the first of its keys found in the stage's summary.json, then in
   its eval/eval.json, then the last value logged under its metric keys in metrics.jsonl; a {"value", "ci"}
   dict prints with its interval, a missing value is "—", and a column no stage has is left out:
       column     summary / eval keys                                    metrics.jsonl keys
       loss       val_loss, eval_loss, loss, train_loss                  val_loss, eval_loss, loss
       accuracy   accuracy, eval/accuracy last                           eval/accuracy
       format     format_rate                                            -
       pref. acc. preference_accuracy, eval_rewards/accuracies,          eval_rewards/accuracies, eval_accuracy
                  eval_accuracy
       reward     reward, eval/reward last, reward last,                 eval/reward, reward, objective/rlhf_reward
                  objective/rlhf_reward last
       KL         kl, kl_k1_per_token                                    kl
       length     mean_response_tokens, eval/mean_length last,           eval/mean_length, completions/mean_length
                  completions/mean_length last
       steps      steps                                                  step
       time       seconds                                                -
   "loss" is each stage's own objective (next-token loss for pretrain / SFT, the DPO loss for DPO, ...).
2. what the stages changed: three held-out problems chosen by rule from every stage's graded answers
   (apps/demos.py: one SFT gets wrong and DPO / GRPO get right, one every stage gets right, one none does),
   one row per stage, one column per problem;
3. sample answers side by side: every stage's ``samples: [{"prompt", "response"}]`` and those of its eval (not
   when the demo problems are shown), or
   its single ``sample`` string (the answer to its config's sample_prompt, which pretrain's sample starts with);
   one row per prompt, one column per stage;
4. loss curves from each stage's metrics.jsonl: loss as logged (faint) and smoothed (TensorBoard's debiased
   moving average), val_loss with markers, one panel per stage and one row per group (pre-training, SFT,
   preference, RL; matplotlib, Agg backend);
5. lm-evaluation-harness results, when a stage's eval has them;
6. every PNG found in a stage directory (or its eval/), captioned with the stage and the file name;
7. after the stage table, accuracy and thinking tokens per difficulty level of every stage whose eval has
   ``by_level``, and the tables a stage writes in ``tables.json`` (``[{"title", "headers", "rows"}]``: the
   reasoning recipe's budget sweep, search comparison and PRM metrics).

report.md refers to PNGs by relative path (loss_curves.png is written next to it); report.html embeds them as
base64, so it is one file to send around. The same inputs always give byte-identical output.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from lmforge.apps.demos import Demo, choose_demos
from lmforge.config import parse_cli
from lmforge.errors import DataError
from lmforge.figures import save_figure
from lmforge.train.tracking import log_report

STAGE_ORDER = ("tokenizer", "pretrain", "midtrain", "sft", "reward", "prm", "orm", "dpo", "ipo", "simpo", "orpo",
               "kto", "online_dpo", "constitutional", "ppo", "grpo", "rloo", "grpo_outcome", "grpo_process",
               "ppo_outcome", "ppo_process", "grpo_length", "dpo_sweep", "reward_hacking", "overoptimisation",
               "budget_sweep", "compute_sweep", "eval", "think", "scaling")
COLUMNS = [  # (header, summary / eval.json keys, metrics.jsonl keys, format)
    ("loss", ("val_loss", "eval_loss", "loss", "train_loss"), ("val_loss", "eval_loss", "loss"), "{:.3f}"),
    ("accuracy", ("accuracy", "eval/accuracy last"), ("eval/accuracy",), "{:.1%}"),
    ("vs SFT", ("accuracy_gain",), (), "{:+.1%}"),  # paired difference over the same held-out problems
    ("format", ("format_rate",), (), "{:.1%}"),
    ("pref. acc.", ("preference_accuracy", "eval_rewards/accuracies", "eval_accuracy"),
     ("eval_rewards/accuracies", "eval_accuracy"), "{:.1%}"),
    ("reward", ("reward", "eval/reward last", "reward last", "objective/rlhf_reward last"),
     ("eval/reward", "reward", "objective/rlhf_reward"), "{:.3f}"),
    ("KL", ("kl", "kl_k1_per_token"), ("kl",), "{:.4f}"),
    ("length", ("mean_response_tokens", "eval/mean_length last", "completions/mean_length last"),
     ("eval/mean_length", "completions/mean_length"), "{:.1f}"),
    ("steps", ("steps",), ("step",), "{:,}"),
    ("time", ("seconds",), (), "{:.0f} s"),
]
MISSING = "—"
DEMO_INTRO = ("Three held-out problems, chosen by rule from every stage's graded answers (eval/records.jsonl), "
              "each answered by every stage (✓ right, ✗ wrong):")
MAX_PROMPTS = 8
CSS = """body{font:15px/1.5 system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#222}h1{font-size:1.6em}h2{margin-top:2em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;margin:1em 0;width:100%}th,td{border:1px solid #ddd;padding:.35em .6em;
vertical-align:top;text-align:left}th{background:#f5f5f5}td.num{text-align:right;font-variant-numeric:tabular-nums}
td.text{white-space:pre-wrap;font-family:ui-monospace,Menlo,Consolas,monospace;font-size:13px}
figure{margin:1.5em 0}img{max-width:100%;border:1px solid #eee}figcaption{color:#555;font-size:.9em}
.meta{color:#666}"""


@dataclass
class Stage:
    name: str
    path: Path
    summary: dict = field(default_factory=dict)  # summary.json
    evaluation: dict = field(default_factory=dict)  # eval/eval.json
    metrics: list[dict] = field(default_factory=list)
    samples: list[dict] = field(default_factory=list)
    plots: list[Path] = field(default_factory=list)
    tables: list[dict] = field(default_factory=list)  # tables.json: [{"title", "headers", "rows"}]


# ---- reading ----

def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl rows; at a {"event": "resume"} row, earlier rows past the resumed step are dropped."""
    rows: list[dict] = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            raise DataError(f"{path}:{lineno}: field 'step' missing (a metrics row is {{\"step\": int, ...}})")
        if row.get("event") == "resume":
            rows = [r for r in rows if r["step"] <= row["step"]]
        else:
            rows.append(row)
    return rows


def _samples(summary: dict, stage_dir: Path) -> list[dict]:
    given = summary.get("samples")  # demo answers; a study may use the key for a count
    samples = [s for s in given if isinstance(s, dict) and "response" in s] if isinstance(given, list) else []
    if not samples and isinstance(summary.get("sample"), str):  # one answer to the config's sample_prompt
        prompt = ""
        if (stage_dir / "config.yaml").exists():
            config = yaml.safe_load((stage_dir / "config.yaml").read_text(encoding="utf-8"))
            prompt = str(config.get("sample_prompt") or "") if isinstance(config, dict) else ""
        text = summary["sample"]
        samples = [{"prompt": prompt or "(sample)", "response": text[len(prompt):] if prompt and
                    text.startswith(prompt) else text}]  # pretrain's sample repeats its prompt
    return [{"prompt": str(s.get("prompt", "")), "response": str(s["response"])} for s in samples]


def collect_stages(run_dir: str | Path) -> list[Stage]:
    """Every stage directory of a run (one with summary.json, metrics.jsonl, eval/eval.json or eval.json), in
    pipeline order."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DataError(f"{run_dir}: no such run directory")
    stages = []
    for d in sorted(p for p in run_dir.iterdir() if p.is_dir()):
        evaluated = d / "eval" / "eval.json"
        files = [d / "summary.json", d / "metrics.jsonl", evaluated if evaluated.exists() else d / "eval.json"]
        if not any(f.exists() for f in files):
            continue
        stage = Stage(d.name, d)
        if files[0].exists():
            stage.summary = _read_json(files[0])
        if files[2].exists():  # an `lmforge eval` of this stage's model fills what the stage did not measure
            stage.evaluation = _read_json(files[2])
        if files[1].exists():
            stage.metrics = read_metrics(files[1])
        own = _samples(stage.summary, d)
        stage.samples = own + [s for s in _samples(stage.evaluation, files[2].parent)
                               if s["prompt"] not in {o["prompt"] for o in own}]
        stage.plots = sorted(d.glob("*.png")) + sorted((d / "eval").glob("*.png"))
        if (d / "tables.json").exists():
            stage.tables = _tables(d / "tables.json")
        stages.append(stage)
    return sorted(stages, key=lambda s: (_stage_order(run_dir).get(s.name, len(STAGE_ORDER) + 1), s.name))


def _stage_order(run_dir: Path) -> dict[str, int]:
    """STAGE_ORDER, with the stages pipeline.json lists put in the order the pipeline ran them (in the places
    those stages take in STAGE_ORDER), so stages from an earlier run keep their usual place."""
    ran = _pipeline_order(run_dir)
    names = list(STAGE_ORDER)
    for i, name in enumerate(ran):  # a stage STAGE_ORDER does not know goes right after the one run before it
        if name not in names:
            names.insert(names.index(ran[i - 1]) + 1 if i else 0, name)
    slots = iter(ran)
    return {(next(slots) if name in ran else name): i for i, name in enumerate(names)}


def _pipeline_order(run_dir: Path) -> list[str]:
    try:
        return list(json.loads((run_dir / "pipeline.json").read_text())["stages"])
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return []


def _tables(path: Path) -> list[dict]:
    try:
        tables = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(tables, list) or not all(isinstance(t, dict) and {"title", "headers", "rows"} <= set(t)
                                               for t in tables):
        raise DataError(f"{path}: expected a list of {{\"title\", \"headers\", \"rows\"}} tables")
    return [{"title": str(t["title"]), "headers": [str(h) for h in t["headers"]],
             "rows": [[str(c) for c in row] for row in t["rows"]]} for t in tables]


# ---- content ----

def _number(value):
    if isinstance(value, dict) and "value" in value:
        value = value["value"]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return value


def _cell(stage: Stage, keys: tuple[str, ...], metric_keys: tuple[str, ...], fmt: str) -> str:
    for key in keys:  # in the order given (the pipeline's held-out eval.json "accuracy" before a stage's own eval)
        for source in (stage.summary, stage.evaluation):
            value = _number(source.get(key))
            if value is not None:
                raw, text = source[key], fmt.format(value)
                if isinstance(raw, dict) and isinstance(raw.get("ci"), list) and len(raw["ci"]) == 2:
                    text += f" [{fmt.format(raw['ci'][0])}, {fmt.format(raw['ci'][1])}]"
                return text
    for key in metric_keys:  # the last value logged
        logged = [r[key] for r in stage.metrics if _number(r.get(key)) is not None]
        if logged:
            return fmt.format(logged[-1])
    return MISSING


def stage_table(stages: list[Stage]) -> tuple[list[str], list[list[str]]]:
    """(headers, rows) of the stage table; columns that no stage has are dropped."""
    cells = [[_cell(s, keys, metric_keys, fmt) for _, keys, metric_keys, fmt in COLUMNS] for s in stages]
    measured = [any(c != MISSING for c, col in zip(row, COLUMNS) if col[0] not in ("steps", "time")) for row in cells]
    stages = [s for s, m in zip(stages, measured) if m]  # studies with only plots (a beta sweep) show as plots
    cells = [row for row, m in zip(cells, measured) if m]
    keep = [j for j in range(len(COLUMNS)) if any(row[j] != MISSING for row in cells)]
    return ["stage"] + [COLUMNS[j][0] for j in keep], [[s.name] + [row[j] for j in keep]
                                                       for s, row in zip(stages, cells)]


def level_table(stages: list[Stage]) -> dict | None:
    """Accuracy (95% interval) and mean thinking tokens per difficulty level of every stage whose eval has
    ``by_level`` (the reasoning recipe): one row per stage, one column per level. None when no stage has one."""
    with_levels = [s for s in stages if isinstance(s.evaluation.get("by_level"), dict) and s.evaluation["by_level"]]
    if not with_levels:
        return None
    levels = sorted({str(k) for s in with_levels for k in s.evaluation["by_level"]}, key=lambda k: (len(k), k))

    def cell(r) -> str:
        if not isinstance(r, dict) or not isinstance(r.get("accuracy"), dict):
            return MISSING
        a, ci = r["accuracy"], r["accuracy"].get("ci") or [float("nan")] * 2
        return f"{a['value']:.0%} [{ci[0]:.0%}, {ci[1]:.0%}], {r.get('mean_thinking_tokens', float('nan')):.1f} tok"

    rows = [[s.name] + [cell({str(k): v for k, v in s.evaluation["by_level"].items()}.get(k)) for k in levels]
            for s in with_levels]
    return {"title": "accuracy [95% CI] and mean thinking tokens by difficulty level (held-out, greedy)",
            "headers": ["stage"] + [f"level {k}" for k in levels], "rows": rows}


def extra_tables(stages: list[Stage]) -> list[tuple[str, dict]]:
    """(heading, table) for the by-level table and every stage's tables.json, in stage order."""
    levels = level_table(stages)
    out = [(levels["title"], levels)] if levels else []
    return out + [(f"{s.name}: {t['title']}", t) for s in stages for t in s.tables]


def sample_grid(stages: list[Stage], max_prompts: int = MAX_PROMPTS) -> tuple[list[str], list[list[str]]]:
    """(stage names, rows of [prompt, response per stage]) for prompts in first-seen order."""
    with_samples = [s for s in stages if s.samples]
    prompts: dict[str, dict[str, str]] = {}
    for s in with_samples:
        for sample in s.samples:
            if sample["prompt"] in prompts or len(prompts) < max_prompts:
                prompts.setdefault(sample["prompt"], {}).setdefault(s.name, sample["response"])
    names = [s.name for s in with_samples]
    return names, [[p] + [answers.get(n, MISSING) for n in names] for p, answers in prompts.items()]


def harness_rows(stages: list[Stage]) -> list[list[str]]:
    """[stage, task, metric, value ± stderr] for every lm-evaluation-harness result in the stages' eval.json."""
    rows = []
    for s in stages:
        for task, metrics in (s.evaluation.get("harness") or s.summary.get("harness") or {}).items():
            for metric, value in metrics.items():
                if metric.endswith("_stderr") or _number(value) is None:
                    continue
                err = _number(metrics.get(f"{metric}_stderr"))
                rows.append([s.name, task, metric, f"{value:.4f}" + (f" ± {err:.4f}" if err is not None else "")])
    return rows


def demo_table(demos: list[Demo], stages: list[Stage]) -> tuple[list[str], list[list[str]]]:
    """(headers, rows): one row per stage that answered, one column per demo problem; ✓ / ✗ before each answer."""
    names = [s.name for s in stages if any(s.name in d.responses for d in demos)]
    headers = ["stage"] + [f"{d.kind}: {d.prompt} (answer {d.answer})" for d in demos]
    rows = [[n] + [(("✓ " if d.responses[n][1] else "✗ ") + d.responses[n][0].strip()) if n in d.responses
                   else MISSING for d in demos] for n in names]
    return headers, rows


LOSS_GROUPS = (("pre-training", ("pretrain", "midtrain")), ("supervised fine-tuning", ("sft",)),
               ("reward model and preference tuning", ("reward", "dpo", "ipo", "simpo", "orpo", "kto", "online_dpo",
                                                        "dpo_sweep", "constitutional")),
               ("reinforcement learning", ("grpo", "rloo", "ppo", "reward_hacking")))


def smooth(values: list[float], weight: float) -> list[float]:
    """TensorBoard's smoothing: an exponential moving average, debiased so it starts at the first value."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight ** i))
    return out


def plot_loss_curves(stages: list[Stage], path: Path) -> Path | None:
    """Loss (raw, faint, and smoothed) and val_loss against step, one panel per stage, one row per group of stages
    (pre-training, SFT, preference, RL). None when nothing was logged."""
    curves = {s.name: (s, {k: [(r["step"], r[k]) for r in s.metrics if _number(r.get(k)) is not None]
                           for k in ("loss", "val_loss")}) for s in stages}
    curves = {n: c for n, c in curves.items() if any(c[1].values())}
    groups = [(title, [curves[n] for n in names if n in curves]) for title, names in LOSS_GROUPS]
    grouped = {n for _, names in LOSS_GROUPS for n in names}
    groups += [("other", [c for n, c in curves.items() if n not in grouped])]
    groups = [(t, g) for t, g in groups if g]
    if not groups:
        return None
    plt = pyplot()
    cols = max(len(g) for _, g in groups)
    fig, axes = plt.subplots(len(groups), cols, figsize=(4.3 * cols, 3.3 * len(groups)), squeeze=False)
    for row, (title, group) in enumerate(groups):
        for col in range(cols):
            ax = axes[row][col]
            if col >= len(group):
                ax.axis("off")
                continue
            stage, series = group[col]
            if series["loss"]:
                xs, ys = zip(*series["loss"])
                weight = min(0.9, max(0.0, 1 - 8 / len(ys)))  # more points, more smoothing
                ax.plot(xs, ys, color="C0", alpha=0.25, lw=1)
                ax.plot(xs, smooth(list(ys), weight), color="C0", lw=2, label=f"loss (smoothed {weight:.2f})")
            if series["val_loss"]:
                xs, ys = zip(*series["val_loss"])
                ax.plot(xs, ys, color="C1", marker="o", ms=4, lw=1.5, label="val_loss")
            ax.set_title(f"{title}: {stage.name}" if col == 0 else stage.name, fontsize=10)
            ax.set(xlabel="step", ylabel="loss" if col == 0 else None)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    return save_figure(fig, path, dpi=100, metadata={"Software": None})  # no version stamp: same inputs, same bytes


def pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError("lmforge report draws plots with matplotlib: pip install 'lmforge[plots]' "
                          "(or run it with plots=false)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _caption(stage: Stage, png: Path) -> str:
    where = "eval" if png.parent.name == "eval" and png.parent != stage.path else ""
    name = png.stem.replace("_", " ").replace("-", " ")
    return f"{stage.name}{' (eval)' if where else ''}: {name}"


# ---- rendering ----

def _md(text: str) -> str:
    """Text safe in a Markdown table cell: HTML escaped, pipes escaped, newlines as <br>."""
    return html.escape(text.strip(), quote=False).replace("|", "\\|").replace("\n", "<br>")


def _md_table(headers: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(_md(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    return lines + ["| " + " | ".join(_md(c) for c in row) + " |" for row in rows]


def render_markdown(title: str, run_dir: Path, stages: list[Stage], loss_png: Path | None, out_dir: Path,
                    demos: list[Demo] = ()) -> str:
    rel = lambda p: Path(os.path.relpath(p, out_dir)).as_posix()
    lines = [f"# {_md(title)}", "", f"Run directory: `{run_dir.as_posix()}`; {len(stages)} stages.", "", "## Stages", ""]
    lines += _md_table(*stage_table(stages))
    for heading, t in extra_tables(stages):
        lines += ["", f"### {_md(heading)}", ""] + _md_table(t["headers"], t["rows"])
    if demos:
        lines += ["", "## What the stages changed", "", DEMO_INTRO, ""]
        lines += [f"- **{_md(d.kind)}**: {_md(d.rule)}." for d in demos] + [""]
        lines += _md_table(*demo_table(demos, stages))
    names, grid = sample_grid(stages)
    if grid:
        lines += ["", "## Sample answers", "", "The same prompts, answered by each stage's model.", ""]
        lines += _md_table(["prompt"] + names, grid)
    harness = harness_rows(stages)
    if harness:
        lines += ["", "## lm-evaluation-harness", ""] + _md_table(["stage", "task", "metric", "value"], harness)
    if loss_png is not None:
        lines += ["", "## Loss curves", "", f"![loss curves]({rel(loss_png)})"]
    plots = [(s, p) for s in stages for p in s.plots]
    if plots:
        lines += ["", "## Plots"]
        for stage, png in plots:
            lines += ["", f"![{_md(_caption(stage, png))}]({rel(png)})", "", f"*{_md(_caption(stage, png))}*"]
    return "\n".join(lines) + "\n"


def _h(text: str) -> str:
    return html.escape(str(text), quote=True)


def _html_table(headers: list[str], rows: list[list[str]], text_cells: bool = False) -> str:
    def td(j: int, cell: str) -> str:
        cls = "text" if text_cells else "num" if j else ""  # first column: the stage name
        return f'<td class="{cls}">{_h(cell)}</td>' if cls else f"<td>{_h(cell)}</td>"

    head = "<tr>" + "".join(f"<th>{_h(h)}</th>" for h in headers) + "</tr>"
    body = ["<tr>" + "".join(td(j, c) for j, c in enumerate(row)) + "</tr>" for row in rows]
    return "<table>\n" + head + "\n" + "\n".join(body) + "\n</table>"


def _figure(png: Path, caption: str) -> str:
    data = base64.b64encode(png.read_bytes()).decode("ascii")
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{_h(caption)}">'
            f"<figcaption>{_h(caption)}</figcaption></figure>")


def render_html(title: str, run_dir: Path, stages: list[Stage], loss_png: Path | None,
                demos: list[Demo] = ()) -> str:
    parts = [f"<h1>{_h(title)}</h1>",
             f'<p class="meta">Run directory: <code>{_h(run_dir.as_posix())}</code>; {len(stages)} stages.</p>',
             "<h2>Stages</h2>", _html_table(*stage_table(stages))]
    for heading, t in extra_tables(stages):
        parts += [f"<h3>{_h(heading)}</h3>", _html_table(t["headers"], t["rows"])]
    if demos:
        parts += ["<h2>What the stages changed</h2>", f"<p>{_h(DEMO_INTRO)}</p>",
                  "<ul>" + "".join(f"<li><b>{_h(d.kind)}</b>: {_h(d.rule)}.</li>" for d in demos) + "</ul>",
                  _html_table(*demo_table(demos, stages), text_cells=True)]
    names, grid = sample_grid(stages)
    if grid:
        parts += ["<h2>Sample answers</h2>", "<p>The same prompts, answered by each stage's model.</p>",
                  _html_table(["prompt"] + names, grid, text_cells=True)]
    harness = harness_rows(stages)
    if harness:
        parts += ["<h2>lm-evaluation-harness</h2>", _html_table(["stage", "task", "metric", "value"], harness)]
    if loss_png is not None:
        parts += ["<h2>Loss curves</h2>", _figure(loss_png, "loss (faint: as logged; bold: smoothed) and validation "
                                                            "loss against step, one row per group of stages")]
    plots = [(s, p) for s in stages for p in s.plots]
    if plots:
        parts += ["<h2>Plots</h2>"] + [_figure(png, _caption(stage, png)) for stage, png in plots]
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{_h(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
            + "\n".join(parts) + "\n</body>\n</html>\n")


def write_report(run_dir: str | Path, out_dir: str | Path | None = None, title: str = "",
                 plots: bool = True) -> dict:
    """Write report.md, report.html (and loss_curves.png) for a run; returns their paths and the stage names."""
    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir else run_dir
    stages = collect_stages(run_dir)
    if not stages:
        raise DataError(f"{run_dir}: no stage directories (none holds summary.json, metrics.jsonl or eval/eval.json)")
    title = title or f"lmforge run: {run_dir.resolve().name}"
    out_dir.mkdir(parents=True, exist_ok=True)
    loss_png = plot_loss_curves(stages, out_dir / "loss_curves.png") if plots else None
    if not plots:
        for s in stages:
            s.plots = []
    md, page = out_dir / "report.md", out_dir / "report.html"
    demos = choose_demos({s.name: s.path for s in stages})
    if demos:  # the chosen problems replace the first held-out answers an eval keeps as its samples
        for s in stages:
            s.samples = _samples(s.summary, s.path)
    md.write_text(render_markdown(title, run_dir, stages, loss_png, out_dir, demos), encoding="utf-8")
    page.write_text(render_html(title, run_dir, stages, loss_png, demos), encoding="utf-8")
    files = [md, page] + ([loss_png] if loss_png else []) + [p for s in stages for p in s.plots]
    return {"markdown": str(md), "html": str(page), "stages": [s.name for s in stages],
            "loss_curves": str(loss_png) if loss_png else None, "files": [str(f) for f in files]}


@dataclass
class ReportConfig:
    run_dir: str = ""  # the pipeline run directory (runs/NAME)
    out_dir: str = ""  # default: the run directory
    title: str = ""  # default: "lmforge run: NAME"
    plots: bool = True  # false: no loss curves or embedded PNGs (and no matplotlib needed)
    report_to: list[str] = field(default_factory=list)  # wandb / mlflow: the report and its plots as artifacts
    tracking_project: str = "lmforge"

    def validate(self) -> None:
        if not self.run_dir:
            raise ValueError("give the run directory: lmforge report RUN_DIR (or run_dir=...)")


def main(argv: list[str]) -> int:
    if argv and "=" not in argv[0] and not argv[0].startswith("-"):  # `lmforge report runs/tiny`
        argv = [f"run_dir={argv[0]}"] + argv[1:]
    cfg = parse_cli(argv, ReportConfig, prog="lmforge report", description=__doc__)
    out = write_report(cfg.run_dir, cfg.out_dir or None, cfg.title, cfg.plots)
    if cfg.report_to:
        log_report(cfg.report_to, Path(cfg.run_dir), [Path(f) for f in out["files"]], cfg.tracking_project)
    print(f"{len(out['stages'])} stages ({', '.join(out['stages'])}) -> {out['markdown']}, {out['html']}")
    return 0
