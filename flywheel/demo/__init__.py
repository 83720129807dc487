"""The demo: a shipped small model that adds numbers but often forgets to carry, and `flywheel demo` to fix it with GRPO."""
