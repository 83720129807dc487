"""Long-lived objects taken out of the garbage collector's sweeps once the first training step built them."""

from __future__ import annotations

import gc

from transformers import TrainerCallback


class FreezeAfterFirstStep(TrainerCallback):
    """After the run's first optimizer step, collect once and move every live object out of the collector's reach.

    That step builds what lives for the whole run (a compiled model's graphs and guards, the optimizer's
    state): hundreds of thousands of objects that every later full collection would walk again, a pause
    of a few hundred milliseconds in whatever phase it falls, generation included. Objects created
    afterwards are collected as usual.
    """

    def __init__(self) -> None:
        self.frozen = False

    def on_step_end(self, args, state, control, **kwargs):
        if not self.frozen:
            gc.collect()
            gc.freeze()
            self.frozen = True
