"""The trainers take what the first step built out of the garbage collector's sweeps, once; the engine
pauses the collector while a batch generates."""

import gc
import weakref

from flywheel import LLM, SamplingParams
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


def test_the_collector_is_off_while_a_batch_generates_and_as_it_was_after(tiny_checkpoints):
    llm = LLM(tiny_checkpoints["qwen2"], dtype="float32")
    step, seen = llm.engine.step, []

    def recording_step():
        seen.append(gc.isenabled())
        return step()

    llm.engine.step = recording_step
    llm.generate([[5, 6, 7]], SamplingParams(max_tokens=3, ignore_eos=True))
    assert seen and not any(seen) and gc.isenabled()
    gc.disable()
    try:
        llm.generate([[5, 6, 7]], SamplingParams(max_tokens=3, ignore_eos=True))
        assert not gc.isenabled()
    finally:
        gc.enable()
