"""Stop tokens and stop strings end a completion where vLLM ends it, on completions whose tokens are set
by the test: the real sampler runs, then each row's token is replaced by the script's next one."""

import pytest

from flywheel import LLM, SamplingParams
from flywheel.engine.sampler import SamplerOutput

IM_START = 257  # the byte tokenizer's "<|im_start|>"


class _Scripted:
    """The engine's sampler with its tokens replaced: a completion's k-th token is script[k]."""

    def __init__(self, sampler, script: list[int]) -> None:
        self.sampler, self.script = sampler, script

    def can_draw_async(self, seqs) -> bool:
        return False

    def __call__(self, logits, seqs, stop_ids) -> SamplerOutput:
        drawn = self.sampler(logits, seqs, stop_ids)
        tokens = [self.script[seq.num_completion_tokens] for seq in seqs]
        return SamplerOutput(tokens, drawn.logprobs, drawn.ranks, drawn.top)


@pytest.fixture
def complete(tiny_checkpoints):
    llm = LLM(tiny_checkpoints["qwen2"], dtype="float32", block_size=4)

    def complete(script: list[int], **options):
        llm.engine.sampler = _Scripted(llm.engine.sampler, script)
        params = SamplingParams(temperature=0.0, max_tokens=len(script), ignore_eos=True, **options)
        [output] = llm.generate([[1, 2, 3]], params)
        return output.outputs[0]

    return complete


def test_a_stop_tokens_text_is_left_out_and_its_id_kept(complete):
    stopped = complete(list(b"ab!cd"), stop_token_ids=[ord("!")])
    assert (stopped.token_ids, stopped.text, stopped.finish_reason) == (list(b"ab!"), "ab", "stop")
    kept = complete(list(b"ab!cd"), stop_token_ids=[ord("!")], include_stop_str_in_output=True)
    assert kept.text == "ab!"


def test_a_stop_string_inside_min_tokens_does_not_stop_later(complete):
    output = complete(list(b"abcdefg"), stop=["b"], min_tokens=4)
    assert (output.text, output.finish_reason) == ("abcdefg", "length")
    later = complete(list(b"abcdbfg"), stop=["b"], min_tokens=4)
    assert (later.text, later.finish_reason, len(later.token_ids)) == ("abcd", "stop", 5)


def test_stop_strings_see_special_tokens_as_the_text_has_them(complete):
    script = [*b"ab", IM_START, *b"cdef"]
    stopped = complete(script, stop=["<|im_start|>"], skip_special_tokens=False)
    assert (stopped.text, stopped.finish_reason, stopped.token_ids) == ("ab", "stop", [*b"ab", IM_START])
    # Without the special token's text, "b" and "c" meet; with it they never do.
    joined = complete(script, stop=["bc"], skip_special_tokens=False)
    assert (joined.text, joined.finish_reason) == ("ab<|im_start|>cdef", "length")
    skipped = complete(script, stop=["bc"])
    assert (skipped.text, skipped.finish_reason) == ("a", "stop")
