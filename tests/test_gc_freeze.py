"""The trainers take what the first step built out of the garbage collector's sweeps, once."""

import gc
import weakref

from flywheel.trainer.gc_freeze import FreezeAfterFirstStep


class Node:
    pass


def test_the_first_step_end_freezes_the_live_objects_once_and_later_cycles_are_still_collected():
    callback = FreezeAfterFirstStep()
    built_by_the_first_step = [Node() for _ in range(1000)]
    before = gc.get_freeze_count()
    try:
        callback.on_step_end(None, None, None)
        frozen = gc.get_freeze_count()
        assert frozen >= before + len(built_by_the_first_step)
        callback.on_step_end(None, None, None)
        assert gc.get_freeze_count() == frozen
        node = Node()
        node.self = node
        alive = weakref.ref(node)
        del node
        gc.collect()
        assert alive() is None
    finally:
        gc.unfreeze()
