"""The pinned-model pool: one load per name@version, least recently used evicted under the budget."""

from __future__ import annotations

import threading

from aigc_core.registry import ModelRef
from worker.pool import ModelPool

MB = 1 << 20


class FakeModel:
    def __init__(self, ref: ModelRef, size: int):
        self.ref = ref
        self.size = size

    def memory_bytes(self) -> int:
        return self.size


class FakeLoader:
    """Records each load; sizes by tag, 100 MB unless told otherwise."""

    def __init__(self, sizes: dict[str, int] | None = None):
        self.sizes = sizes or {}
        self.calls: list[str] = []

    def __call__(self, ref: ModelRef) -> FakeModel:
        self.calls.append(ref.tag)
        return FakeModel(ref, self.sizes.get(ref.tag, 100 * MB))


def ref(name: str, version: int = 1) -> ModelRef:
    return ModelRef(name, version, "text", "hf-causal-lm", f"file:///models/{name}/{version}")


def test_same_ref_is_loaded_once_however_many_gets():
    loader = FakeLoader()
    pool = ModelPool(loader, budget_bytes=1000 * MB)
    first = pool.get(ref("news"))
    rest = [pool.get(ref("news")) for _ in range(10)]
    assert pool.loads["news@1"] == 1
    assert loader.calls == ["news@1"]
    assert first.loaded_now and not any(r.loaded_now for r in rest)
    assert all(r.model is first.model for r in rest)


def test_equal_refs_built_separately_share_one_load():
    pool = ModelPool(FakeLoader(), budget_bytes=1000 * MB)
    a = pool.get(ModelRef("news", 1, "text", "hf-causal-lm", "file:///m", defaults={"max_new_tokens": 8}))
    b = pool.get(ModelRef("news", 1, "text", "hf-causal-lm", "file:///m", defaults={}))
    assert a.model is b.model and pool.loads["news@1"] == 1


def test_two_versions_of_one_name_are_pinned_separately():
    loader = FakeLoader()
    pool = ModelPool(loader, budget_bytes=1000 * MB)
    v1 = pool.get(ref("news", 1))
    v2 = pool.get(ref("news", 2))
    assert v1.model is not v2.model
    assert v1.model.ref.version == 1 and v2.model.ref.version == 2
    assert pool.loads == {"news@1": 1, "news@2": 1}
    assert sorted(pool.pinned()) == ["news@1", "news@2"]
    # Both stay valid: asking for the old version again does not reload it.
    assert pool.get(ref("news", 1)).model is v1.model
    assert pool.loads["news@1"] == 1


def test_least_recently_used_model_is_evicted_when_over_the_budget():
    pool = ModelPool(FakeLoader(), budget_bytes=250 * MB)  # room for two 100 MB models
    pool.get(ref("a"))
    pool.get(ref("b"))
    pool.get(ref("a"))  # a is now more recently used than b
    pool.get(ref("c"))
    assert pool.pinned() == ["a@1", "c@1"]
    assert pool.evictions == {"b@1": 1}
    assert pool.memory_bytes() <= 250 * MB


def test_several_models_are_evicted_to_make_room_for_a_big_one():
    pool = ModelPool(FakeLoader({"big@1": 200 * MB}), budget_bytes=250 * MB)
    pool.get(ref("a"))
    pool.get(ref("b"))
    pool.get(ref("big"))
    assert pool.pinned() == ["big@1"]
    assert pool.evictions == {"a@1": 1, "b@1": 1}


def test_model_just_loaded_is_never_evicted_even_when_alone_over_the_budget():
    pool = ModelPool(FakeLoader({"huge@1": 500 * MB}), budget_bytes=250 * MB)
    pool.get(ref("a"))
    got = pool.get(ref("huge"))
    assert got.loaded_now
    assert pool.pinned() == ["huge@1"]
    assert pool.evictions["huge@1"] == 0 and pool.evictions["a@1"] == 1
    # Still pinned: the next get is a hit, not a reload.
    assert not pool.get(ref("huge")).loaded_now
    assert pool.loads["huge@1"] == 1


def test_reloading_an_evicted_model_counts_a_second_load():
    loader = FakeLoader()
    pool = ModelPool(loader, budget_bytes=150 * MB)  # room for one
    first = pool.get(ref("a"))
    pool.get(ref("b"))
    again = pool.get(ref("a"))
    assert again.loaded_now and again.model is not first.model
    assert pool.loads == {"a@1": 2, "b@1": 1}
    assert pool.evictions == {"a@1": 1, "b@1": 1}
    assert loader.calls == ["a@1", "b@1", "a@1"]


def test_models_within_the_budget_are_all_kept():
    pool = ModelPool(FakeLoader(), budget_bytes=300 * MB)
    for name in ("a", "b", "c"):
        pool.get(ref(name))
    assert sorted(pool.pinned()) == ["a@1", "b@1", "c@1"]
    assert sum(pool.evictions.values()) == 0
    assert pool.memory_bytes() == 300 * MB


def test_concurrent_gets_of_one_ref_load_it_once():
    gate = threading.Event()

    class SlowLoader(FakeLoader):
        def __call__(self, r):
            gate.wait(1)
            return super().__call__(r)

    loader = SlowLoader()
    pool = ModelPool(loader, budget_bytes=1000 * MB)
    got = []
    threads = [threading.Thread(target=lambda: got.append(pool.get(ref("news")).model)) for _ in range(8)]
    for t in threads:
        t.start()
    gate.set()
    for t in threads:
        t.join(5)
    assert len(got) == 8 and all(m is got[0] for m in got)
    assert loader.calls == ["news@1"] and pool.loads["news@1"] == 1


def test_room_is_made_before_a_load_so_peak_memory_stays_near_the_budget():
    at_load: list[int] = []
    loader = FakeLoader({"big@1": 200 * MB})
    pool = ModelPool(lambda r: (at_load.append(pool.memory_bytes()), loader(r))[1], budget_bytes=250 * MB,
                     estimate=lambda r: loader.sizes.get(r.tag, 100 * MB))
    pool.get(ref("a"))
    pool.get(ref("b"))
    pool.get(ref("big"))
    assert at_load == [0, 100 * MB, 0]  # a and b were both let go before big was loaded
    assert pool.pinned() == ["big@1"] and pool.evictions == {"a@1": 1, "b@1": 1}

