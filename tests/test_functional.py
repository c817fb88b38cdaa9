"""The random stream and the masking maths (hf_dropgrad/functional.py)."""

from __future__ import annotations

import math
import random

import pytest
import torch

from hf_dropgrad import functional as F


def _python_bits(key: int, e: int) -> int:
    c, r = divmod(e, F.CHUNK)
    j, b = divmod(r, F.WIDTH)
    h = F.mix64(key + (c * F.WIDTH + b + 1) * F.GOLDEN)
    return (h >> (16 * j)) & 0xFFFF


@pytest.mark.parametrize("key", [0, 1, 2**63 - 1, 2**63, 2**64 - 1, 0x1234_5678_9ABC_DEF0])
def test_random_bits_match_the_python_definition(key: int) -> None:
    n = 3 * F.CHUNK + 17
    bits = F.random_bits(key, 0, n)
    rng = random.Random(key)
    for e in [0, 1, 1023, 1024, 4095, 4096, n - 1, *rng.sample(range(n), 300)]:
        assert bits[e].item() == _python_bits(key, e), e


def test_random_bits_from_an_offset_are_the_same_stream() -> None:
    whole = F.random_bits(99, 0, 5 * F.CHUNK)
    part = F.random_bits(99, 2 * F.CHUNK, 2 * F.CHUNK + 5)
    assert torch.equal(whole[2 * F.CHUNK : 4 * F.CHUNK + 5], part)
    # any start, not only chunk boundaries: lanes and chunks are split mid-way
    for start in (1, 1023, 1025, 4095, 5000):
        assert torch.equal(whole[start : start + 7000], F.random_bits(99, start, 7000))
    with pytest.raises(ValueError, match="start"):
        F.random_bits(99, -1, 10)


def test_keys_depend_on_every_argument_and_only_on_them() -> None:
    keys = {F.derive_key(s, k, i) for s in range(3) for k in range(3) for i in range(3)}
    assert len(keys) == 27
    torch.manual_seed(0)
    a = F.derive_key(5, 6, 7)
    torch.manual_seed(1)
    assert F.derive_key(5, 6, 7) == a


@pytest.mark.parametrize("p", [0.0, 1e-6, 0.01, 0.1, 0.123456, 0.25, 0.5, 0.9, 0.999, 1.0])
def test_realised_rate_is_within_1e4_of_p(p: float) -> None:
    assert abs(F.realised_drop_rate(p) - p) <= 2**-17
    t = F.drop_threshold(p)
    if t < F.RESOLUTION:
        # survivors are scaled by the reciprocal of the realised keep probability
        assert F.keep_scale(t) == pytest.approx(1.0 / (1.0 - F.realised_drop_rate(p)), rel=1e-15)
    else:
        assert F.keep_scale(t) == 0.0


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_empirical_drop_fraction_and_unbiasedness(p: float) -> None:
    n = 1 << 20
    t = F.drop_threshold(p)
    keep = F.keep_mask_reference(n, F.derive_key(0, 0, 0), t)
    realised = t / F.RESOLUTION
    sigma = math.sqrt(realised * (1 - realised) / n)
    assert abs((1 - keep.float().mean().item()) - realised) < 5 * sigma
    # E[masked g] = g: average the masked value of a constant gradient over elements.
    g = torch.ones(n)
    F.mask_reference_(g, F.derive_key(0, 0, 1), t, F.keep_scale(t))
    std_mean = math.sqrt(realised / (1 - realised) / n)
    assert abs(g.double().mean().item() - 1.0) < 5 * std_mean


def test_masks_of_different_keys_are_uncorrelated() -> None:
    n = 1 << 18
    t = F.drop_threshold(0.5)
    a = F.keep_mask_reference(n, F.derive_key(0, 0, 0), t).float()
    b = F.keep_mask_reference(n, F.derive_key(0, 0, 1), t).float()
    c = F.keep_mask_reference(n, F.derive_key(0, 1, 0), t).float()
    for x, y in [(a, b), (a, c), (b, c)]:
        corr = torch.corrcoef(torch.stack([x, y]))[0, 1].item()
        assert abs(corr) < 5 / math.sqrt(n)


def test_reference_masks_exactly() -> None:
    g = torch.randn(10_000, dtype=torch.float64).float()
    key, t = F.derive_key(1, 2, 3), F.drop_threshold(0.3)
    expected = g.clone()
    keep = F.keep_mask_reference(g.numel(), key, t)
    expected[~keep] = 0.0
    expected[keep] *= torch.tensor(F.keep_scale(t), dtype=torch.float32)
    F.mask_reference_(g, key, t, F.keep_scale(t))
    assert torch.equal(g, expected)


def test_zero_threshold_is_a_bit_exact_no_op() -> None:
    g = torch.randn(1000)
    before = g.clone()
    F.mask_([g], [123], [0], [1.0])
    F.mask_reference_(g, 123, 0, 1.0)
    assert torch.equal(g, before)


def test_drop_everything_never_divides_by_zero() -> None:
    g = torch.randn(5000)
    F.mask_([g], [7], [F.drop_threshold(1.0)], [F.keep_scale(F.drop_threshold(1.0))])
    assert torch.all(g == 0)


def test_non_finite_gradients_are_not_hidden() -> None:
    g = torch.full((4096,), float("inf"))
    t = F.drop_threshold(0.5)
    F.mask_([g], [11], [t], [F.keep_scale(t)])
    assert not torch.isfinite(g).any()
    assert torch.isnan(g).any() and torch.isinf(g).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("numel", [1, 1023, 4096, 4097, 70_001])
def test_fast_path_equals_reference(dtype: torch.dtype, numel: int) -> None:
    torch.manual_seed(numel)
    grads = [torch.randn(numel).to(dtype), torch.randn(numel + 5).to(dtype)]
    refs = [g.clone() for g in grads]
    keys = [F.derive_key(3, 4, 0), F.derive_key(3, 4, 1)]
    ts = [F.drop_threshold(0.1), F.drop_threshold(0.6)]
    scales = [F.keep_scale(t) for t in ts]
    F.mask_(grads, keys, ts, scales)
    for ref, key, t, s in zip(refs, keys, ts, scales):
        F.mask_reference_(ref, key, t, s)
    for g, ref in zip(grads, refs):
        assert g.dtype == dtype
        assert torch.equal(g, ref)


def test_non_contiguous_gradient_is_masked_in_logical_order() -> None:
    base = torch.randn(64, 96)
    g = base.t()  # non-contiguous view
    expected = g.contiguous().clone()
    t = F.drop_threshold(0.4)
    F.mask_reference_(expected, 5, t, F.keep_scale(t))
    F.mask_([g], [5], [t], [F.keep_scale(t)])
    assert torch.equal(g, expected)


def test_keep_mask_matches_the_masking() -> None:
    t = F.drop_threshold(0.25)
    g = torch.rand(20_000) + 1.0  # strictly positive: zero iff dropped
    F.mask_([g], [42], [t], [F.keep_scale(t)])
    assert torch.equal(F.keep_mask(g.numel(), 42, t), g != 0)
    assert torch.equal(F.keep_mask_reference(g.numel(), 42, t), g != 0)


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_mask_and_save_dropped_many_equals_mask_then_save(
    backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_DROPGRAD_BACKEND", backend)
    gen = torch.Generator().manual_seed(3)
    # odd sizes and offsets, two parameter dtypes, a bf16 gradient of an fp32 parameter, a
    # non-contiguous parameter (reference path) and a zero threshold
    specs = [(4097, 3, torch.float32, torch.float32), (5, 4093, torch.bfloat16, torch.bfloat16),
             (70_001, 0, torch.float32, torch.bfloat16), (3 * 4096, 8192, torch.float16,
                                                          torch.float16), (333, 11, torch.float32,
                                                                            torch.float32)]
    params = [torch.randn(n, generator=gen).to(pd) for n, _, pd, _ in specs]
    params[4] = torch.randn(2 * 333, generator=gen)[::2]
    grads = [torch.randn(n, generator=gen).to(gd) for n, _, _, gd in specs]
    keys = [F.derive_key(1, 2, i) for i in range(len(specs))]
    thresholds = [F.drop_threshold(p) for p in (0.1, 0.5, 0.3, 0.0, 0.2)]
    scales = [F.keep_scale(t) for t in thresholds]
    offsets = [o for _, o, _, _ in specs]
    want_grads = [g.clone() for g in grads]
    F.mask_(want_grads, keys, thresholds, scales, offsets)
    want = F.save_dropped_many(params, keys, thresholds, offsets)
    got = F.mask_and_save_dropped_many(grads, params, keys, thresholds, scales, offsets)
    for g, w in zip(grads, want_grads):
        assert torch.equal(g.view(torch.int16 if g.element_size() == 2 else torch.int32),
                           w.view(torch.int16 if w.element_size() == 2 else torch.int32))
    originals = [p.clone() for p in params]
    for p in params:
        p.fill_(7)
    got.restore()
    for p, o, k, t, off in zip(params, originals, keys, thresholds, offsets):
        dropped = ~F.keep_mask(p.numel(), k, t, offset=off)
        assert torch.equal(p.reshape(-1)[dropped], o.reshape(-1)[dropped])
        assert (p.reshape(-1)[~dropped] == 7).all()
    assert sorted(map(str, (t.dtype for t in got.tensors))) == sorted(
        map(str, (t.dtype for t in want.tensors))
    )
    with pytest.raises(ValueError, match="differ in length"):
        F.mask_and_save_dropped_many(grads[:2], params, keys, thresholds, scales, offsets)
