"""The KV block pool and the scheduler's use of it, without a model: reference counts, the prefix cache
and its LRU eviction, copy-on-write, preemption, and the pool's sizing from a memory budget."""

import pytest

from fusedformer.serving.block_pool import BlockPool, block_keys, kv_block_bytes, num_blocks_for
from fusedformer.serving.sampling_params import SamplingParams
from fusedformer.serving.scheduler import Scheduler
from fusedformer.serving.sequence import Request, Sequence, Status


def test_allocate_hold_release_counts_holders():
    pool = BlockPool(4, block_size=2)
    a, b = pool.allocate(), pool.allocate()
    assert (pool.num_free, pool.num_held) == (2, 2)
    pool.hold(a)
    pool.release(a)
    assert pool.ref_counts[a] == 1 and pool.num_free == 2
    pool.release_all([a, b])
    assert (pool.num_free, pool.num_held) == (4, 0)
    with pytest.raises(RuntimeError, match="released more often"):
        pool.release(a)
    pool.allocate_many(4)
    with pytest.raises(RuntimeError, match="no free block"):
        pool.allocate()


def test_block_keys_chain_the_whole_prefix():
    keys = block_keys([1, 2, 3, 4, 5], 2)
    assert len(keys) == 2  # full blocks only
    # the same block of tokens after a different prefix has another key
    assert block_keys([9, 9, 3, 4], 2)[1] != keys[1]
    assert block_keys([1, 2, 3, 4], 2) == keys
    # computing from the middle continues the chain
    assert block_keys([1, 2, 3, 4], 2, start=1, parent_key=keys[0]) == keys[1:]


def test_freed_cached_blocks_stay_until_reused_least_recently_freed_first():
    pool = BlockPool(3, block_size=2)
    a, b, c = pool.allocate_many(3)
    pool.cache(a, 101)
    pool.cache(b, 102)
    pool.release(b)  # freed first: evicted first
    pool.release(a)
    assert pool.lookup(101) == a and pool.lookup(102) == b
    pool.hold(a)  # a prefix-cache hit takes a free block back without evicting it
    assert pool.num_free == 1 and pool.lookup(101) == a
    assert pool.allocate() == b  # reused: its key is gone
    assert pool.lookup(102) is None and pool.lookup(101) == a
    assert pool.match_prefix([101, 102]) == [a]


def test_a_key_already_cached_keeps_its_first_block():
    pool = BlockPool(2, block_size=2)
    a, b = pool.allocate_many(2)
    pool.cache(a, 7)
    pool.cache(b, 7)
    assert pool.lookup(7) == a and pool.keys[b] is None


def test_pool_size_from_memory_budget():
    per_block = kv_block_bytes(n_layer=2, n_kv_head=4, head_dim=8, block_size=16, element_size=4)
    assert per_block == 2 * 2 * 4 * 8 * 16 * 4
    assert num_blocks_for(per_block, kv_cache_memory=10 * per_block + 5) == 10
    assert num_blocks_for(per_block, kv_cache_fraction=0.5, free_memory=8 * per_block) == 4
    with pytest.raises(ValueError, match="exactly one"):
        num_blocks_for(per_block)
    with pytest.raises(ValueError, match="kv_cache_fraction"):
        num_blocks_for(per_block, kv_cache_fraction=1.5, free_memory=100)
    with pytest.raises(ValueError, match="no block"):
        num_blocks_for(per_block, kv_cache_memory=per_block - 1)
    with pytest.raises(ValueError, match="num_blocks"):
        BlockPool(0)


def _seq(i, tokens, n=1):
    req = Request(str(i), None, list(tokens), SamplingParams(n=n), arrival=i)
    seq = Sequence(i, req, 0, list(tokens), fork_width=n)
    req.sequences.append(seq)
    return seq


def _run(sched, out, sampled_token=5):
    """Mark the step computed and, like the engine, append a token to each sequence at its end."""
    sched.computed(out)
    for seq, _ in out.scheduled:
        if seq.num_computed == len(seq.token_ids):
            seq.token_ids.append(sampled_token)


def test_chunked_prefill_shares_steps_with_decodes_within_the_token_budget():
    pool = BlockPool(32, block_size=4)
    sched = Scheduler(pool, max_num_seqs=8, max_num_batched_tokens=6)
    a = _seq(0, range(3))
    sched.add(a)
    _run(sched, sched.schedule())
    b = _seq(1, range(13))
    sched.add(b)
    steps = []
    while b.num_computed < 13:
        out = sched.schedule()
        assert out.num_tokens <= 6
        steps.append([(s.seq_id, n) for s, n in out.scheduled])
        _run(sched, out)
    # a decodes one token every step while b's prompt goes in chunks of the rest of the budget
    assert steps == [[(0, 1), (1, 5)], [(0, 1), (1, 5)], [(0, 1), (1, 3)]]
    assert len(b.block_table) == 4  # 13 prompt tokens + the sampled one's slot to come: 4 blocks of 4


def test_prefix_cache_hit_takes_the_cached_blocks_and_never_the_last_token():
    pool = BlockPool(16, block_size=4)
    sched = Scheduler(pool, max_num_seqs=8, max_num_batched_tokens=64)
    a = _seq(0, range(10))
    sched.add(a)
    _run(sched, sched.schedule())
    a_blocks = list(a.block_table)
    sched.finish(a)
    assert pool.num_held == 0 and len(pool.cached) == 2  # two full blocks stay cached
    b = _seq(1, list(range(8)) + [42, 43, 44])
    sched.add(b)
    out = sched.schedule()
    assert out.scheduled == [(b, 3)] and b.request.num_cached_tokens == 8
    assert b.block_table[:2] == a_blocks[:2] and pool.ref_counts[a_blocks[0]] == 1
    # a prompt of exactly the cached blocks recomputes its last block (its last token's logits are needed)
    c = _seq(2, range(8))
    sched.add(c)
    out = sched.schedule()
    assert (c, 4) in out.scheduled and c.request.num_cached_tokens == 4


def test_forked_samples_copy_a_shared_block_before_writing_it():
    pool = BlockPool(16, block_size=4)
    sched = Scheduler(pool, max_num_seqs=8, max_num_batched_tokens=64)
    parent = _seq(0, range(6), n=2)
    sched.add(parent)
    sched.computed(sched.schedule())
    child = Sequence(1, parent.request, 1, list(parent.token_ids))
    sched.fork(parent, child)
    shared = parent.block_table[1]
    assert pool.ref_counts[shared] == 2 and child.block_table == parent.block_table
    parent.token_ids.append(7)
    child.token_ids.append(8)
    out = sched.schedule()
    # the first writer copies the partial block; the second then holds the original alone
    assert len(out.copies) == 1 and out.copies[0][0] == shared
    assert parent.block_table[1] == out.copies[0][1] and child.block_table[1] == shared
    assert pool.ref_counts[shared] == 1 and pool.ref_counts[parent.block_table[0]] == 2
    sched.computed(out)
    for s in (parent, child):
        sched.finish(s)
    assert pool.num_held == 0


def test_the_newest_sequence_is_preempted_when_the_pool_runs_out():
    pool = BlockPool(4, block_size=2)
    sched = Scheduler(pool, max_num_seqs=8, max_num_batched_tokens=64)
    old, new = _seq(0, range(4)), _seq(1, range(4))
    for s in (old, new):
        sched.add(s)
    _run(sched, sched.schedule())
    assert pool.num_free == 0
    out = sched.schedule()  # old needs a third block: new gives its two back
    assert out.num_preempted == 1 and [s for s, _ in out.scheduled] == [old]
    assert new.status is Status.WAITING and new.num_computed == 0 and new.block_table == []
    assert sched.waiting[0] is new and pool.num_free == 1


def test_scheduler_respects_max_num_seqs():
    pool = BlockPool(64, block_size=4)
    sched = Scheduler(pool, max_num_seqs=2, max_num_batched_tokens=64)
    seqs = [_seq(i, range(5)) for i in range(3)]
    for s in seqs:
        sched.add(s)
    out = sched.schedule()
    assert [s for s, _ in out.scheduled] == seqs[:2] and list(sched.waiting) == seqs[2:]


def test_a_forking_request_counts_all_its_samples_against_max_num_seqs():
    pool = BlockPool(64, block_size=4)
    sched = Scheduler(pool, max_num_seqs=3, max_num_batched_tokens=64)
    a, b = _seq(0, range(5)), _seq(1, range(5), n=3)
    sched.add(a)
    sched.add(b)
    out = sched.schedule()
    assert [s for s, _ in out.scheduled] == [a] and list(sched.waiting) == [b]

