"""The demo: a shipped small model that adds but often forgets to carry, and `flywheel demo` that fixes it."""
