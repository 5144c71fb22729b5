"""The layer contract (pyproject.toml's [tool.importlinter], run by `make lint`) holds, and breaks on a planted
stage -> stage import, an upward import and an import cycle; `lmforge --help` loads no torch."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "lmforge"

pytest.importorskip("importlinter")  # the dev extra installs it (make lint runs it)


def lint_imports(tmp_path: Path, plant: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """lint-imports on a copy of the package, with ``plant`` = {module file: a line appended to it}."""
    copy = tmp_path / "src" / "lmforge"
    shutil.copytree(SRC, copy, ignore=shutil.ignore_patterns("__pycache__", "assets", "recipes"))
    for rel, line in (plant or {}).items():
        with (copy / rel).open("a") as f:
            f.write(f"\n{line}\n")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    code = "from importlinter.cli import lint_imports_command; lint_imports_command()"
    return subprocess.run([sys.executable, "-c", code, "--no-cache", "--no-logo", "pyproject.toml"], cwd=tmp_path,
                          env={"PYTHONPATH": str(tmp_path / "src"), "PATH": ""}, capture_output=True, text=True,
                          timeout=300)


def test_the_code_keeps_the_contract(tmp_path):
    proc = lint_imports(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "3 kept, 0 broken" in proc.stdout


@pytest.mark.parametrize("plant,broken,shown", [
    ({"stages/kto.py": "from lmforge.stages.dpo import DPOConfig  # noqa"},
     "a stage never imports another stage", "lmforge.stages.kto -> lmforge.stages.dpo"),
    ({"scoring.py": "import lmforge.rollout  # noqa"},  # core reaching up into an engine
     "apps and cli -> stages -> engines -> core", "lmforge.scoring -> lmforge.rollout"),
    ({"generation.py": "import lmforge.stages.sample  # noqa"},  # an engine reaching up into a stage
     "apps and cli -> stages -> engines -> core", "lmforge.generation -> lmforge.stages.sample"),
    ({"data/tinyworld.py": "import lmforge.data.chat  # noqa"},  # chat -> rows -> sources -> tinyworld -> chat
     "no import cycles between sibling packages or modules", ".tinyworld -> .chat"),
])
def test_a_planted_violation_breaks_the_contract(tmp_path, plant, broken, shown):
    proc = lint_imports(tmp_path, plant)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"{broken} BROKEN" in proc.stdout and shown in proc.stdout, proc.stdout


def test_cli_imports_no_torch():
    """`lmforge --help` stays instant: cli.py imports a verb's module only when that verb runs."""
    code = "import sys, lmforge.cli; print(sorted(m for m in ('torch', 'numpy', 'rich') if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert proc.stdout.strip() == "[]"
