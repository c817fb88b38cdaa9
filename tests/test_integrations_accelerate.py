"""hf_dropgrad/integrations/accelerate.py: the setups refused up front, and the fp16 step.

Launcher-driven checks (two processes, Accelerate configs) are in ``test_distributed.py``.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from hf_dropgrad import DropGrad
from hf_dropgrad.integrations.accelerate import CHECKED_AGAINST, check_supported_setup, rebind_step


def test_a_plain_run_is_accepted() -> None:
    check_supported_setup(None)
    check_supported_setup(SimpleNamespace(fsdp=None, deepspeed=None))


def test_fsdp1_is_refused_from_the_arguments_or_the_launcher() -> None:
    with pytest.raises(ValueError, match="does not support FSDP1"):
        check_supported_setup(SimpleNamespace(fsdp=True, fsdp_config={"version": 1}))
    state = SimpleNamespace(distributed_type="DistributedType.FSDP",
                            fsdp_plugin=SimpleNamespace(fsdp_version=1))
    with pytest.raises(ValueError, match="does not support FSDP1"):
        check_supported_setup(None, SimpleNamespace(state=state))
    check_supported_setup(SimpleNamespace(fsdp=True, fsdp_config={"version": 2}))


def test_deepspeed_half_precision_without_zero_is_refused(tmp_path) -> None:
    config = {"zero_optimization": {"stage": 0}, "bf16": {"enabled": True}}
    with pytest.raises(ValueError, match="without ZeRO"):
        check_supported_setup(SimpleNamespace(deepspeed=config, fsdp=None))
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="without ZeRO"):
        check_supported_setup(SimpleNamespace(deepspeed=str(path), fsdp=None))
    config["zero_optimization"]["stage"] = 2
    check_supported_setup(SimpleNamespace(deepspeed=config, fsdp=None))


def test_rebind_step_leaves_other_wrappers_alone() -> None:
    wrapper = SimpleNamespace(optimizer=None)
    rebind_step(wrapper, object())
    assert vars(wrapper) == {"optimizer": None}


def test_rebind_step_makes_accelerates_fp16_step_call_dropgrad() -> None:
    pytest.importorskip("accelerate")
    model = torch.nn.Linear(3, 2)
    dropgrad = DropGrad(torch.optim.SGD(model.parameters(), lr=0.1), drop_rate=0.5)
    calls = []
    dropgrad.register_step_pre_hook(lambda *_: calls.append("dropgrad"))
    wrapper = SimpleNamespace(
        optimizer=dropgrad, _optimizer_patched_step_method=None,
        _optimizer_original_step_method=None, _accelerate_step_called=False,
    )
    rebind_step(wrapper, dropgrad)
    assert wrapper._optimizer_original_step_method == dropgrad.step
    model(torch.ones(1, 3)).sum().backward()
    wrapper._optimizer_patched_step_method()
    assert calls == ["dropgrad"] and wrapper._accelerate_step_called
    assert CHECKED_AGAINST.startswith("accelerate ")
