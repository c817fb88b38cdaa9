"""hf_dropgrad/integrations/dtensor.py in one process: which full-tensor elements a DTensor's
local tensor holds, for every layout, against torch's own splitting of the full tensor.

The multi-process runs (tests/test_tensor_parallel.py, test_fsdp2.py) check real shards.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch.distributed.tensor.placement_types import Partial, Placement, Replicate, Shard

from hf_dropgrad import DropGrad
from hf_dropgrad.integrations import dtensor, fsdp

StridedShard = pytest.importorskip("torch.distributed.tensor.placement_types")._StridedShard


def _torch_local(shape, mesh_shape, coordinate, placements) -> torch.Tensor:
    """The full-tensor indices the coordinate holds, split by torch's placements themselves on
    the full index tensor (left to right over the mesh dimensions, as distribute_tensor)."""
    local = torch.arange(math.prod(shape)).view(shape)
    for mesh_dim, placement in enumerate(placements):
        if isinstance(placement, Shard | StridedShard):
            parts, _ = placement._split_tensor(local, mesh_shape[mesh_dim], with_padding=False)
            k = coordinate[mesh_dim]
            local = parts[k] if k < len(parts) else local.narrow(placement.dim, 0, 0)
    return local.contiguous()


def _indices_of(boxes) -> list[int]:
    """The full-tensor index of every local element, from the boxes alone."""
    out = []
    for box in boxes:
        offset, run, stride = box.place
        out += [offset + (j // run) * stride + j % run for j in range(box.tensor.numel())]
    return out


class FakeMesh:
    def __init__(self, shape: tuple[int, ...], coordinate: tuple[int, ...] | None) -> None:
        self.shape, self._coordinate = shape, coordinate

    def get_coordinate(self):
        return None if self._coordinate is None else list(self._coordinate)


LAYOUTS = [
    # (tensor shape, mesh shape, placements)
    ((21, 12), (2,), (Shard(0),)),  # colwise, uneven
    ((10, 21), (2,), (Shard(1),)),  # rowwise, uneven
    ((10, 21), (3,), (Shard(-1),)),
    ((8, 8), (2, 2), (StridedShard(0, split_factor=2), Shard(0))),  # FSDP2 over colwise TP
    ((22, 7), (2, 2), (StridedShard(0, split_factor=2), Shard(0))),
    ((8, 8), (2, 2), (Shard(0), Shard(1))),  # FSDP2 over rowwise TP
    ((9, 10), (2, 2), (Shard(0), Shard(1))),
    ((6, 5, 8), (2, 2), (Shard(0), Shard(2))),  # experts x columns
    ((6, 6, 8), (2, 2, 2), (Shard(0), Shard(1), Shard(2))),  # a 3-level box
    ((8, 8), (1, 2, 2), (Replicate(), StridedShard(0, split_factor=2), Shard(0))),  # HSDP x TP
    ((12,), (2, 2), (Partial(), Shard(0))),
    ((16, 4), (2,), (StridedShard(0, split_factor=4),)),  # a strided shard that is not a block
    ((3, 4), (4,), (Shard(0),)),  # more ranks than rows: the last holds nothing
]


@pytest.mark.parametrize(("shape", "mesh_shape", "placements"), LAYOUTS, ids=str)
def test_every_local_element_gets_its_full_tensor_index(shape, mesh_shape, placements) -> None:
    held = []
    for coordinate in itertools.product(*(range(n) for n in mesh_shape)):
        want = _torch_local(shape, mesh_shape, coordinate, placements)
        local = torch.empty(want.shape)
        mesh = FakeMesh(mesh_shape, coordinate)
        boxes = dtensor.boxes_of(local, shape, mesh, placements, "w")
        assert _indices_of(boxes) == want.view(-1).tolist(), coordinate
        # the boxes are consecutive local ranges of the local tensor, in order
        assert sum(b.tensor.numel() for b in boxes) == local.numel()
        if any(isinstance(p, Replicate | Partial) for p in placements):
            continue
        held += want.view(-1).tolist()
    if not any(isinstance(p, Replicate | Partial) for p in placements):
        assert sorted(held) == list(range(math.prod(shape)))  # a partition of the full tensor


def test_the_usual_layouts_are_one_box() -> None:
    cases = {
        (Shard(0),): (3 * 12, None, 0),  # rank 1 of 2 over 21 rows: rows 11..20, one run
        (Shard(1),): (11, 10, 21),  # columns 11..20 of every row
    }
    for placements, (offset, run, stride) in cases.items():
        shape = (21, 12) if placements == (Shard(0),) else (10, 21)
        local = torch.empty(_torch_local(shape, (2,), (1,), placements).shape)
        (box,) = dtensor.boxes_of(local, shape, FakeMesh((2,), (1,)), placements, "w")
        assert box.tensor is local
        if run is None:
            assert box.run is None and box.offset == 11 * 12
        else:
            assert (box.offset, box.run, box.stride) == (offset, run, stride)
    # FSDP2 over TP on (2, 2), torch's own example: coordinate (0, 1) holds rows 4-5 of 8
    placements = (StridedShard(0, split_factor=2), Shard(0))
    (box,) = dtensor.boxes_of(torch.empty(2, 8), (8, 8), FakeMesh((2, 2), (0, 1)), placements,
                              "w")
    assert box.run is None and box.offset == 4 * 8


def test_a_rank_outside_the_mesh_holds_nothing() -> None:
    assert dtensor.boxes_of(torch.empty(0), (4, 4), FakeMesh((2,), None), (Shard(0),), "w") == ()


def test_a_local_tensor_of_another_shape_is_refused_naming_it() -> None:
    with pytest.raises(ValueError, match="local tensor of parameter 'w' has shape"):
        dtensor.boxes_of(torch.empty(5, 12), (21, 12), FakeMesh((2,), (1,)), (Shard(0),),
                         "parameter 'w'")


class Unknown(Placement):
    """A placement of someone else's making."""


class DTensor(torch.Tensor):
    """Stands in for torch's DTensor (recognised by name): a local tensor, a mesh, placements."""


def _fake(placements, shape=(4, 6), coordinate=(0,)) -> torch.nn.Parameter:
    p = torch.nn.Parameter(torch.zeros(shape).as_subclass(DTensor))
    p.placements = placements
    p.device_mesh = FakeMesh((2,), coordinate)
    p._local_tensor = torch.zeros(2, shape[1])
    return p


def test_an_unknown_placement_is_refused_only_with_a_rate_and_names_the_parameter() -> None:
    model = torch.nn.Linear(6, 4)
    opt = DropGrad(torch.optim.SGD(model.parameters(), lr=0.1), params={"bias": 0.1},
                   model=model)
    opt.param_groups[0]["params"][0] = _fake((Unknown(),))  # the weight: no rate
    fsdp.check_parameters(opt)  # never masked, never refused
    assert not opt.may_mask(0) and opt.may_mask(1)
    rated = DropGrad(torch.optim.SGD(model.parameters(), lr=0.1), drop_rate=0.1, model=model)
    rated.param_groups[0]["params"][0] = _fake((Unknown(),))
    with pytest.raises(ValueError, match="parameter 'weight': it is placed"):
        fsdp.check_parameters(rated)


def test_fsdp1_flat_parameters_are_refused_when_they_have_a_rate() -> None:
    flat = torch.nn.Parameter(torch.zeros(4))
    flat._is_flat_param = True
    with pytest.raises(ValueError, match="FSDP1 flat parameters"):
        fsdp.check_param(flat)
    opt = DropGrad(torch.optim.SGD([flat], lr=0.1), drop_rate=0.1)
    with pytest.raises(ValueError, match="FSDP1"):
        fsdp.check_parameters(opt)
    other = torch.nn.Parameter(torch.zeros(3))
    quiet = DropGrad(torch.optim.SGD([flat, other], lr=0.1), params={other: 0.5})
    fsdp.check_parameters(quiet)  # the flat one has no rate
    other.grad = torch.ones(3)
    quiet.step()


def test_the_private_torch_names_are_where_this_module_says() -> None:
    # dtensor.py reads these (dtensor.CHECKED_AGAINST): a torch that moves them fails here,
    # not in a sharded run.
    assert callable(Shard._split_tensor) and callable(StridedShard._split_tensor)
    assert StridedShard(0, split_factor=2).split_factor == 2
    assert dtensor.CHECKED_AGAINST.startswith("torch ")
