"""hf_dropgrad/integrations/deepspeed.py: ZeRO partitions -> (parameter, element offset).

ZeRO's partition layouts are imitated with plain objects carrying the attributes DeepSpeed
0.19.8 sets (``bit16_groups`` + ``single_partition_of_fp32_groups`` + ``_hp_mapping`` for
ZeRO-1/2; ``fp16_groups`` + ``fp32_partitioned_groups_flat`` + per-parameter partitions for
ZeRO-3), for 2 ranks; the masks each rank's ``DropGrad`` applies to its partition must be,
range by range, the same elements of the full-parameter masks a 1-process ``DropGrad`` applies.
The multi-process tests (``test_fsdp2.py``, ``test_deepspeed.py``) check the real engines.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from hf_dropgrad import DropGrad
from hf_dropgrad.integrations.deepspeed import (
    attach_deepspeed,
    install_under_deepspeed,
    zero_optimizer,
    zero_stage,
)
from hf_dropgrad.layout import FlatLayout

SHAPES = [(7, 5), (13,), (4, 4, 3), (1,), (9, 2)]
RATES = {0: 0.3, 1: 0.5, 2: 0.1, 3: 0.9, 4: 0.25}


def parameters() -> list[torch.nn.Parameter]:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape)) for shape in SHAPES]
    for p in params:
        p.grad = torch.randn(p.shape)
    return params


def full_masked_grads(full_update_drop: bool = False) -> list[torch.Tensor]:
    """What one process with the full parameters does (SGD, lr 1: the update is -grad)."""
    params = parameters()
    rates = {params[i]: r for i, r in RATES.items()}
    opt = DropGrad(torch.optim.SGD(params, lr=1.0), params=rates, seed=3,
                   full_update_drop=full_update_drop)
    opt.set_step(5)
    opt.step()
    return [p.grad.clone() for p in params]


def flat_partitions(world: int) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """The fp32 flat buffer of all parameters (grads), cut into ``world`` equal partitions."""
    params = parameters()
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    size = -(-flat.numel() // world)
    return flat, [(r * size, min((r + 1) * size, flat.numel())) for r in range(world)]


def fake_zero12(rank: int, world: int) -> tuple[SimpleNamespace, DropGrad]:
    params = parameters()
    flat, bounds = flat_partitions(world)
    lo, hi = bounds[rank]
    part = torch.zeros(hi - lo)
    part.grad = flat[lo:hi].clone()
    start = 0
    for p in params:  # DeepSpeed's _hp_mapping: the part of p inside [lo, hi)
        a, b = max(start, lo), min(start + p.numel(), hi)
        p._hp_mapping = None if a >= b else SimpleNamespace(
            lp_fragment_address=SimpleNamespace(start=a - start, numel=b - a),
            hp_fragment_address=SimpleNamespace(start=a - lo, numel=b - a),
        )
        start += p.numel()
    rates = {params[i]: r for i, r in RATES.items()}
    dropgrad = DropGrad(torch.optim.SGD(params, lr=1.0), params=rates, seed=3)
    dropgrad.optimizer.param_groups[0]["params"] = [part]  # what ZeRO does
    zero = SimpleNamespace(
        bit16_groups=[params], single_partition_of_fp32_groups=[part], optimizer=dropgrad,
        partition_gradients=True, step=lambda: None,
    )
    return zero, dropgrad


@pytest.mark.parametrize("world", [2, 3])
def test_zero12_partitions_are_masked_as_slices_of_the_full_masks(world: int) -> None:
    want = torch.cat([g.reshape(-1) for g in full_masked_grads()])
    _, bounds = flat_partitions(world)
    straddling = 0
    for rank in range(world):
        zero, dropgrad = fake_zero12(rank, world)
        assert zero_optimizer(SimpleNamespace(optimizer=zero)) is zero
        install_under_deepspeed(zero, dropgrad, build=lambda o: None)
        segments = dropgrad.layout.segments[id(zero.single_partition_of_fp32_groups[0])]
        straddling += sum(1 for run in segments if run.offset > 0)
        dropgrad.set_step(5)
        dropgrad.step()
        lo, hi = bounds[rank]
        assert torch.equal(zero.single_partition_of_fp32_groups[0].grad, want[lo:hi]), rank
    assert straddling > 0  # some parameter really was split between ranks


def test_zero12_negative_control_offsets_matter() -> None:
    want = torch.cat([g.reshape(-1) for g in full_masked_grads()])
    _, bounds = flat_partitions(2)
    zero, dropgrad = fake_zero12(1, 2)
    for p in zero.bit16_groups[0]:
        if p._hp_mapping is not None:
            p._hp_mapping.lp_fragment_address.start = 0  # the bug: shards masked from 0
    install_under_deepspeed(zero, dropgrad, build=lambda o: None)
    dropgrad.set_step(5)
    dropgrad.step()
    lo, hi = bounds[1]
    assert not torch.equal(zero.single_partition_of_fp32_groups[0].grad, want[lo:hi])


def test_zero3_per_parameter_partitions_are_masked_at_their_offsets() -> None:
    world = 2
    want = full_masked_grads()
    results = []
    for rank in range(world):
        params = parameters()
        pieces, sizes = [], []
        for p in params:
            size = -(-p.numel() // world)
            padded = torch.zeros(size * world)
            padded[: p.numel()] = p.grad.reshape(-1)
            pieces.append(padded[rank * size : (rank + 1) * size])
            sizes.append(size)
            p.ds_numel, p.ds_zero_partition_rank = p.numel(), rank
            p.partition_numel = lambda size=size: size
        flat = torch.zeros(sum(sizes))
        flat.grad = torch.cat(pieces)
        rates = {params[i]: r for i, r in RATES.items()}
        dropgrad = DropGrad(torch.optim.SGD(params, lr=1.0), params=rates, seed=3)
        dropgrad.optimizer.param_groups[0]["params"] = [flat]
        zero = SimpleNamespace(
            fp16_groups=[params], fp32_partitioned_groups_flat=[flat], sub_group_to_group_id={0: 0},
            optimizer=dropgrad, step=lambda: None,
        )
        install_under_deepspeed(zero, dropgrad, build=lambda o: None)
        dropgrad.set_step(5)
        dropgrad.step()
        results.append((flat.grad, sizes))
    for i, size in enumerate(SHAPES):
        numel = torch.Size(size).numel()
        parts = []
        for grad, sizes in results:
            start = sum(sizes[:i])
            parts.append(grad[start : start + sizes[i]])
        assert torch.equal(torch.cat(parts)[:numel], want[i].reshape(-1)), i


def test_wrapping_an_optimizer_zero_built_keeps_positions_names_and_patterns() -> None:
    """The optimizer-block / callback path: DropGrad is built after ZeRO flattened the groups,
    with the model's parameters put back while it reads them."""
    want = torch.cat([g.reshape(-1) for g in full_masked_grads()])
    _, bounds = flat_partitions(2)
    zero, dropgrad = fake_zero12(0, 2)
    inner = dropgrad.optimizer
    zero.optimizer = inner  # DeepSpeed's own optimizer, no DropGrad yet
    params = zero.bit16_groups[0]
    rates = {params[i]: r for i, r in RATES.items()}
    built = install_under_deepspeed(
        zero, None, build=lambda o: DropGrad(o, params=rates, seed=3)
    )
    assert zero.optimizer is built and built.optimizer is inner
    assert inner.param_groups[0]["params"] == [zero.single_partition_of_fp32_groups[0]]
    built.set_step(5)
    built.step()
    lo, hi = bounds[0]
    assert torch.equal(zero.single_partition_of_fp32_groups[0].grad, want[lo:hi])


def test_tensors_dropgrad_was_not_built_over_are_refused() -> None:
    params = parameters()
    dropgrad = DropGrad(torch.optim.SGD(params, lr=1.0), drop_rate=0.5)
    flat = torch.zeros(10)
    flat.grad = torch.ones(10)
    dropgrad.optimizer.param_groups[0]["params"] = [flat]  # ZeRO without attach_deepspeed
    with pytest.raises(RuntimeError, match="attach_deepspeed"):
        dropgrad.step()
    assert torch.equal(flat.grad, torch.ones(10))


def test_rates_survive_the_parameters_being_replaced_in_place() -> None:
    """Accelerate's FSDP2 preparation swaps new tensors into param_groups: rates, names and
    patterns are keyed by position, not by the old tensors."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    opt = DropGrad(torch.optim.SGD(model.parameters(), lr=0.1), params={"1": 0.5}, model=model)
    before = opt.current_rates()
    group = opt.param_groups[0]
    group["params"] = [torch.nn.Parameter(p.detach().clone()) for p in group["params"]]
    assert opt.current_rates() == before == {"1.weight": 0.5, "1.bias": 0.5}
    assert opt.rate_groups() == {"1": 0.5}


def test_zero_stage_reads_the_attributes_of_each_stage() -> None:
    assert zero_stage(object()) == 0
    assert zero_stage(SimpleNamespace(bit16_groups=[], single_partition_of_fp32_groups=[])) == 1
    assert zero_stage(SimpleNamespace(
        bit16_groups=[], single_partition_of_fp32_groups=[], partition_gradients=True
    )) == 2
    assert zero_stage(SimpleNamespace(fp16_groups=[], fp32_partitioned_groups_flat=[])) == 3


def test_attach_deepspeed_needs_zero_and_a_dropgrad() -> None:
    opt = DropGrad(torch.optim.SGD(parameters(), lr=1.0), drop_rate=0.1)
    with pytest.raises(ValueError, match="attach_deepspeed needs a DeepSpeed ZeRO"):
        attach_deepspeed(opt)
    zero, dropgrad = fake_zero12(0, 2)
    assert attach_deepspeed(SimpleNamespace(optimizer=zero)) is dropgrad
    assert isinstance(dropgrad.layout, FlatLayout)


def test_zero_step_advances_dropgrad_once_per_step_and_not_on_overflow() -> None:
    zero, dropgrad = fake_zero12(0, 2)
    install_under_deepspeed(zero, dropgrad, build=lambda o: None)
    install_under_deepspeed(zero, dropgrad, build=lambda o: None)  # twice: one wrapper
    dropgrad.step()
    dropgrad.step()  # ZeRO steps the client once per group: no advance
    assert dropgrad.step_count == 0
    zero.step()
    assert dropgrad.step_count == 1
    zero.overflow = True
    zero.step()
    assert dropgrad.step_count == 1


def test_the_engines_module_is_a_deprecated_shim() -> None:
    import hf_dropgrad.engines as engines
    from hf_dropgrad.integrations import accelerate

    with pytest.warns(FutureWarning, match="integrations.deepspeed.attach_deepspeed"):
        assert engines.attach_deepspeed is attach_deepspeed
    with pytest.warns(FutureWarning, match="integrations.accelerate.check_supported_setup"):
        assert engines.check_supported_setup is accelerate.check_supported_setup
    with pytest.raises(AttributeError):
        engines.nope  # noqa: B018
