import copy
import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from flywheel.testing import CHAT_TEMPLATE, SPECIAL_TOKENS, byte_tokenizer
from flywheel.trainer.prompts import decode_completions, prompt_text, tokenize_prompts


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


def test_repeated_prompts_are_tokenized_once_with_the_same_ids(tokenizer):
    chat = [{"role": "user", "content": "add 2 and 3"}]
    # Groups of repeats, a prompt that comes back after another, a conversation, and a long prompt.
    prompts = ["abc"] * 3 + ["xy"] + ["abc"] * 2 + [chat] * 2 + ["z" * 40] * 2
    ids = tokenize_prompts(prompts, tokenizer, max_prompt_length=16)
    alone = [tokenize_prompts([prompt], tokenizer, max_prompt_length=16)[0] for prompt in prompts]
    assert ids == alone
    assert ids[0] is ids[2] and ids[4] is ids[5] and ids[6] is ids[7]  # one list per run of repeats
    assert ids[3] == list(b"xy") and ids[8] == [ord("z")] * 16
    assert ids[6][-10:] == list(b"assistant\n")
    assert tokenize_prompts([], tokenizer, None) == []


def test_chat_template_kwargs_reach_the_template_and_plain_prompts_stay_as_written():
    thinking = byte_tokenizer()
    thinking.chat_template = CHAT_TEMPLATE + "{% if enable_thinking %}{{ 'THINK' }}{% endif %}"
    chat = [{"role": "user", "content": "hi"}]
    [ids] = tokenize_prompts([chat], thinking, None, {"enable_thinking": True})
    assert thinking.decode(ids).endswith("assistant\nTHINK")
    assert prompt_text(chat, thinking, {"enable_thinking": False}) == prompt_text(chat, thinking)
    assert prompt_text("plain", thinking, {"enable_thinking": True}) == "plain"


def test_completions_decode_as_transformers_decodes_them(tokenizer):
    rng = random.Random(0)
    specials = tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS)
    completion_ids = [[rng.choice(range(256)) for _ in range(rng.randrange(0, 40))] + [rng.choice(specials)]
                      for _ in range(32)]
    texts = decode_completions(["p"] * 32, completion_ids, tokenizer)
    assert texts == tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    assert not any(token in text for text in texts for token in SPECIAL_TOKENS)
    [message] = decode_completions([[{"role": "user", "content": "hi"}]], [list(b"hello")], tokenizer)
    assert message == [{"role": "assistant", "content": "hello"}]


def test_a_conversation_ending_with_an_assistant_message_is_continued_from_it(tokenizer):
    """As TRL: its template is not closed, and the completion reward functions get starts with it."""
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Sure, it is"}]
    [ids] = tokenize_prompts([conversation], tokenizer, None)
    assert tokenizer.decode(ids).endswith("<|im_start|>assistant\nSure, it is")
    [message] = decode_completions([conversation], [list(b" 42.")], tokenizer)
    assert message == [{"role": "assistant", "content": "Sure, it is 42."}]


def test_a_tokenizer_that_decodes_its_own_way_keeps_it(tokenizer):
    class ShoutingTokenizer(type(tokenizer)):
        def _decode(self, token_ids, **kwargs):
            return super()._decode(token_ids, **kwargs).upper()

    shouting = copy.deepcopy(tokenizer)
    shouting.__class__ = ShoutingTokenizer
    assert decode_completions(["p"], [list(b"quiet")], shouting) == ["QUIET"]


def test_a_tokenizer_that_cleans_up_spaces_still_does():
    vocab = {"[UNK]": 0, "a": 1, "b": 2, ",": 3}
    backend = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(cleanup=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", clean_up_tokenization_spaces=True)
    assert backend.decode([1, 3, 2]) == "a , b"
    assert decode_completions(["p"], [[1, 3, 2]], tokenizer) == ["a, b"]
