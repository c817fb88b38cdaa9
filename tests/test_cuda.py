"""The backends on a GPU: skipped without CUDA (scripts/gpu_check.sh runs them where there is one).

The Triton kernels compiled for the device must give the CPU kernel's bits, choose themselves
under ``auto``, launch once per gradient and never synchronise with the host while masking.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from hf_dropgrad import DropGrad, kernels
from hf_dropgrad import functional as F
from tests import stream_oracle as oracle
from tests.helpers import tiny_mlp

if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)
pytest.importorskip("triton")


class NoStep(torch.optim.Optimizer):
    """An inner optimizer that does nothing, so a step runs DropGrad's own work only."""

    def __init__(self, params: list[torch.Tensor]) -> None:
        super().__init__(params, {})

    def step(self, closure: object = None) -> None:
        return None


def test_auto_takes_triton_for_cuda_gradients(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(kernels.ENV, raising=False)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert kernels.choose(torch.ones(3, dtype=dtype, device="cuda")).backend == "triton"
    assert kernels.choose(torch.ones(3, dtype=torch.float64, device="cuda")).backend == "torch"
    monkeypatch.setenv(kernels.ENV, "cpp")
    with pytest.raises(kernels.BackendUnavailableError, match="CPU tensors"):
        F.mask_([torch.ones(3, device="cuda")], [1], [6554], [1.1])


@pytest.mark.parametrize("dtype", oracle.DTYPES, ids=str)
def test_cuda_masks_equal_the_cpu_kernel_bit_for_bit(dtype: torch.dtype) -> None:
    for numel, offset in itertools.product((1, 4097, 1_000_003), (0, 5, 4095, 2**40 + 3)):
        base = oracle.grad(numel, dtype, seed=numel)
        for key, t in ((0, 6554), (2**64 - 1, 65535), (2**63, 1), (9, 65536)):
            cpu, gpu = base.clone(), base.cuda()
            F.mask_([cpu], [key], [t], [oracle.scale(t)], [offset])
            F.mask_([gpu], [key], [t], [oracle.scale(t)], [offset])
            oracle.assert_same(gpu, cpu, f"{numel} {offset} {key} {t}")
            if numel < 5000:
                want = oracle.expected(base, key, t, oracle.scale(t), offset)
                oracle.assert_matches(gpu, want, f"{numel} {offset} {key} {t}")


def _kernel_names(fn) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


def test_one_launch_per_path_for_all_gradients_and_no_host_synchronisation() -> None:
    # 1 element (4 bytes) takes the generic path, the others the aligned one: two launches
    grads = [torch.randn(n, device="cuda") for n in (1, 5000, 70000, 3_000_000)]
    args = ([1, 2, 3, 4], [6554] * 4, [F.keep_scale(6554)] * 4)
    F.mask_(grads, *args)  # compile
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        F.mask_(grads, *args)
        params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
        for p, g in zip(params, grads):
            p.grad = g
        optimizer = DropGrad(NoStep(params), drop_rate=0.2, seed=0)
        optimizer.step()
        optimizer.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    names = _kernel_names(lambda: F.mask_(grads, *args))
    assert sum("_mask_kernel" in name for name in names) == 2, names
    assert len([n for n in names if "memcpy" not in n.lower()]) == 2, names
    aligned = grads[1:]
    names = _kernel_names(lambda: F.mask_(aligned, *(a[1:] for a in args)))
    assert len([n for n in names if "memcpy" not in n.lower()]) == 1, names


def test_full_update_drop_batched_launches_the_same_whatever_the_tensor_count() -> None:
    import functools

    from hf_dropgrad.kernels import triton as K

    launched = {}
    for count in (1, 12):
        tensors = [torch.randn(5000 + 97 * i, device="cuda") for i in range(count)]
        args = (tensors, list(range(count)), [6554] * count, [0] * count)
        values, starts = K.gather_dropped_many(*args)  # compile
        K.scatter_dropped_many(*args, None, None, values, starts)
        torch.cuda.synchronize()
        names = _kernel_names(functools.partial(K.gather_dropped_many, *args))
        names += _kernel_names(
            functools.partial(K.scatter_dropped_many, *args, None, None, values, starts)
        )
        launched[count] = sorted(n for n in names if "memcpy" not in n.lower())
        torch.cuda.set_sync_debug_mode("error")  # scatter never reads back
        try:
            K.scatter_dropped_many(*args, None, None, values, starts)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        keep = [F.keep_mask_reference(t.numel(), i, 6554, "cuda") for i, t in enumerate(tensors)]
        assert torch.equal(values, torch.cat([t[~m] for t, m in zip(tensors, keep)]))
    assert launched[1] == launched[12], launched


def _train(device: str, full_update_drop: bool) -> list[torch.Tensor]:
    model = tiny_mlp().to(device)
    opt = DropGrad(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), drop_rate=0.3,
                   seed=3, full_update_drop=full_update_drop)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        x, y = torch.randn(12, 8, generator=gen), torch.randint(0, 3, (12,), generator=gen)
        torch.nn.functional.cross_entropy(model(x.to(device)), y.to(device)).backward()
        opt.step()
        opt.zero_grad()
    return [p.detach().cpu() for p in model.parameters()]


@pytest.mark.parametrize("full_update_drop", [False, True])
def test_cuda_training_with_triton_equals_the_reference_backend(
    full_update_drop: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    fused = _train("cuda", full_update_drop)
    monkeypatch.setenv(kernels.ENV, "torch")
    reference = _train("cuda", full_update_drop)
    for a, b in zip(fused, reference):
        assert torch.equal(a, b)


def test_full_update_drop_saves_only_the_dropped_values_on_cuda() -> None:
    x = torch.randn(3_000_017, device="cuda")
    t = F.drop_threshold(0.1)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    saved = F.save_dropped(x, 5, t, offset=77)
    extra = torch.cuda.max_memory_allocated() - base
    assert saved.backend == "triton"
    keep = F.keep_mask_reference(x.numel(), 5, t, "cuda", offset=77)
    assert torch.equal(saved._values, x[~keep])
    # the values (p x 4 bytes per element) plus one int64 per 4096 elements, nothing full-size
    assert extra <= 0.1 * 4 * x.numel() * 1.05 + 8 * (x.numel() // 4096 + 2) + 2**20
    y = torch.zeros_like(x)
    F.DroppedValues(y, 5, t, saved._values, saved._starts, offset=77, backend="triton").restore()
    assert torch.equal(y[~keep], x[~keep]) and not y[keep].any()


def test_column_shards_on_cuda_equal_the_cpu_kernel_bit_for_bit() -> None:
    """Runs (a tensor-parallel column shard) compiled: the aligned and generic paths."""
    for rows, cols, first, width, dtype in ((64, 4096, 2048, 2048, torch.float32),
                                            (33, 1000, 3, 500, torch.bfloat16),
                                            (50, 768, 384, 384, torch.float16)):
        shard = oracle.grad(rows * width, dtype, seed=rows).view(rows, width)
        cpu, gpu = shard.clone(), shard.cuda()
        for g in (cpu, gpu):
            F.mask_([g], [7], [6554], [oracle.scale(6554)], [first], [width], [cols])
        oracle.assert_same(gpu, cpu, f"{rows}x{cols}[:, {first}:+{width}] {dtype}")
        values, starts = F.save_dropped_many([shard.cuda()], [7], [6554], [first],
                                             runs=[width], strides=[cols])._groups[0][-2:]
        cpu_values, cpu_starts = F.save_dropped_many([shard], [7], [6554], [first],
                                                     runs=[width], strides=[cols])._groups[0][-2:]
        assert torch.equal(starts.cpu(), cpu_starts)
        assert torch.equal(oracle.raw(values.cpu()), oracle.raw(cpu_values))
