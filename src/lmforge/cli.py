"""``lmforge <verb> [--config recipe.yaml] [key=value ...]``.

Each verb lives in its own module with a ``main(argv)`` function (the table is lmforge.apps.verbs); modules are
imported only when their verb runs, so ``lmforge --help`` starts in a fraction of a second (torch alone takes
longer than that to import).
"""

from __future__ import annotations

import importlib
import sys

from lmforge import __version__
from lmforge.apps.verbs import VERBS
from lmforge.errors import ConfigError, DataError


def usage() -> str:
    width = max(map(len, VERBS))
    lines = ["usage: lmforge <verb> [--config RECIPE] [key=value ...]", "", "verbs:"]
    lines += [f"  {verb:<{width}}  {v.help}" for verb, v in VERBS.items()]
    lines += ["", "`lmforge <verb> --help` shows a verb's options and its config keys."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(__version__)
        return 0
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        print(f"lmforge: unknown verb {verb!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(VERBS[verb].module)  # only now: `lmforge --help` never loads torch
    try:
        rc = int(module.main(rest) or 0)
        if "torch.distributed" in sys.modules:  # under torchrun: leave the process group together (after success
            from lmforge.train.dist import cleanup  # noqa: PLC0415  (only: a failed rank must not wait for others)

            cleanup()
        return rc
    except ConfigError as e:
        print(f"lmforge {verb}: config error: {e}", file=sys.stderr)
        return 2
    except DataError as e:
        print(f"lmforge {verb}: data error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nlmforge {verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
