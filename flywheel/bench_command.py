"""`flywheel bench NAME [options]`: run one of the benchmark scripts of `bench/` (in a checkout of the repository)."""

from __future__ import annotations

import importlib.util
import pkgutil
import runpy
import sys
from pathlib import Path

USAGE = "usage: flywheel bench NAME [options]   (`flywheel bench NAME --help` for a benchmark's options)"


def _benchmarks() -> list[str] | None:
    """The names of the runnable scripts of `bench/`, or None when it cannot be imported (not run from a
    checkout)."""
    spec = importlib.util.find_spec("bench")
    if spec is None or not spec.submodule_search_locations:
        return None
    scripts = [Path(folder) / f"{module.name}.py" for folder in spec.submodule_search_locations
               for module in pkgutil.iter_modules([folder]) if not module.ispkg]
    return sorted(script.stem for script in scripts if '__name__ == "__main__"' in script.read_text())


def main(argv: list[str]) -> int:
    names = _benchmarks()
    if names is None:
        print("flywheel bench: the benchmarks are the bench/ folder of a checkout of the repository; "
              "run this from its root", file=sys.stderr)
        return 2
    if not argv or argv[0] in ("-h", "--help"):
        print(f"{USAGE}\n\nbenchmarks: {', '.join(names)}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in names:
        print(f"flywheel bench: unknown benchmark {name!r}; one of: {', '.join(names)}", file=sys.stderr)
        return 2
    sys.argv = [f"flywheel bench {name}", *rest]
    runpy.run_module(f"bench.{name}", run_name="__main__", alter_sys=True)
    return 0
