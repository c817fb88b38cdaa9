"""hf_dropgrad/integrations/fsdp.py in one process: which shards are exact, and the refusals.

The multi-process runs (``test_fsdp2.py``, ``test_distributed.py``) check real FSDP2 shards.
"""

from __future__ import annotations

import pytest
import torch
from torch.distributed.tensor.placement_types import Partial, Replicate, Shard

from hf_dropgrad import DropGrad
from hf_dropgrad.integrations import fsdp
from hf_dropgrad.integrations.fsdp import check_parameters
from hf_dropgrad.layout import local_target


class DTensor(torch.Tensor):
    """Stands in for torch's DTensor where only the placements matter (recognised by name)."""

    placements: tuple = ()


def _dtensor(*placements) -> torch.Tensor:
    t = torch.zeros(4, 3).as_subclass(DTensor)
    t.placements = placements
    return t


def test_fsdp1_flat_parameters_are_refused() -> None:
    flat = torch.nn.Parameter(torch.zeros(4))
    flat._is_flat_param = True
    with pytest.raises(ValueError, match="FSDP1 flat parameters"):
        fsdp.check_param(flat)
    opt = DropGrad(torch.optim.SGD([flat], lr=0.1), drop_rate=0.1)
    with pytest.raises(ValueError, match="FSDP1"):
        check_parameters(opt)


def test_flat_parameters_are_refused_when_the_core_meets_them() -> None:
    flat = torch.nn.Parameter(torch.zeros(4))
    flat._is_flat_param = True
    with pytest.raises(ValueError, match="FSDP1"):
        local_target(flat)  # the core hands sharded parameters to this module


@pytest.mark.parametrize("placements", [(Shard(0),), (Replicate(), Shard(0)), (Replicate(),)])
def test_row_shards_and_replicas_are_accepted(placements) -> None:
    fsdp.check_param(_dtensor(*placements), "w")


@pytest.mark.parametrize("placements", [(Shard(1),), (Partial(),), (Shard(0), Shard(1))])
def test_other_placements_are_refused_naming_the_parameter(placements) -> None:
    with pytest.raises(ValueError, match="parameter 'w' placed"):
        fsdp.check_param(_dtensor(*placements), "w")


def test_check_parameters_names_the_parameter_and_skips_flat_layouts() -> None:
    model = torch.nn.Linear(3, 4)
    opt = DropGrad(torch.optim.SGD(model.parameters(), lr=0.1), drop_rate=0.1, model=model)
    check_parameters(opt)  # plain tensors: nothing to refuse
    opt.param_groups[0]["params"][0] = _dtensor(Shard(1))
    with pytest.raises(ValueError, match="parameter 'weight' placed"):
        check_parameters(opt)


def test_the_private_torch_helper_is_where_this_module_says() -> None:
    # dtensor_offset reads torch.distributed.tensor._utils (fsdp.CHECKED_AGAINST): a torch
    # that moves it fails here, not in a sharded run.
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    assert callable(compute_local_shape_and_global_offset)
    assert fsdp.CHECKED_AGAINST.startswith("torch ")
