"""The fused CPU kernel (hf_dropgrad/kernels/cpp.py, csrc/mask_cpu.cpp) against the stream."""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest
import torch

from hf_dropgrad.kernels import cpp as K
from tests import stream_oracle as oracle
from tests.stream_oracle import DTYPES, KEYS, NUMELS, PACK_DTYPES, THRESHOLDS

if K.load() is None:
    pytest.skip("the C++ kernel cannot be built here", allow_module_level=True)

_python_bits, _numpy_bits, _expected = oracle.python_bits, oracle.numpy_bits, oracle.expected
_scale, _bits, _grad = oracle.scale, oracle.bits, oracle.grad
_assert_matches = oracle.assert_matches


# ----------------------------------------------------------------------------- tests
def test_numpy_oracle_matches_the_python_definition() -> None:
    rng = np.random.default_rng(0)
    for key in KEYS:
        bits = _numpy_bits(key, 3 * 4096 + 5)
        for e in [0, 1, 1023, 1024, 4095, 4096, *rng.integers(0, bits.size, 50).tolist()]:
            assert bits[e] == _python_bits(key, e)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("numel", NUMELS)
def test_mask_matches_the_definition(numel: int, dtype: torch.dtype) -> None:
    base = _grad(numel, dtype)
    for key in KEYS:
        for t in THRESHOLDS:
            g = base.clone()
            want = _expected(g, key, t, _scale(t))
            K.mask_([g], [key], [t], [_scale(t)])
            _assert_matches(g, want, f"key={key} t={t}")


@pytest.mark.parametrize("numel", NUMELS)
def test_keep_mask_matches_the_definition(numel: int) -> None:
    for key in KEYS:
        bits = _numpy_bits(key, numel)
        for t in THRESHOLDS:
            got = K.keep_mask(numel, key, t)
            assert got.dtype == torch.bool and got.shape == (numel,)
            assert np.array_equal(got.numpy(), bits >= t), (key, t)


def test_keep_mask_fills_out() -> None:
    out = torch.ones(50, 100, dtype=torch.bool)
    assert K.keep_mask(5000, 9, 32768, out=out) is out
    assert torch.equal(out.view(-1), K.keep_mask(5000, 9, 32768))
    with pytest.raises(ValueError, match="bool CPU tensor of 5000"):
        K.keep_mask(5000, 9, 32768, out=torch.ones(4999, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool CPU tensor"):
        K.keep_mask(5000, 9, 32768, out=torch.ones(5000, dtype=torch.uint8))


def test_threshold_zero_scale_one_leaves_the_tensor_untouched() -> None:
    # NaN payloads included (a multiply by 1.0 would canonicalise bf16/fp16 NaNs).
    for dtype, itype in [(torch.float32, torch.int32), (torch.bfloat16, torch.int16)]:
        g = torch.full((5000,), -1, dtype=itype).view(dtype)
        before = g.clone()
        K.mask_([g], [3], [0], [1.0])
        assert torch.equal(g.view(itype), before.view(itype))


def test_a_list_equals_one_call_per_tensor_and_any_thread_count() -> None:
    specs = [(1, torch.float32), (70000, torch.bfloat16), (4097, torch.float16), (0, torch.float32)]
    specs += [(33 * 4096 + 11, torch.float32), (5, torch.bfloat16), (200000, torch.float32)]
    keys = [2**64 - 1 - 977 * i for i in range(len(specs))]
    thresholds = [6554, 32768, 100, 1, 65535, 65536, 6554]
    scales = [_scale(t) for t in thresholds]
    grads = [_grad(n, dt, seed=i) for i, (n, dt) in enumerate(specs)]
    singles = [g.clone() for g in grads]
    for g, k, t, s in zip(singles, keys, thresholds, scales, strict=True):
        K.mask_([g], [k], [t], [s])
    threads = torch.get_num_threads()
    try:
        for n_threads in sorted({1, 2, threads}):
            torch.set_num_threads(n_threads)
            batch = [g.clone() for g in grads]
            K.mask_(batch, keys, thresholds, scales)
            for a, b in zip(batch, singles, strict=True):
                assert torch.equal(a.isnan(), b.isnan())
                assert torch.equal(torch.nan_to_num(a), torch.nan_to_num(b))
    finally:
        torch.set_num_threads(threads)


def test_multidimensional_tensors_use_the_row_major_index() -> None:
    g = _grad(3 * 5000, torch.float32).view(3, 50, 100)
    flat = g.clone().view(-1)
    K.mask_([g], [11], [6554], [_scale(6554)])
    K.mask_([flat], [11], [6554], [_scale(6554)])
    assert torch.equal(torch.nan_to_num(g.view(-1)), torch.nan_to_num(flat))


def test_every_code_path_gives_the_same_bits() -> None:
    paths = K._isas()
    if len(paths) < 2:
        pytest.skip("only the portable path runs on this CPU")
    grads = [_grad(n, dt, seed=n) for n in (4097, 100003) for dt in DTYPES]
    args = ([2**63 + 1] * len(grads), [6554] * len(grads), [_scale(6554)] * len(grads))
    results = {}
    try:
        for path in paths:
            assert K._set_isa(path) == path and K.isa() == path
            masked = [g.clone() for g in grads]
            K.mask_(masked, *args)
            results[path] = (masked, K.keep_mask(100003, 5, 6554))
    finally:
        K._set_isa(paths[0])
    best, keep_best = results[paths[0]]
    for path in paths[1:]:
        other, keep_other = results[path]
        assert torch.equal(keep_best, keep_other), path
        for a, b in zip(best, other, strict=True):  # bit for bit, NaNs included
            itype = torch.int32 if a.dtype == torch.float32 else torch.int16
            assert torch.equal(a.view(itype), b.view(itype)), (path, a.dtype)


def test_set_isa_refuses_an_unknown_path_and_falls_back_to_the_best() -> None:
    with pytest.raises(ValueError, match="isa must be one of portable, avx2, avx512"):
        K._set_isa("sse")
    best = K._isas()[0]
    try:
        assert K._set_isa("portable") == "portable"
        assert K._set_isa("avx512") == best  # the best this CPU runs, if not AVX-512
    finally:
        K._set_isa(best)


def test_realised_drop_rate_and_unbiasedness() -> None:
    n = 1 << 20
    t = 6554  # p = 0.1
    g = torch.ones(n)
    K.mask_([g], [123], [t], [_scale(t)])
    dropped = (g == 0).float().mean().item()
    assert abs(dropped - t / 65536) < 5 * (0.1 * 0.9 / n) ** 0.5
    assert g[g != 0].unique().tolist() == [pytest.approx(65536 / (65536 - t), rel=1e-7)]


def test_different_keys_give_different_masks() -> None:
    a, b = K.keep_mask(100000, 1, 32768), K.keep_mask(100000, 2, 32768)
    assert 0.45 < (a != b).float().mean().item() < 0.55


@pytest.mark.parametrize(
    ("grads", "thresholds", "match"),
    [
        ([torch.ones(4, dtype=torch.float64)], [1], "float32/bfloat16/float16"),
        ([torch.ones(4, 4).t()], [1], "contiguous"),
        ([torch.ones(4)], [65537], "threshold"),
        ([torch.ones(4)], [-1], "threshold"),
    ],
)
def test_bad_input_is_rejected(
    grads: list[torch.Tensor], thresholds: list[int], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        K.mask_(grads, [0], thresholds, [1.0])


def test_length_mismatch_is_rejected() -> None:
    with pytest.raises(ValueError, match="differ in length"):
        K.mask_([torch.ones(3), torch.ones(3)], [0], [1, 1], [1.0, 1.0])


def test_environment_variable_disables_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_DROPGRAD_DISABLE_EXTENSION", "1")
    assert K.load() is None
    with pytest.raises(RuntimeError, match="unavailable"):
        K.mask_([torch.ones(3)], [0], [1], [1.0])
    monkeypatch.delenv("HF_DROPGRAD_DISABLE_EXTENSION")
    assert K.load() is not None


def test_a_failed_build_warns_once_and_is_remembered(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> None:
        raise RuntimeError("no C++ compiler found (looked for 'c++'; set CXX)")

    monkeypatch.setattr(K, "_lib", None)
    monkeypatch.setattr(K, "_error", None)
    monkeypatch.setattr(K, "_build", broken)
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler"):
        assert K.load() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert K.load() is None


# ----------------------------------------------------------------------------- vs functional.py
try:
    from hf_dropgrad import functional as F
except ImportError:  # written in parallel; compare once it exists
    F = None


@pytest.mark.skipif(
    not hasattr(F, "mask_reference_") or not hasattr(F, "keep_mask_reference"),
    reason="functional.py has no pure-torch reference",
)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kernel_matches_the_pure_torch_reference(dtype: torch.dtype) -> None:
    for numel in NUMELS:
        for key in (5, 2**63 + 12345):
            for t in (1, 6554, 65535, 65536):
                g = _grad(numel, dtype, seed=numel + t)
                ref = g.clone()
                K.mask_([g], [key], [t], [_scale(t)])
                F.mask_reference_(ref, key, t, _scale(t))
                assert torch.equal(g.isnan(), ref.isnan()), (numel, key, t)
                assert torch.equal(torch.nan_to_num(g), torch.nan_to_num(ref)), (numel, key, t)
                want = F.keep_mask_reference(numel, key, t)
                assert torch.equal(K.keep_mask(numel, key, t), want)


# ------------------------------------------------------- full update drop: pack / unpack


_raw, _filled = oracle.raw, oracle.filled


@pytest.mark.parametrize("dtype", PACK_DTYPES)
@pytest.mark.parametrize("numel", [0, *NUMELS, 3 * 4096 + 5])
def test_gather_and_scatter_dropped_match_the_definition(numel: int, dtype: torch.dtype) -> None:
    for key in (7, 2**63, 2**64 - 1):
        bits = torch.from_numpy(_numpy_bits(key, numel))
        for t in THRESHOLDS:
            x = _filled(numel, dtype, seed=t)
            dropped = bits < t
            values, offsets = K.gather_dropped(x, key, t)
            assert values.dtype == dtype and offsets.numel() == -(-numel // 4096) + 1
            assert torch.equal(_raw(values), _raw(x)[dropped]), (key, t)
            target = _filled(numel, dtype, seed=t + 1)
            want = torch.where(dropped, _raw(x), _raw(target))
            K.scatter_dropped(target, key, t, values, offsets)
            assert torch.equal(_raw(target), want), (key, t)


def test_gather_and_scatter_dropped_agree_across_threads_and_code_paths() -> None:
    x = _filled(70 * 4096 + 3, torch.float32, seed=3).view(70 * 4096 + 3)
    reference, offsets = K.gather_dropped(x, 11, 19661)
    threads = torch.get_num_threads()
    paths = K._isas()
    try:
        for path in paths:
            K._set_isa(path)
            for n_threads in sorted({1, 2, threads}):
                torch.set_num_threads(n_threads)
                values, offs = K.gather_dropped(x, 11, 19661)
                assert torch.equal(_raw(values), _raw(reference)) and torch.equal(offs, offsets)
                y = torch.zeros_like(x)
                K.scatter_dropped(y, 11, 19661, values, offs)
                keep = K.keep_mask(x.numel(), 11, 19661)
                assert torch.equal(_raw(y)[~keep], _raw(x)[~keep])
                assert not _raw(y)[keep].any()
    finally:
        torch.set_num_threads(threads)
        K._set_isa(paths[0])


def test_gather_and_scatter_dropped_reject_bad_input() -> None:
    x = torch.randn(100, 50)
    with pytest.raises(ValueError, match="contiguous"):
        K.gather_dropped(x.t(), 1, 6554)
    with pytest.raises(ValueError, match="threshold"):
        K.gather_dropped(x, 1, 65537)
    values, offsets = K.gather_dropped(x, 1, 6554)
    with pytest.raises(ValueError, match="offsets"):
        K.scatter_dropped(x, 1, 6554, values, offsets[:-1])
    with pytest.raises(ValueError, match="values"):
        K.scatter_dropped(x, 1, 6554, values[:-1], offsets)
    with pytest.raises(ValueError, match="values"):
        K.scatter_dropped(x, 1, 6554, values.double(), offsets)


# ----------------------------------------------------------------------------- offsets
OFFSETS = [1, 1023, 1024, 4095, 4096, 5000, 2**40 + 3]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mask_with_an_offset_matches_the_definition(dtype: torch.dtype) -> None:
    for numel in (1, 3000, 4097, 9001):
        base = _grad(numel, dtype, seed=numel)
        for offset in OFFSETS:
            for key, t in ((7, 6554), (2**64 - 1, 65535), (2**63, 1)):
                g = base.clone()
                want = _expected(g, key, t, _scale(t), offset)
                K.mask_([g], [key], [t], [_scale(t)], [offset])
                _assert_matches(g, want, f"numel={numel} offset={offset} key={key} t={t}")
                got = K.keep_mask(numel, key, t, offset=offset)
                assert np.array_equal(got.numpy(), _numpy_bits(key, numel, offset) >= t)


def test_slices_with_their_offsets_equal_the_whole_tensor_mask() -> None:
    whole = _grad(5 * 4096 + 77, torch.bfloat16, seed=5)
    masked = whole.clone()
    K.mask_([masked], [99], [19661], [_scale(19661)])
    cuts = [0, 1, 1000, 4096, 4100, 9000, 5 * 4096 + 77]
    pieces = [whole[a:b].clone() for a, b in itertools.pairwise(cuts)]
    K.mask_(pieces, [99] * len(pieces), [19661] * len(pieces), [_scale(19661)] * len(pieces),
            cuts[:-1])
    assert torch.equal(_raw(torch.cat(pieces)), _raw(masked))


@pytest.mark.parametrize("dtype", PACK_DTYPES)
def test_gather_and_scatter_dropped_with_an_offset(dtype: torch.dtype) -> None:
    for numel in (1, 3000, 9001):
        for offset in OFFSETS:
            key, t = 2**63 + 11, 26214
            dropped = torch.from_numpy(_numpy_bits(key, numel, offset) < t)
            x = _filled(numel, dtype, seed=offset % 997)
            values, starts = K.gather_dropped(x, key, t, offset)
            assert starts.numel() == K.num_chunks(numel, offset) + 1
            assert torch.equal(_raw(values), _raw(x)[dropped]), (numel, offset)
            target = _filled(numel, dtype, seed=3)
            want = torch.where(dropped, _raw(x), _raw(target))
            K.scatter_dropped(target, key, t, values, starts, offset)
            assert torch.equal(_raw(target), want), (numel, offset)


@pytest.mark.parametrize("bad", [-1, 2**62, 1.5, True, "3"])
def test_bad_offsets_are_rejected(bad: object) -> None:
    error = TypeError if isinstance(bad, (float, str, bool)) else ValueError
    with pytest.raises(error, match="offset"):
        K.mask_([torch.ones(3)], [0], [1], [1.0], [bad])  # type: ignore[list-item]
    with pytest.raises(error, match="offset"):
        K.keep_mask(3, 0, 1, offset=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="one entry per tensor"):
        K.mask_([torch.ones(3)], [0], [1], [1.0], [0, 0])


# ----------------------------------------------------------------------------- batched (many)
def _expected_many(
    tensors: list[torch.Tensor], keys: list[int], thresholds: list[int], offsets: list[int]
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """values, starts and per-tensor dropped masks, from the numpy oracle alone."""
    values, starts, masks = [], [0], []
    for x, k, t, o in zip(tensors, keys, thresholds, offsets, strict=True):
        n = x.numel()
        dropped = torch.from_numpy(_numpy_bits(k, n, o) < t) if n else torch.zeros(0, dtype=bool)
        masks.append(dropped)
        values.append(_raw(x).view(-1)[dropped])
        first = o // 4096
        for c in range(first, first + K.num_chunks(n, o)):
            lo, hi = max(o, c * 4096) - o, min(o + n, (c + 1) * 4096) - o
            starts.append(starts[-1] + int(dropped[lo:hi].sum()))
    return torch.cat(values), torch.tensor(starts, dtype=torch.int64), masks


# sizes and offsets that start, end and straddle chunks at odd places, an empty tensor included
MANY_SPECS = [(1, 0), (4097, 3), (0, 5), (3 * 4096 + 5, 4095), (9001, 2**40 + 3), (4096, 4096)]


@pytest.mark.parametrize("dtype", PACK_DTYPES, ids=str)
def test_gather_and_scatter_dropped_many_match_the_definition(dtype: torch.dtype) -> None:
    tensors = [_filled(n, dtype, seed=i) for i, (n, _) in enumerate(MANY_SPECS)]
    offsets = [o for _, o in MANY_SPECS]
    keys = [7, 2**63, 2**64 - 1, 0, 0xDEADBEEF_CAFEF00D, 12345]
    for thresholds in ([6554] * 6, [0, 1, 65535, 65536, 32768, 6554]):
        values, starts = K.gather_dropped_many(tensors, keys, thresholds, offsets)
        want_values, want_starts, masks = _expected_many(tensors, keys, thresholds, offsets)
        assert values.dtype == dtype and starts.dtype == torch.int64
        assert torch.equal(starts, want_starts), thresholds
        assert torch.equal(_raw(values), want_values), thresholds
        targets = [_filled(x.numel(), dtype, seed=100 + i) for i, x in enumerate(tensors)]
        wants = [torch.where(m, _raw(x), _raw(y)) for m, x, y in zip(masks, tensors, targets)]
        K.scatter_dropped_many(targets, keys, thresholds, offsets, values, starts)
        for i, (got, want) in enumerate(zip(targets, wants)):
            assert torch.equal(_raw(got), want), (i, thresholds)


def test_many_equals_one_call_per_tensor_across_threads_and_code_paths() -> None:
    tensors = [_filled(n, torch.bfloat16, seed=n) for n in (70 * 4096 + 3, 5, 200001, 4096)]
    keys, thresholds, offsets = [11, 12, 13, 14], [19661, 6554, 1, 65535], [0, 4093, 77, 8192]
    singles = [K.gather_dropped(x, k, t, o) for x, k, t, o in zip(tensors, keys, thresholds,
                                                                  offsets)]
    want_values = torch.cat([v for v, _ in singles])
    threads = torch.get_num_threads()
    paths = K._isas()
    try:
        for path in paths:
            K._set_isa(path)
            for n_threads in sorted({1, 2, threads}):
                torch.set_num_threads(n_threads)
                values, starts = K.gather_dropped_many(tensors, keys, thresholds, offsets)
                assert torch.equal(_raw(values), _raw(want_values)), (path, n_threads)
                assert starts.numel() == sum(s.numel() - 1 for _, s in singles) + 1
                ys = [torch.zeros_like(x) for x in tensors]
                K.scatter_dropped_many(ys, keys, thresholds, offsets, values, starts)
                for x, y, k, t, o in zip(tensors, ys, keys, thresholds, offsets):
                    keep = K.keep_mask(x.numel(), k, t, offset=o)
                    assert torch.equal(_raw(y)[~keep], _raw(x)[~keep])
                    assert not _raw(y)[keep].any()
    finally:
        torch.set_num_threads(threads)
        K._set_isa(paths[0])


def test_gather_and_scatter_dropped_many_reject_bad_input() -> None:
    a, b = torch.randn(100), torch.randn(50, dtype=torch.float64)
    with pytest.raises(ValueError, match="one element size"):
        K.gather_dropped_many([a, b], [1, 2], [6554, 6554], [0, 0])
    with pytest.raises(ValueError, match="differ in length"):
        K.gather_dropped_many([a], [1, 2], [6554], [0])
    with pytest.raises(ValueError, match=r"tensors\[1\].*contiguous"):
        K.gather_dropped_many([a, torch.randn(4, 4).t()], [1, 2], [1, 1], [0, 0])
    values, starts = K.gather_dropped_many([a, a], [1, 2], [6554, 6554], [0, 0])
    with pytest.raises(ValueError, match="starts"):
        K.scatter_dropped_many([a], [1], [6554], [0], values, starts)
    with pytest.raises(ValueError, match="values"):
        K.scatter_dropped_many([a, a], [1, 2], [6554, 6554], [0, 0], values[1:], starts)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mask_counted_masks_as_mask_and_counts_as_gather(dtype: torch.dtype) -> None:
    grads = [_grad(n, dtype) for n, _ in MANY_SPECS]
    offsets = [o for _, o in MANY_SPECS]
    keys = [7, 2**63, 2**64 - 1, 0, 0xDEADBEEF_CAFEF00D, 12345]
    # 0 with a scale other than 1 is masked; 0 with scale 1 is skipped by the mask but counted
    for thresholds in ([6554] * 6, [0, 1, 65535, 65536, 32768, 6554]):
        scales = [_scale(t) for t in thresholds]
        if thresholds[0] == 0:
            scales[0] = 1.0
        want_grads = [g.clone() for g in grads]
        K.mask_(want_grads, keys, thresholds, scales, offsets)
        _, want_starts, _ = _expected_many(grads, keys, thresholds, offsets)
        got = [g.clone() for g in grads]
        starts = torch.full((want_starts.numel(),), -7, dtype=torch.int64)
        K.mask_counted_(got, keys, thresholds, scales, offsets, starts)
        assert torch.equal(starts, want_starts), thresholds
        for i, (g, w) in enumerate(zip(got, want_grads)):
            assert torch.equal(_raw(g), _raw(w)), (i, thresholds)


@pytest.mark.parametrize("dtype", PACK_DTYPES, ids=str)
def test_gather_dropped_at_equals_gather_dropped_many(dtype: torch.dtype) -> None:
    tensors = [_filled(n, dtype, seed=i) for i, (n, _) in enumerate(MANY_SPECS)]
    offsets = [o for _, o in MANY_SPECS]
    keys = [3, 2**63 + 1, 99, 0, 5, 2**64 - 2]
    for thresholds in ([6554] * 6, [0, 1, 65535, 65536, 32768, 6554]):
        want_values, want_starts, _ = _expected_many(tensors, keys, thresholds, offsets)
        starts = torch.empty(want_starts.numel(), dtype=torch.int64)
        grads = [torch.zeros(x.numel()) for x in tensors]
        K.mask_counted_(grads, keys, thresholds, [1.0] * 6, offsets, starts)
        values = K.gather_dropped_at(tensors, keys, thresholds, offsets, starts)
        assert values.dtype == dtype
        assert torch.equal(_raw(values), want_values), thresholds


class _FullUpdateDropCase:
    """bf16 gradients of four sizes at awkward offsets, their parameters (``param_dtype``), and
    what masking them and packing the parameters must give."""

    def __init__(self, param_dtype: torch.dtype) -> None:
        self.grads = [_grad(n, torch.bfloat16, seed=n) for n in (70 * 4096 + 3, 5, 200001, 4096)]
        self.params = [_filled(g.numel(), param_dtype, seed=i) for i, g in enumerate(self.grads)]
        self.keys, self.thresholds = [11, 12, 13, 14], [19661, 6554, 1, 65535]
        self.offsets = [0, 4093, 77, 8192]
        self.scales = [_scale(t) for t in self.thresholds]
        self.want_grads = [g.clone() for g in self.grads]
        K.mask_(self.want_grads, self.keys, self.thresholds, self.scales, self.offsets)
        self.want_values, self.want_starts = K.gather_dropped_many(
            self.params, self.keys, self.thresholds, self.offsets
        )


def test_mask_counted_and_gather_at_agree_across_threads_and_code_paths() -> None:
    case = _FullUpdateDropCase(torch.float32)
    grads, params, keys, thresholds = case.grads, case.params, case.keys, case.thresholds
    offsets, scales, want_grads = case.offsets, case.scales, case.want_grads
    want_values, want_starts = case.want_values, case.want_starts
    threads = torch.get_num_threads()
    paths = K._isas()
    try:
        for path in paths:
            K._set_isa(path)
            for n_threads in sorted({1, 2, threads}):
                torch.set_num_threads(n_threads)
                got = [g.clone() for g in grads]
                starts = torch.empty_like(want_starts)
                K.mask_counted_(got, keys, thresholds, scales, offsets, starts)
                assert torch.equal(starts, want_starts), (path, n_threads)
                assert all(torch.equal(_raw(a), _raw(b)) for a, b in zip(got, want_grads))
                values = K.gather_dropped_at(params, keys, thresholds, offsets, starts)
                assert torch.equal(_raw(values), _raw(want_values)), (path, n_threads)
    finally:
        torch.set_num_threads(threads)
        K._set_isa(paths[0])


# the parameter dtype packed beside each gradient dtype: one element size
_SAME_SIZE = {
    torch.float32: torch.float32,
    torch.bfloat16: torch.float16,
    torch.float16: torch.bfloat16,
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mask_gather_dropped_equals_the_mask_and_the_definition(dtype: torch.dtype) -> None:
    specs = [*MANY_SPECS, (70 * 4096 + 3, 7)]
    grads = [_grad(n, dtype, seed=i) for i, (n, _) in enumerate(specs)]
    params = [_filled(n, _SAME_SIZE[dtype], seed=50 + i) for i, (n, _) in enumerate(specs)]
    offsets = [o for _, o in specs]
    keys = [3, 2**63 + 1, 99, 0, 5, 2**64 - 2, 77]
    for thresholds in ([6554] * 7, [0, 1, 65535, 65536, 32768, 6554, 19661]):
        scales = [_scale(t) if t < 65536 else 0.0 for t in thresholds]
        want_grads = [g.clone() for g in grads]
        K.mask_(want_grads, keys, thresholds, scales, offsets)
        want_values, want_starts, _ = _expected_many(params, keys, thresholds, offsets)
        got = [g.clone() for g in grads]
        values, starts = K.mask_gather_dropped_(got, params, keys, thresholds, scales, offsets)
        assert values.dtype == params[0].dtype and values.is_contiguous()
        assert torch.equal(starts, want_starts), thresholds
        assert torch.equal(_raw(values), want_values), thresholds
        for i, (g, w) in enumerate(zip(got, want_grads)):
            assert torch.equal(_raw(g), _raw(w)), (i, thresholds)


def test_mask_gather_dropped_agrees_across_threads_code_paths_and_region_margins() -> None:
    case = _FullUpdateDropCase(torch.bfloat16)
    grads, params, keys, thresholds = case.grads, case.params, case.keys, case.thresholds
    offsets, scales, want_grads = case.offsets, case.scales, case.want_grads
    want_values, want_starts = case.want_values, case.want_starts
    threads = torch.get_num_threads()
    paths = K._isas()
    # (factor, slack) of each thread's region: the default, then regions too small, so that the
    # values go on in the overflow buffer part of the way (0.5) or from the first chunk (0)
    margins = [(1.02, 4096), (0.5, 0), (0.0, 0), (1.0, 1)]
    try:
        for path, (factor, slack) in itertools.product(paths, margins):
            K._set_isa(path)
            torch.ops.hf_dropgrad._cpu_pack_margin(factor, slack)
            for n_threads in sorted({1, 2, threads}):
                torch.set_num_threads(n_threads)
                got = [g.clone() for g in grads]
                values, starts = K.mask_gather_dropped_(
                    got, params, keys, thresholds, scales, offsets
                )
                where = (path, factor, n_threads)
                assert torch.equal(starts, want_starts), where
                assert torch.equal(_raw(values), _raw(want_values)), where
                assert all(torch.equal(_raw(a), _raw(b)) for a, b in zip(got, want_grads)), where
    finally:
        torch.ops.hf_dropgrad._cpu_pack_margin(1.02, 4096)
        torch.set_num_threads(threads)
        K._set_isa(paths[0])


def test_mask_gather_dropped_rejects_bad_input() -> None:
    g, x = torch.randn(5000), torch.randn(5000)
    args = ([1], [6554], [1.1], [0])
    with pytest.raises(ValueError, match="grads and tensors differ in length"):
        K.mask_gather_dropped_([g], [x, x], *args)
    with pytest.raises(ValueError, match="differ in length"):
        K.mask_gather_dropped_([g], [x], [1, 2], [6554], [1.1], [0])
    with pytest.raises(ValueError, match=r"tensors\[0\] must have grads\[0\]'s size"):
        K.mask_gather_dropped_([g], [torch.randn(4999)], *args)
    with pytest.raises(ValueError, match="element size"):
        K.mask_gather_dropped_([g], [x.double()], *args)
    with pytest.raises(ValueError, match=r"tensors\[1\] must be a contiguous"):
        K.mask_gather_dropped_(
            [g, g.clone()], [x, torch.randn(100, 50).t()], [1, 2], [6554] * 2, [1.1] * 2, [0, 0]
        )
    with pytest.raises(ValueError, match="share one dtype"):
        K.mask_gather_dropped_(
            [g.bfloat16(), g.half()], [x.half(), x.bfloat16()], [1, 2], [6554] * 2, [1.1] * 2,
            [0, 0],
        )
    with pytest.raises(ValueError, match="grads\\[0\\] must be"):
        K.mask_gather_dropped_([g.double()], [x.double()], *args)
    with pytest.raises(ValueError, match="threshold"):
        K.mask_gather_dropped_([g], [x], [1], [70000], [1.1], [0])


def test_mask_counted_and_gather_at_reject_bad_starts() -> None:
    a = torch.randn(5000)
    for bad in (torch.empty(2, dtype=torch.int64), torch.empty(3, dtype=torch.int32),
                torch.empty(6, dtype=torch.int64)[::2]):
        with pytest.raises(ValueError, match="starts"):
            K.mask_counted_([a.clone()], [1], [6554], [1.1], [0], bad)
        with pytest.raises(ValueError, match="starts"):
            K.gather_dropped_at([a], [1], [6554], [0], bad)
    with pytest.raises(ValueError, match="differ in length"):
        K.mask_counted_([a], [1, 2], [6554], [1.1], [0], torch.empty(3, dtype=torch.int64))


def test_the_kernels_are_the_cpu_implementation_of_the_ops() -> None:
    for name in ("mask_", "keep_mask_", "gather_dropped_many", "scatter_dropped_many",
                 "mask_counted_", "gather_dropped_at", "mask_gather_dropped_"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"hf_dropgrad::{name}", "CPU")
    # called as a plain torch op, CPU tensors run the C++ kernel: same bits as the oracle
    g = _grad(9001, torch.bfloat16, seed=4)
    want = _expected(g, 2**64 - 5, 6554, _scale(6554), 33)
    torch.ops.hf_dropgrad.mask_([g], [-5], [6554], [_scale(6554)], [33])  # int64 bits of the key
    _assert_matches(g, want, "torch.ops.hf_dropgrad.mask_")
