"""The bounded host pool: eviction orders on hand-made cases, and eviction that lasts in a real decode."""

from __future__ import annotations

import pytest
import torch

from infinisim.core.errors import InfinisimError
from infinisim.executor.generate import SamplingConfig, generate
from infinisim.executor.policies import InfiniGen
from infinisim.executor.pool import HostPool, evict_order
from infinisim.executor.selection import kept

STORED = torch.tensor([0, 1, 2, 3, 4, 5])
FETCHES = torch.tensor([5, 0, 3, 0, 0, 9])  # position 1 and 3 never fetched; 4 is recent
LAST = torch.tensor([7, -1, 2, 6, 8, 3])


def test_fifo_evicts_oldest():
    assert evict_order(STORED, FETCHES, LAST, "fifo").tolist()[:2] == [0, 1]


def test_lru_evicts_least_recently_fetched():
    assert evict_order(STORED, FETCHES, LAST, "lru").tolist()[:3] == [1, 2, 5]


def test_counter_evicts_least_fetched_of_the_older_half():
    order = evict_order(STORED, FETCHES, LAST, "counter").tolist()
    assert order[:3] == [1, 2, 0]  # older half is 0,1,2: fetched 5, 0, 3 times
    assert set(order[3:]) == {3, 4, 5}  # recent half last, although 3 and 4 were never fetched


def test_pool_make_room_and_bookkeeping():
    pool = HostPool(4, "counter", batch=1, positions=8)
    pool.admit(torch.ones(1, 8, dtype=torch.bool), 6)
    pool.record_fetch(torch.tensor([[[0, 2], [0, 5]]]), torch.tensor([[[True, True], [True, False]]]), step=3)
    assert pool.fetches[0, :6].tolist() == [2, 0, 1, 0, 0, 0] and pool.last_fetch[0, 2].item() == 3
    assert pool.make_room(1) == 3  # 6 stored + 1 incoming -> 4: three leave
    # older half 0,1,2 (fetched 2, 0, 1 times) leaves least-fetched first: 1, 2, 0; the recent half stays
    assert pool.stored[0, :6].tolist() == [False, False, False, True, True, True]
    with pytest.raises(InfinisimError, match="eviction"):
        HostPool(4, "random", 1, 1)


@pytest.mark.parametrize("eviction", ["counter", "lru", "fifo"])
def test_evicted_tokens_are_gone_for_every_later_step_and_layer(smollm2, pg19_text, monkeypatch, eviction):
    ids = smollm2.tokenizer.encode(pg19_text[:4000]).ids[:120]
    fetched_after: list[tuple[int, set[int]]] = []
    original = InfiniGen.fetch

    def spy(self, layer, indices, keep, step):
        fetched_after.append((step.index, set(indices[kept(keep, indices)].tolist())))
        return original(self, layer, indices, keep, step)

    monkeypatch.setattr(InfiniGen, "fetch", spy)
    policy = InfiniGen(budget=0.3, pool_capacity=100, eviction=eviction)
    gen = generate(smollm2.model, [ids], policy, SamplingConfig(6, stop_at_eos=False))
    evicted_by_step = [s.times.step_counts.get("evicted", 0) for s in gen.steps]
    assert evicted_by_step[1] == 21  # 120 prompt tokens + 1 incoming -> 100
    assert all(e == 1 for e in evicted_by_step[2:])
    gone = set(torch.nonzero(~policy.pool.stored[0, :policy.pool.admitted]).squeeze(-1).tolist())
    assert len(gone) == 21 + 4
    for step_index, rows in fetched_after:
        if step_index == len(gen.steps) - 1:
            assert not rows & gone  # the last step fetched nothing that had left the pool
