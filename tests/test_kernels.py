"""The backend choice (hf_dropgrad/kernels/__init__.py) and every backend through functional.py.

Each backend is forced with ``HF_DROPGRAD_BACKEND`` and compared bit for bit with the reference:
masking (offsets and runs included), slices masked with their offsets against the whole tensor,
full update drop's save/restore, and a whole DropGrad training run. The backends themselves,
called through the backend protocol, are checked against the stream's definition in
test_backends.py.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from hf_dropgrad import DropGrad, kernels
from hf_dropgrad import functional as F
from hf_dropgrad.kernels import loaders
from tests import stream_oracle as oracle
from tests.helpers import backward, tiny_mlp

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy inside the interpreter


def _available(name: str) -> bool:
    if name == "cpp":
        from hf_dropgrad.kernels import cpp

        return cpp.load() is not None
    if name == "triton":
        try:
            from hf_dropgrad.kernels import triton as module
        except ImportError:
            return False
        return module.interpreting()  # CPU tensors; CUDA runs are in test_kernels_triton.py
    return True


FUSED = [b for b in ("cpp", "triton") if _available(b)]
ALL = ["torch", *FUSED]


@pytest.fixture
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(kernels.ENV, request.param)
    return request.param


# ----------------------------------------------------------------------------- the choice
@pytest.mark.parametrize("value", ["cuda", "Triton ", "c++", "none", "1"])
def test_an_unknown_backend_names_the_variable_and_the_allowed_values(
    value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(kernels.ENV, value)
    pattern = "HF_DROPGRAD_BACKEND=.*allowed values: auto, cpp, triton, torch"
    if value.strip().lower() in kernels.BACKENDS:
        return
    with pytest.raises(ValueError, match=pattern):
        kernels.choose(torch.ones(3))
    with pytest.raises(ValueError, match=pattern):
        F.mask_([torch.ones(3)], [1], [6554], [1.1])
    model = tiny_mlp()
    with pytest.raises(ValueError, match=pattern):  # before training, at construction
        DropGrad(torch.optim.SGD(model.parameters(), lr=0.1), drop_rate=0.1)


def test_auto_takes_cpp_on_cpu_and_the_reference_for_the_rest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(kernels.ENV, raising=False)
    assert kernels.requested_backend() == "auto"
    expected = "cpp" if _available("cpp") else "torch"
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert kernels.choose(torch.ones(3, dtype=dtype)).backend == expected
    assert kernels.choose(torch.ones(3, 4).t()).backend == expected  # masked through a copy
    assert kernels.choose(torch.ones(3, dtype=torch.float64)).backend == "torch"
    assert kernels.choose(torch.ones(3, dtype=torch.float64), "pack").backend == expected
    assert kernels.choose(torch.ones(3, device="meta")).backend == "torch"
    assert kernels.choose(torch.ones(3, 4).t(), "pack").backend == "torch"  # no full-size copy
    monkeypatch.setenv(kernels.ENV, "  AUTO ")
    assert kernels.requested_backend() == "auto"


def test_a_forced_backend_that_cannot_run_raises_instead_of_falling_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(kernels.ENV, "cpp")
    with pytest.raises(kernels.BackendUnavailableError, match=r"HF_DROPGRAD_BACKEND=cpp.*float64"):
        F.mask_([torch.ones(3, dtype=torch.float64)], [1], [6554], [1.1])
    with pytest.raises(kernels.BackendUnavailableError, match=r"CPU tensors.*meta"):
        F.mask_([torch.ones(3, device="meta")], [1], [6554], [1.1])
    monkeypatch.setenv("HF_DROPGRAD_DISABLE_EXTENSION", "1")
    with pytest.raises(kernels.BackendUnavailableError, match="HF_DROPGRAD_DISABLE_EXTENSION"):
        F.mask_([torch.ones(3)], [1], [6554], [1.1])
    monkeypatch.delenv("HF_DROPGRAD_DISABLE_EXTENSION")

    monkeypatch.setenv(kernels.ENV, "triton")
    monkeypatch.setattr(loaders, "_triton", None)
    monkeypatch.setattr(loaders, "_triton_error", "ImportError: No module named 'triton'")
    with pytest.raises(kernels.BackendUnavailableError, match="pip install triton"):
        F.mask_([torch.ones(3)], [1], [6554], [1.1])
    with pytest.raises(kernels.BackendUnavailableError, match="pip install triton"):
        F.save_dropped(torch.ones(3), 1, 6554)


def test_forced_triton_refuses_cpu_tensors_outside_the_interpreter(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    module = pytest.importorskip("hf_dropgrad.kernels.triton")
    monkeypatch.setattr(module, "_INTERPRETING", False)
    monkeypatch.setattr(loaders, "_triton", module)
    monkeypatch.setenv(kernels.ENV, "triton")
    with pytest.raises(kernels.BackendUnavailableError, match="CUDA tensors"):
        F.mask_([torch.ones(3)], [1], [6554], [1.1])


def test_forced_torch_runs_everywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(kernels.ENV, "torch")
    monkeypatch.setenv("HF_DROPGRAD_DISABLE_EXTENSION", "1")
    g = torch.ones(5000, dtype=torch.float64)
    F.mask_([g], [3], [32768], [2.0])
    assert set(g.unique().tolist()) == {0.0, 2.0}
    assert F.needs_mask_buffer(torch.ones(3))


# ----------------------------------------------------------------------------- every backend
@pytest.mark.parametrize("backend", ALL, indirect=True)
@pytest.mark.parametrize("dtype", oracle.DTYPES, ids=str)
def test_every_backend_matches_the_definition_with_offsets(
    backend: str, dtype: torch.dtype
) -> None:
    for numel, offset in itertools.product((1, 4097, 9001), (0, 1, 4095, 2**40 + 3)):
        base = oracle.grad(numel, dtype, seed=numel)
        for key, t in ((0, 6554), (2**64 - 1, 65535), (2**63, 1), (5, 65536)):
            g = base.clone()
            F.mask_([g], [key], [t], [oracle.scale(t)], [offset])
            want = oracle.expected(base, key, t, oracle.scale(t), offset)
            oracle.assert_matches(g, want, f"{backend} {numel} {offset} {key} {t}")


@pytest.mark.parametrize("backend", ALL, indirect=True)
def test_slices_masked_with_their_offsets_equal_the_whole_mask(backend: str) -> None:
    whole = oracle.grad(3 * 4096 + 77, torch.float32, seed=1).view(-1)
    masked = whole.clone()
    F.mask_reference_(masked, 99, 19661, oracle.scale(19661))
    cuts = [0, 1, 1000, 4096, 4100, 9000, whole.numel()]
    pieces = [whole[a:b].clone() for a, b in itertools.pairwise(cuts)]
    n = len(pieces)
    F.mask_(pieces, [99] * n, [19661] * n, [oracle.scale(19661)] * n, cuts[:-1])
    assert torch.equal(oracle.raw(torch.cat(pieces)), oracle.raw(masked))
    # the negative control: a shard masked without its offset is not that slice of the mask
    shard = whole[4100:9000].clone()
    F.mask_([shard], [99], [19661], [oracle.scale(19661)])
    assert not torch.equal(oracle.raw(shard), oracle.raw(masked[4100:9000]))


@pytest.mark.parametrize("backend", ALL, indirect=True)
def test_non_contiguous_gradients_are_masked_in_logical_order(backend: str) -> None:
    g = oracle.grad(60 * 70, torch.bfloat16, seed=2).view(60, 70)
    want = g.contiguous().clone()
    F.mask_reference_(want, 8, 26214, oracle.scale(26214), 123)
    t = g.t().contiguous().t()  # same values, column-major storage
    assert not t.is_contiguous()
    F.mask_([t], [8], [26214], [oracle.scale(26214)], [123])
    oracle.assert_same(t.contiguous(), want, backend)


@pytest.mark.parametrize("backend", ALL, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_save_and_restore_dropped_with_offsets(backend: str, dtype: torch.dtype) -> None:
    for numel, offset in itertools.product((1, 4097, 9001), (0, 3, 4095)):
        x = oracle.filled(numel, dtype, seed=numel).view(-1)
        keep = F.keep_mask_reference(numel, 42, 26214, offset=offset)
        saved = F.save_dropped(x, 42, 26214, offset=offset)
        assert saved.backend == backend
        assert torch.equal(oracle.raw(saved._values), oracle.raw(x)[~keep])
        y = oracle.filled(numel, dtype, seed=7).view(-1)
        want = torch.where(keep, oracle.raw(y), oracle.raw(x))
        F.DroppedValues(
            y, 42, 26214, saved._values, saved._starts, offset=offset, backend=saved.backend
        ).restore(torch.empty(numel, dtype=torch.bool))
        assert torch.equal(oracle.raw(y), want), (numel, offset)


def _train(full_update_drop: bool) -> list[torch.Tensor]:
    model = tiny_mlp()
    model[0].weight.data = model[0].weight.data.t().contiguous().t()  # a non-contiguous one
    opt = DropGrad(torch.optim.AdamW(model.parameters(), lr=1e-2), drop_rate=0.3, seed=4,
                   full_update_drop=full_update_drop)
    for step in range(3):
        backward(model, step)
        opt.step()
        opt.zero_grad()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("full_update_drop", [False, True])
def test_training_is_bit_identical_on_every_backend(
    full_update_drop: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(kernels.ENV, "torch")
    reference = _train(full_update_drop)
    for name in FUSED:
        monkeypatch.setenv(kernels.ENV, name)
        for a, b in zip(_train(full_update_drop), reference):
            assert torch.equal(a, b), name


# ----------------------------------------------------------------------------- one choice
def test_keep_mask_honours_the_forced_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    want = F.keep_mask_reference(9001, 42, 26214, offset=5)
    calls: list[str] = []
    real = kernels.ops.keep_mask_

    def spy(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append("op")
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(kernels.ops, "keep_mask_", spy)
    for name in ALL:
        monkeypatch.setenv(kernels.ENV, name)
        calls.clear()
        assert torch.equal(F.keep_mask(9001, 42, 26214, offset=5), want), name
        # the op (whose CPU implementation is the C++ kernel) runs only when cpp is asked for
        assert calls == (["op"] if name == "cpp" else []), name
    monkeypatch.setenv(kernels.ENV, "cpp")
    monkeypatch.setenv("HF_DROPGRAD_DISABLE_EXTENSION", "1")
    with pytest.raises(kernels.BackendUnavailableError, match="HF_DROPGRAD_DISABLE_EXTENSION"):
        F.keep_mask(10, 1, 1)
    monkeypatch.delenv("HF_DROPGRAD_DISABLE_EXTENSION")
    monkeypatch.setenv(kernels.ENV, "triton")
    monkeypatch.setattr(loaders, "_triton", None)
    monkeypatch.setattr(loaders, "_triton_error", "ImportError: No module named 'triton'")
    with pytest.raises(kernels.BackendUnavailableError, match="pip install triton"):
        F.keep_mask(10, 1, 1)


def test_a_forced_backend_that_cannot_run_here_fails_when_dropgrad_is_built(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = tiny_mlp()

    def build() -> DropGrad:
        return DropGrad(torch.optim.SGD(model.parameters(), lr=0.1), drop_rate=0.1)

    monkeypatch.setenv(kernels.ENV, "cpp")
    monkeypatch.setenv("HF_DROPGRAD_DISABLE_EXTENSION", "1")
    with pytest.raises(kernels.BackendUnavailableError, match=r"=cpp.*HF_DROPGRAD_DISABLE_EXT"):
        build()
    monkeypatch.delenv("HF_DROPGRAD_DISABLE_EXTENSION")
    if _available("cpp"):
        build()
    monkeypatch.setenv(kernels.ENV, "triton")
    monkeypatch.setattr(loaders, "_triton", None)
    monkeypatch.setattr(loaders, "_triton_error", "ImportError: No module named 'triton'")
    with pytest.raises(kernels.BackendUnavailableError, match=r"=triton.*pip install triton"):
        build()
    module = pytest.importorskip("hf_dropgrad.kernels.triton")
    monkeypatch.setattr(loaders, "_triton", module)
    monkeypatch.setattr(module, "_INTERPRETING", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(kernels.BackendUnavailableError, match=r"=triton.*no CUDA device"):
        build()
    # CPU parameters are not refused because of their device: they may move to a GPU later
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    build()
    monkeypatch.setattr(module, "_INTERPRETING", True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    build()
    for name in ("torch", "auto"):
        monkeypatch.setenv(kernels.ENV, name)
        assert kernels.check_forced_backend() == name


@pytest.mark.parametrize("backend", ALL, indirect=True)
def test_save_dropped_many_matches_the_definition(backend: str) -> None:
    specs = [(1, 0, torch.float32), (4097, 3, torch.bfloat16), (9001, 4095, torch.float32),
             (0, 0, torch.float16), (5000, 2**40 + 3, torch.float64), (300, 7, torch.bfloat16)]
    tensors = [oracle.filled(n, dt, seed=i).view(-1) for i, (n, _, dt) in enumerate(specs)]
    tensors.append(oracle.filled(60 * 70, torch.float32, seed=9).view(60, 70).t())  # strided
    offsets = [o for _, o, _ in specs] + [11]
    keys = [5, 2**64 - 1, 2**63, 7, 8, 9, 10]
    thresholds = [26214, 6554, 65535, 1, 65536, 0, 19661]
    saved = F.save_dropped_many(tensors, keys, thresholds, offsets)
    expected = "torch" if backend == "torch" else backend
    by_tensor = dict(zip(map(id, saved.tensors), saved.backends))
    targets, wants = [], []
    for i, x in enumerate(tensors):
        if x.dtype == torch.float64 or not x.is_contiguous():
            continue  # the fused backends take any 8-byte dtype, and copies: checked below
        assert by_tensor[id(x)] == expected, i
    for x, k, t, o in zip(tensors, keys, thresholds, offsets):
        keep = F.keep_mask_reference(x.numel(), k, t, offset=o).view(x.shape)
        y = oracle.filled(x.numel(), x.dtype, seed=77).view(x.shape)
        y = y.t().contiguous().t() if not x.is_contiguous() else y
        wants.append(torch.where(keep, oracle.raw(y), oracle.raw(x)))
        targets.append(y)
    target_of = {id(x): y for x, y in zip(tensors, targets)}
    F.DroppedValues._of_groups(  # the saved values, restored into other tensors
        [g._replace(tensors=[target_of[id(x)] for x in g.tensors]) for g in saved._groups]
    ).restore()
    for i, (y, want) in enumerate(zip(targets, wants)):
        assert torch.equal(oracle.raw(y), want), i


def test_a_step_chooses_the_backend_once_per_tensor(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_mlp()
    n = len(list(model.parameters()))
    opt = DropGrad(torch.optim.AdamW(model.parameters(), lr=1e-2), drop_rate=0.3, seed=4,
                   full_update_drop=True)
    calls: list[str] = []
    real = kernels.choose

    def counting(
        tensor: torch.Tensor, purpose: str = "mask", requested: str | None = None
    ) -> kernels.Plan:
        calls.append(purpose)
        return real(tensor, purpose, requested)  # type: ignore[arg-type]

    monkeypatch.setattr(kernels, "choose", counting)
    backward(model, 0)
    opt.step()
    # once for each gradient (the mask) and once for each parameter (save, then restore)
    assert sorted(calls) == ["mask"] * n + ["pack"] * n


@pytest.mark.parametrize("full_update_drop", [False, True])
def test_a_forced_backend_that_cannot_take_a_parameter_fails_before_the_step_touches_anything(
    full_update_drop: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if "cpp" not in FUSED:
        pytest.skip("the cpp backend is not available here")
    monkeypatch.setenv(kernels.ENV, "cpp")
    model = tiny_mlp().double()
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
    # Built on CPU with float64 parameters: no refusal yet (Accelerate may still move or cast
    # them before training).
    opt = DropGrad(inner, drop_rate=0.3, full_update_drop=full_update_drop, model=model)
    inner_steps = []
    inner.register_step_pre_hook(lambda *_: inner_steps.append(1))
    model(torch.randn(4, 8, dtype=torch.float64)).sum().backward()
    before = [(p.detach().clone(), p.grad.clone()) for p in model.parameters()]
    with pytest.raises(kernels.BackendUnavailableError,
                       match=r"HF_DROPGRAD_BACKEND=cpp cannot mask the gradient of 0\.weight "
                             r"\(torch\.float64"):
        opt.step()
    assert not inner_steps and opt.step_count == 0
    for p, (value, grad) in zip(model.parameters(), before):
        assert torch.equal(p, value) and torch.equal(p.grad, grad)


def test_a_parameter_without_a_rate_is_not_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    if "cpp" not in FUSED:
        pytest.skip("the cpp backend is not available here")
    monkeypatch.setenv(kernels.ENV, "cpp")
    model = tiny_mlp()
    extra = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))  # never masked: no rate
    opt = DropGrad(torch.optim.SGD([*model.parameters(), extra], lr=0.1),
                   params={model[0].weight: 0.5})
    backward(model, 0)
    extra.grad = torch.ones(3, dtype=torch.float64)
    opt.step()
    assert opt.step_count == 1
