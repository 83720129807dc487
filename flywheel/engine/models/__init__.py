"""Native model implementations, chosen from a checkpoint's ``architectures``."""
