"""The `flywheel` command: serve (alias vllm-serve), demo, bench, env."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "serve": ("flywheel.server.cli", "run the generation server (TRL's `vllm-serve` endpoints)"),
    "vllm-serve": ("flywheel.server.cli", "alias of `serve`"),
    "demo": ("flywheel.demo.cli", "train the shipped small model with GRPO on the CPU"),
    "bench": ("flywheel.bench_command", "run a benchmark of bench/ (from a checkout of the repository)"),
    "env": ("flywheel.env_info", "print the versions and devices flywheel sees"),
}


def usage() -> str:
    lines = ["usage: flywheel COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<12} {help_text}" for name, (_, help_text) in COMMANDS.items()]
    lines += ["", "`flywheel COMMAND --help` explains a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"flywheel: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    return module.main(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
