"""What only the C++ backend has (hf_dropgrad/kernels/cpp.py, csrc/mask_cpu.cpp): its build, its
code paths (portable, AVX2, AVX-512) and threads, which must all give the same bits, the packing
regions of ``mask_gather_dropped_``, its own argument checks, and its registration as the CPU
implementation of the ``hf_dropgrad::`` ops. Its agreement with the stream's definition, like
every backend's, is in test_backends.py.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from hf_dropgrad import kernels
from hf_dropgrad.kernels import cpp
from hf_dropgrad.kernels import ops as K
from tests import stream_oracle as oracle
from tests.stream_oracle import DTYPES

if cpp.load() is None:
    pytest.skip("the C++ kernel cannot be built here", allow_module_level=True)

_expected, _scale, _grad = oracle.expected, oracle.scale, oracle.grad
_assert_matches, _raw, _filled = oracle.assert_matches, oracle.raw, oracle.filled


def _keep(numel: int, key: int, t: int, offset: int = 0) -> torch.Tensor:
    out = torch.empty(numel, dtype=torch.bool)
    K.keep_mask_(out, key, t, offset)
    return out


def _every_path_and_thread_count():
    """Run the body once per code path and thread count; restore both afterwards."""
    threads = torch.get_num_threads()
    paths = cpp._isas()
    try:
        for path in paths:
            cpp._set_isa(path)
            for n_threads in sorted({1, 2, threads}):
                torch.set_num_threads(n_threads)
                yield path, n_threads
    finally:
        torch.set_num_threads(threads)
        cpp._set_isa(paths[0])


# ----------------------------------------------------------------------------- build and paths
def test_a_list_equals_one_call_per_tensor_on_every_path_and_thread_count() -> None:
    specs = [(1, torch.float32), (70000, torch.bfloat16), (4097, torch.float16), (0, torch.float32)]
    specs += [(33 * 4096 + 11, torch.float32), (5, torch.bfloat16), (200000, torch.float32)]
    keys = [2**64 - 1 - 977 * i for i in range(len(specs))]
    thresholds = [6554, 32768, 100, 1, 65535, 65536, 6554]
    scales = [_scale(t) for t in thresholds]
    grads = [_grad(n, dt, seed=i) for i, (n, dt) in enumerate(specs)]
    singles = [g.clone() for g in grads]
    for g, k, t, s in zip(singles, keys, thresholds, scales, strict=True):
        K.mask_([g], [k], [t], [s])
    for where in _every_path_and_thread_count():
        batch = [g.clone() for g in grads]
        K.mask_(batch, keys, thresholds, scales)
        for a, b in zip(batch, singles, strict=True):
            oracle.assert_same(a, b, str(where))


def test_every_code_path_gives_the_same_bits() -> None:
    paths = cpp._isas()
    if len(paths) < 2:
        pytest.skip("only the portable path runs on this CPU")
    grads = [_grad(n, dt, seed=n) for n in (4097, 100003) for dt in DTYPES]
    shards = [_grad(8 * 2048, dt, seed=1).view(8, 2048) for dt in DTYPES]  # column shards
    args = ([2**63 + 1] * len(grads), [6554] * len(grads), [_scale(6554)] * len(grads))
    results = {}
    try:
        for path in paths:
            assert cpp._set_isa(path) == path and cpp.isa() == path
            masked = [g.clone() for g in grads]
            K.mask_(masked, *args)
            columns = [s.clone() for s in shards]
            K.mask_(columns, [9] * 3, [6554] * 3, [_scale(6554)] * 3, [2048] * 3, [2048] * 3,
                    [4096] * 3)
            results[path] = (masked + columns, _keep(100003, 5, 6554))
    finally:
        cpp._set_isa(paths[0])
    best, keep_best = results[paths[0]]
    for path in paths[1:]:
        other, keep_other = results[path]
        assert torch.equal(keep_best, keep_other), path
        for a, b in zip(best, other, strict=True):  # bit for bit, NaNs included
            assert torch.equal(_raw(a), _raw(b)), (path, a.dtype)


def test_set_isa_refuses_an_unknown_path_and_falls_back_to_the_best() -> None:
    with pytest.raises(ValueError, match="isa must be one of portable, avx2, avx512"):
        cpp._set_isa("sse")
    best = cpp._isas()[0]
    try:
        assert cpp._set_isa("portable") == "portable"
        assert cpp._set_isa("avx512") == best  # the best this CPU runs, if not AVX-512
    finally:
        cpp._set_isa(best)


def test_the_environment_variable_disables_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_DROPGRAD_DISABLE_EXTENSION", "1")
    assert cpp.load() is None and cpp.isa() is None
    assert cpp.unavailable_reason() == "HF_DROPGRAD_DISABLE_EXTENSION=1"
    assert kernels.choose(torch.ones(3)).backend == "torch"  # auto: the reference
    monkeypatch.setenv(kernels.ENV, "cpp")
    with pytest.raises(kernels.BackendUnavailableError, match="HF_DROPGRAD_DISABLE_EXTENSION"):
        kernels.choose(torch.ones(3))
    monkeypatch.delenv("HF_DROPGRAD_DISABLE_EXTENSION")
    assert cpp.load() is not None


def test_a_failed_build_warns_once_and_is_remembered(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> None:
        raise RuntimeError("no C++ compiler found (looked for 'c++'; set CXX)")

    monkeypatch.setattr(cpp, "_lib", None)
    monkeypatch.setattr(cpp, "_error", None)
    monkeypatch.setattr(cpp, "_build", broken)
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler"):
        assert cpp.load() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cpp.load() is None


# ------------------------------------------------------- full update drop: threads and paths
def test_gather_and_scatter_agree_across_threads_and_code_paths() -> None:
    x = _filled(70 * 4096 + 3, torch.float32, seed=3)
    shard = _filled(64 * 2048, torch.bfloat16, seed=4)  # a column shard: runs of 2048
    reference, starts = K.gather_dropped_many([x], [11], [19661], [0])
    ref_runs, starts_runs = K.gather_dropped_many([shard], [12], [19661], [2048], [2048], [4096])
    for where in _every_path_and_thread_count():
        values, st = K.gather_dropped_many([x], [11], [19661], [0])
        assert torch.equal(_raw(values), _raw(reference)) and torch.equal(st, starts), where
        y = torch.zeros_like(x)
        K.scatter_dropped_many([y], [11], [19661], [0], None, None, values, st)
        keep = _keep(x.numel(), 11, 19661)
        assert torch.equal(_raw(y)[~keep], _raw(x)[~keep]) and not _raw(y)[keep].any(), where
        values, st = K.gather_dropped_many([shard], [12], [19661], [2048], [2048], [4096])
        assert torch.equal(_raw(values), _raw(ref_runs)) and torch.equal(st, starts_runs), where


def test_many_equals_one_call_per_tensor_across_threads_and_code_paths() -> None:
    tensors = [_filled(n, torch.bfloat16, seed=n) for n in (70 * 4096 + 3, 5, 200001, 4096)]
    keys, thresholds, offsets = [11, 12, 13, 14], [19661, 6554, 1, 65535], [0, 4093, 77, 8192]
    singles = [K.gather_dropped_many([x], [k], [t], [o])
               for x, k, t, o in zip(tensors, keys, thresholds, offsets)]
    want_values = torch.cat([v for v, _ in singles])
    for where in _every_path_and_thread_count():
        values, starts = K.gather_dropped_many(tensors, keys, thresholds, offsets)
        assert torch.equal(_raw(values), _raw(want_values)), where
        assert starts.numel() == sum(s.numel() - 1 for _, s in singles) + 1
        ys = [torch.zeros_like(x) for x in tensors]
        K.scatter_dropped_many(ys, keys, thresholds, offsets, None, None, values, starts)
        for x, y, k, t, o in zip(tensors, ys, keys, thresholds, offsets):
            keep = _keep(x.numel(), k, t, o)
            assert torch.equal(_raw(y)[~keep], _raw(x)[~keep])
            assert not _raw(y)[keep].any()


class _FullUpdateDropCase:
    """bf16 gradients of four sizes at awkward offsets (one a column shard in runs), their
    parameters (``param_dtype``), and what masking them and packing the parameters must give."""

    def __init__(self, param_dtype: torch.dtype) -> None:
        self.grads = [_grad(n, torch.bfloat16, seed=n)
                      for n in (70 * 4096 + 3, 5, 200001, 4096, 64 * 1000)]
        self.params = [_filled(g.numel(), param_dtype, seed=i) for i, g in enumerate(self.grads)]
        self.keys, self.thresholds = [11, 12, 13, 14, 15], [19661, 6554, 1, 65535, 26214]
        self.offsets = [0, 4093, 77, 8192, 3]
        n = [g.numel() for g in self.grads]
        self.runs, self.strides = [*n[:4], 1000], [*n[:4], 3000]
        self.scales = [_scale(t) for t in self.thresholds]
        self.want_grads = [g.clone() for g in self.grads]
        K.mask_(self.want_grads, self.keys, self.thresholds, self.scales, self.offsets,
                self.runs, self.strides)
        self.want_values, self.want_starts = K.gather_dropped_many(
            self.params, self.keys, self.thresholds, self.offsets, self.runs, self.strides
        )

    @property
    def places(self) -> tuple[list[int], list[int], list[int]]:
        return self.offsets, self.runs, self.strides


def test_mask_counted_and_gather_at_agree_across_threads_and_code_paths() -> None:
    case = _FullUpdateDropCase(torch.float32)
    for where in _every_path_and_thread_count():
        got = [g.clone() for g in case.grads]
        starts = torch.empty_like(case.want_starts)
        K.mask_counted_(got, case.keys, case.thresholds, case.scales, *case.places, starts)
        assert torch.equal(starts, case.want_starts), where
        assert all(torch.equal(_raw(a), _raw(b)) for a, b in zip(got, case.want_grads))
        values = K.gather_dropped_at(case.params, case.keys, case.thresholds, *case.places,
                                     starts)
        assert torch.equal(_raw(values), _raw(case.want_values)), where


def test_mask_gather_dropped_agrees_across_threads_code_paths_and_region_margins() -> None:
    case = _FullUpdateDropCase(torch.bfloat16)
    # (factor, slack) of each thread's region: the default, then regions too small, so that the
    # values go on in the overflow buffer part of the way (0.5) or from the first chunk (0)
    margins = [(1.02, 4096), (0.5, 0), (0.0, 0), (1.0, 1)]
    try:
        for factor, slack in margins:
            torch.ops.hf_dropgrad._cpu_pack_margin(factor, slack)
            for where in _every_path_and_thread_count():
                got = [g.clone() for g in case.grads]
                values, starts = K.mask_gather_dropped_(
                    got, case.params, case.keys, case.thresholds, case.scales, *case.places
                )
                where = (*where, factor)
                assert torch.equal(starts, case.want_starts), where
                assert torch.equal(_raw(values), _raw(case.want_values)), where
                assert all(torch.equal(_raw(a), _raw(b))
                           for a, b in zip(got, case.want_grads)), where
    finally:
        torch.ops.hf_dropgrad._cpu_pack_margin(1.02, 4096)


# ----------------------------------------------------------------------------- its own checks
def test_the_kernel_checks_its_own_arguments() -> None:
    g, x = torch.randn(5000), torch.randn(5000)
    args = ([1], [6554], [1.1], [0])
    with pytest.raises(ValueError, match="element size"):
        K.mask_gather_dropped_([g], [x.double()], *args)
    with pytest.raises(ValueError, match=r"tensors\[1\] must be a contiguous"):
        K.mask_gather_dropped_(
            [g, g.clone()], [x, torch.randn(100, 50).t()], [1, 2], [6554] * 2, [1.1] * 2, [0, 0]
        )
    with pytest.raises(ValueError, match="of tensors\\[0\\]'s dtype"):
        K.mask_gather_dropped_(
            [g.bfloat16(), g.half()], [x.half(), x.bfloat16()], [1, 2], [6554] * 2, [1.1] * 2,
            [0, 0],
        )
    with pytest.raises(ValueError, match="grads\\[0\\] must be"):
        K.mask_gather_dropped_([g.double()], [x.double()], *args)
    with pytest.raises(ValueError, match="threshold"):
        K.mask_gather_dropped_([g], [x], [1], [70000], [1.1], [0])
    with pytest.raises(ValueError, match="starts"):
        K.mask_counted_([g.clone()], [1], [6554], [1.1], [0], None, None,
                        torch.empty(6, dtype=torch.int64)[::2])
    values, starts = K.gather_dropped_many([x], [1], [6554], [0])
    with pytest.raises(ValueError, match="values"):
        K.scatter_dropped_many([x], [1], [6554], [0], None, None, values[:-1], starts)
    # the schema's own lists: the kernel's TORCH_CHECK_VALUEs, not a Python wrapper's
    with pytest.raises(ValueError, match="runs\\[0\\] must divide"):
        torch.ops.hf_dropgrad.mask_([g], [1], [6554], [1.1], [0], [3], [3])
    with pytest.raises(ValueError, match="offsets\\[0\\] must be in"):
        torch.ops.hf_dropgrad.mask_([g], [1], [6554], [1.1], [-1], [5000], [5000])


def test_the_kernels_are_the_cpu_implementation_of_the_ops() -> None:
    for name in ("mask_", "keep_mask_", "gather_dropped_many", "scatter_dropped_many",
                 "mask_counted_", "gather_dropped_at", "mask_gather_dropped_"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"hf_dropgrad::{name}", "CPU")
    # called as a plain torch op, CPU tensors run the C++ kernel: same bits as the oracle
    g = _grad(9001, torch.bfloat16, seed=4)
    want = _expected(g, 2**64 - 5, 6554, _scale(6554), 33)
    torch.ops.hf_dropgrad.mask_([g], [-5], [6554], [_scale(6554)], [33], [9001], [9001])
    _assert_matches(g, want, "torch.ops.hf_dropgrad.mask_")
    assert kernels.choose(g).ops is K and kernels.choose(g).backend == "cpp"
