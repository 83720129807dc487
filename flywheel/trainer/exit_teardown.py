"""Destroy a Gloo default process group while the interpreter is still whole.

A Gloo worker thread releases each finished collective a moment after the caller's wait returns.
If that release comes after the interpreter has begun to finalize, freeing the collective's
Python-owned tensors needs the GIL, and the thread aborts the process ("terminate called without an
active exception"). The online trainers gather metrics on every step, so a multi-process run on the
CPU would end that way now and then after a successful training. Destroying the group at exit joins
those threads first; DistributedDataParallel holds the group as well, so the trainer's wrapped model
is released before.
"""

from __future__ import annotations

import atexit
import gc
import sys
import weakref

import torch.distributed as dist
from transformers import Trainer


def destroy_gloo_group_at_exit(trainer: Trainer) -> None:
    atexit.register(_destroy_gloo_group, weakref.ref(trainer))


def _destroy_gloo_group(trainer_ref: weakref.ref[Trainer]) -> None:
    if not dist.is_available() or not dist.is_initialized() or dist.get_backend() != "gloo":
        return
    # After an uncaught exception the peers may still wait in a collective; leave the group as it is.
    if getattr(sys, "last_value", None) is not None:
        return
    trainer = trainer_ref()
    if trainer is not None:
        trainer.accelerator.free_memory()
        trainer.model_wrapped = trainer.model
    gc.collect()
    dist.destroy_process_group()
