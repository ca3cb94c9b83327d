"""The adapter bank: many adapters per layer as rows, trained together as if alone, added in O(1)."""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402
from torch_helpers import TinyLM, randomize_vectors  # noqa: E402

import vera_torch as vt  # noqa: E402


def _ids(seed: int = 0, batch: int = 4, seq: int = 5) -> torch.Tensor:
    return torch.randint(0, 11, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _lm(seed: int = 0) -> TinyLM:
    torch.manual_seed(seed)
    return TinyLM()


def _vectors(model: nn.Module, name: str) -> dict[tuple[str, str], torch.Tensor]:
    return {
        (path, kind): vector.detach().clone()
        for path, layer in vt.vera_layers(model).items()
        if layer.has_adapter(name)
        for kind, vector in layer.vectors(name).items()
    }


@pytest.mark.parametrize("dvora", [False, True])
def test_bank_adamw_trains_each_adapter_as_if_alone(dvora: bool) -> None:
    """One batch, rows of three adapters: BankAdamW ends where torch.optim.AdamW on each adapter alone ends."""
    names = ["a", "b", "c"]
    base = _lm()
    model = copy.deepcopy(base)
    for name in names:
        vt.add_vera(model, "all-linear", r=4, adapter_name=name, dvora=dvora and name != "b")
    randomize_vectors(model)
    alone = {}
    for name in names:  # each adapter alone in its own model, starting from the same vectors
        single = copy.deepcopy(base)
        vt.add_vera(single, "all-linear", r=4, adapter_name=name, dvora=dvora and name != "b")
        for (path, kind), value in _vectors(model, name).items():
            with torch.no_grad():
                vt.vera_layers(single)[path].vectors(name)[kind].copy_(value)
        alone[name] = single
    rows = ["a", "b", "a", "c", "__base__", "c"]
    ids, targets = _ids(batch=len(rows)), _ids(seed=1, batch=len(rows))

    def loss_of(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="sum")

    vt.set_adapter(model, names)
    bank_opt = vt.BankAdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2, weight_decay=0.1)
    opts = {
        n: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=5e-2, weight_decay=0.1)
        for n, m in alone.items()
    }
    for step in range(4):
        bank_opt.zero_grad()
        loss_of(model(ids, adapter_names=rows), targets).backward()
        bank_opt.step()
        for name, single in alone.items():
            if name == "c" and step == 2:
                continue  # c is absent from this step's batch below: the alone run skips it too
            picked = [i for i, row in enumerate(rows) if row == name]
            opts[name].zero_grad()
            loss_of(single(ids[picked]), targets[picked]).backward()
            opts[name].step()
        if step == 1:  # the next batch has no row of c: its rows must not move (no decay, no momentum)
            rows = ["a", "b", "a", "b", "__base__", "a"]
        if step == 2:
            rows = ["a", "b", "a", "c", "__base__", "c"]
    for name, single in alone.items():
        got, want = _vectors(model, name), _vectors(single, name)
        assert got.keys() == want.keys()
        for key in want:
            torch.testing.assert_close(
                got[key], want[key], rtol=1e-4, atol=1e-5, msg=lambda m, name=name, key=key: f"{name} {key}: {m}"
            )


def test_bank_adamw_leaves_absent_rows_bit_identical() -> None:
    model = vt.add_vera(_lm(), "all-linear", r=4, adapter_name="a")
    vt.add_vera(model, "all-linear", r=4, adapter_name="b")
    randomize_vectors(model)
    vt.set_adapter(model, ["a", "b"])
    before = _vectors(model, "b")
    opt = vt.BankAdamW([p for p in model.parameters() if p.requires_grad], lr=0.1, weight_decay=0.5)
    for _ in range(3):
        opt.zero_grad()
        model(_ids(), adapter_names=["a"] * 4).square().mean().backward()
        opt.step()
    after = _vectors(model, "b")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not all(torch.equal(x, y) for x, y in zip(_vectors(model, "a").values(), before.values(), strict=False))


def test_a_bank_of_several_rows_gives_sparse_gradients_that_plain_adamw_refuses() -> None:
    """torch.optim.AdamW would decay every adapter's rows: with several rows it refuses loudly instead."""
    model = vt.add_vera(_lm(), "all-linear", r=4, adapter_name="a")
    vt.add_vera(model, "all-linear", r=4, adapter_name="b")
    model(_ids()).sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(g.is_sparse for g in grads)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


def test_adding_and_deleting_costs_do_not_grow_with_the_adapters_held() -> None:
    """Rows are reused: delete then add keeps the capacity; the rows of others never move."""
    model = _lm()
    for i in range(40):
        vt.add_vera(model, "all-linear", r=4, adapter_name=f"a{i}")
    randomize_vectors(model)
    state = model.vera_state
    capacity = state.slots.capacity
    keep = _vectors(model, "a7")
    slot = state.slots.slot("a7")
    vt.delete_adapter(model, "a3")
    vt.add_vera(model, "all-linear", r=4, adapter_name="new")
    assert state.slots.slot("new") == 3 and state.slots.capacity == capacity
    assert state.slots.slot("a7") == slot
    assert all(torch.equal(keep[k], v) for k, v in _vectors(model, "a7").items())
    assert all(
        torch.equal(v, torch.full_like(v, 0.1) if k[1] == "lambda_d" else torch.zeros_like(v))
        for k, v in _vectors(model, "new").items()
    )
    assert len(state.settings) == 40 and len(state.projections) == 1


def test_resident_bytes_stay_close_to_the_vectors() -> None:
    model = _lm()
    for i in range(300):
        vt.add_vera(model, "all-linear", r=4, adapter_name=f"a{i}")
    report = vt.trainable_parameters(model)
    vectors = sum(report.by_adapter.values()) * 4
    resident = sum(
        p.numel() * p.element_size()
        for layer in vt.vera_layers(model).values()
        for bank in layer.banks()
        for p in bank.parameters_by_kind().values()
    )
    assert vectors <= resident <= 1.06 * vectors


def test_pager_serves_many_files_with_bounded_memory(tmp_path) -> None:
    """20 adapters on disk, at most 4 resident: every batch equals a model holding all 20."""
    full = _lm()
    names = [f"user{i}" for i in range(20)]
    for i, name in enumerate(names):
        vt.add_vera(full, "all-linear", r=4, adapter_name=name, dvora=i % 5 == 0)
    randomize_vectors(full)
    for name in names:
        vt.save_adapter(full, tmp_path / f"{name}.safetensors", name)
    pager = vt.AdapterPager(_lm(), tmp_path, capacity=4)
    generator = torch.Generator().manual_seed(0)
    for _ in range(12):
        batch = [names[int(i)] for i in torch.randint(0, 20, (3,), generator=generator)] + ["__base__"]
        ids = _ids(batch=len(batch))
        with pager.rows(batch):
            got = pager.model(ids)
        torch.testing.assert_close(got, full(ids, adapter_names=batch), rtol=1e-5, atol=1e-5)
        assert len(pager.resident()) <= 4 and pager.model.vera_state.slots.capacity == 4
    assert pager.evictions > 0 and pager.loads == pager.evictions + len(pager.resident())
    with pytest.raises(ValueError, match="does not fit capacity=4"):
        pager.ensure(names[:5])
    with pytest.raises(FileNotFoundError, match="no adapter 'nobody'"):
        pager.ensure(["nobody"])


def test_bank_adamw_starts_afresh_on_a_reused_row() -> None:
    """A deleted adapter's row, reused by a new one: the new adapter gets no inherited moments or steps."""
    model = vt.add_vera(_lm(), "all-linear", r=4, adapter_name="a")
    vt.add_vera(model, "all-linear", r=4, adapter_name="keep")
    vt.set_adapter(model, ["a", "keep"])
    opt = vt.BankAdamW([p for p in model.parameters() if p.requires_grad], lr=0.1, weight_decay=0.0)
    for _ in range(3):
        opt.zero_grad()
        model(_ids(), adapter_names=["a", "a", "keep", "keep"]).square().mean().backward()
        opt.step()
    vt.delete_adapter(model, "a")
    vt.add_vera(model, "all-linear", r=4, adapter_name="b")  # takes a's row
    vt.set_adapter(model, ["b", "keep"])
    twin = copy.deepcopy(model)  # the same model, with a fresh optimizer: what b must see
    fresh = vt.BankAdamW([p for p in twin.parameters() if p.requires_grad], lr=0.1, weight_decay=0.0)
    for m, o in ((model, opt), (twin, fresh)):
        o.zero_grad()
        m(_ids(), adapter_names=["b"] * 4).square().mean().backward()
        o.step()
    for key, value in _vectors(twin, "b").items():
        torch.testing.assert_close(_vectors(model, "b")[key], value, rtol=0, atol=0)
