"""The PyTorch attention paths over the paged cache against plain attention on contiguous tensors."""

import torch

from flywheel.engine import attention
from flywheel.engine.shared_prefix import SharedPrefixLayout, _held, decode_attention_shared_prefix

BLOCK, KV_HEADS, HEADS, DIM = 4, 2, 6, 8


def random_cache(num_blocks=64):
    return torch.randn(num_blocks, BLOCK, KV_HEADS, DIM), torch.randn(num_blocks, BLOCK, KV_HEADS, DIM)


def dense_attention(q, keys, values, scale):
    """One query ``[H, D]`` over ``keys``/``values`` ``[L, KVH, D]``, in float64."""
    keys = keys.double().repeat_interleave(HEADS // KV_HEADS, dim=1)
    values = values.double().repeat_interleave(HEADS // KV_HEADS, dim=1)
    weights = torch.softmax(torch.einsum("hd,lhd->hl", q.double(), keys) * scale, dim=-1)
    return torch.einsum("hl,lhd->hd", weights, values).float()


def shared_prefix_tables():
    blocks = iter(torch.randperm(64).tolist())
    shared_a = [next(blocks) for _ in range(3)]
    shared_b = [next(blocks) for _ in range(1)]
    tables = [shared_a + [next(blocks)] for _ in range(3)]  # three rows share 3 blocks
    tables += [shared_b + [next(blocks), next(blocks)] for _ in range(2)]  # two rows share 1 block
    tables += [[next(blocks), next(blocks)]]  # a row alone
    return tables


def assert_shared_prefix_decode_equals_plain_attention(tables, seq_lens, k_cache, v_cache, length_limits=None):
    length_limits = length_limits or [length + 64 for length in seq_lens]
    layout = SharedPrefixLayout.from_block_tables(tables, seq_lens, length_limits, BLOCK)
    q = torch.randn(len(tables), HEADS, DIM)
    got = decode_attention_shared_prefix(q, k_cache, v_cache, layout, DIM**-0.5)
    width = max(map(len, tables))
    padded = torch.tensor([t + [-1] * (width - len(t)) for t in tables], dtype=torch.int32)
    plain = attention.decode_attention(q, k_cache, v_cache, torch.tensor(seq_lens), padded, DIM**-0.5)
    for row, length in enumerate(seq_lens):
        keys = attention.gather_kv(k_cache, padded[row : row + 1], length)[0]
        values = attention.gather_kv(v_cache, padded[row : row + 1], length)[0]
        expected = dense_attention(q[row], keys, values, DIM**-0.5)
        assert torch.allclose(got[row], expected, atol=1e-5)
        assert torch.allclose(plain[row], expected, atol=1e-5)
    return layout


def test_shared_prefix_decode_equals_plain_attention():
    torch.manual_seed(0)
    k_cache, v_cache = random_cache()
    layout = assert_shared_prefix_decode_equals_plain_attention(
        shared_prefix_tables(), [13, 15, 16, 10, 12, 7], k_cache, v_cache
    )
    assert layout.blocks.group_rows.shape == (2, 3)


def test_next_step_with_the_same_tables_attends_to_the_new_lengths():
    torch.manual_seed(2)
    k_cache, v_cache = random_cache()
    tables = shared_prefix_tables()
    first = assert_shared_prefix_decode_equals_plain_attention(tables, [13, 14, 14, 10, 11, 6], k_cache, v_cache)
    second = assert_shared_prefix_decode_equals_plain_attention(tables, [14, 15, 15, 11, 12, 7], k_cache, v_cache)
    assert second.blocks is first.blocks


def test_later_steps_read_each_new_position_and_new_block():
    torch.manual_seed(3)
    k_cache, v_cache = random_cache(128)
    tables = shared_prefix_tables()
    seq_lens = [15, 15, 16, 11, 12, 8]
    steps = 40
    # The copies widen as new blocks arrive: by four times their room, then up to the rows' limits.
    limits = [length + steps for length in seq_lens]
    assert_shared_prefix_decode_equals_plain_attention(tables, seq_lens, k_cache, v_cache, limits)
    free_blocks = iter(sorted(set(range(128)) - {b for t in tables for b in t}))
    for _ in range(steps):
        seq_lens = [length + 1 for length in seq_lens]
        tables = [t + [next(free_blocks)] if length > len(t) * BLOCK else t for t, length in zip(tables, seq_lens)]
        for table, length in zip(tables, seq_lens):  # this step's new keys and values
            slot = table[(length - 1) // BLOCK] * BLOCK + (length - 1) % BLOCK
            k_cache.view(-1, KV_HEADS, DIM)[slot] = torch.randn(KV_HEADS, DIM)
            v_cache.view(-1, KV_HEADS, DIM)[slot] = torch.randn(KV_HEADS, DIM)
        layout = assert_shared_prefix_decode_equals_plain_attention(tables, seq_lens, k_cache, v_cache, limits)
    widest = max(limit - shared for limit, shared in zip(limits, layout.blocks.shared_lens.tolist()))
    assert layout.widest_private == -(-widest // BLOCK) * BLOCK
    assert _held[k_cache].key_store.shape[1] == layout.widest_private


def test_no_layout_without_sharing():
    assert SharedPrefixLayout.from_block_tables([[1, 2], [3, 4]], [6, 7], [9, 9], BLOCK) is None


def test_prefill_with_cached_prefix_equals_plain_attention():
    torch.manual_seed(1)
    k_cache, v_cache = random_cache()
    table = torch.tensor([[5, 9, 2, 40]], dtype=torch.int32)
    seq_len, new = 14, 5  # 9 cached positions, 5 new queries
    q = torch.randn(new, HEADS, DIM)
    out = attention.prefill_attention(
        q, k_cache, v_cache, torch.tensor([0, new], dtype=torch.int32), torch.tensor([seq_len]), table, DIM**-0.5
    )
    keys = attention.gather_kv(k_cache, table, seq_len)[0]
    values = attention.gather_kv(v_cache, table, seq_len)[0]
    for i in range(new):
        visible = seq_len - new + i + 1
        assert torch.allclose(out[i], dense_attention(q[i], keys[:visible], values[:visible], DIM**-0.5), atol=1e-5)


def test_store_kv_writes_slots_and_skips_minus_one():
    k_cache, v_cache = torch.zeros(4, BLOCK, KV_HEADS, DIM), torch.zeros(4, BLOCK, KV_HEADS, DIM)
    k, v = torch.randn(3, KV_HEADS, DIM), torch.randn(3, KV_HEADS, DIM)
    attention.store_kv(k, v, k_cache, v_cache, torch.tensor([5, -1, 12]))
    assert torch.equal(k_cache[1, 1], k[0]) and torch.equal(v_cache[3, 0], v[2])
    assert int((k_cache != 0).any(-1).any(-1).sum()) == 2
