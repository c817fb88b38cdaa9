"""hf_dropgrad/layout.py: the public objects integrations hand the core."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from hf_dropgrad import DropGrad
from hf_dropgrad.layout import Box, FlatLayout, Local, Piece, Segment, Whole, local_target


def test_a_plain_parameter_is_one_box_at_offset_zero() -> None:
    p = torch.nn.Parameter(torch.ones(3))
    local = local_target(p)
    assert local == Whole(p) and isinstance(local, Local)
    (box,) = local.values()
    assert box.tensor.data_ptr() == p.data_ptr() and box.place == (0, 3, 3)
    assert local.grads() is None
    p.grad = torch.zeros(3)
    (grad,) = local.grads()
    assert grad.tensor is p.grad and grad.place == (0, 3, 3)


def test_sharded_parameters_go_to_the_registered_handler_with_their_name() -> None:
    from hf_dropgrad import layout

    class Sharded(torch.Tensor):
        pass

    p = torch.zeros(6).as_subclass(Sharded)
    piece = Piece(p[3:], 3, lambda: None)
    seen = []

    def handler(t: torch.Tensor, name: str | int | None) -> Piece | None:
        seen.append(name)
        return piece if isinstance(t, Sharded) else None

    layout.register_sharded(handler)
    try:
        assert local_target(p, "w") is piece
        assert local_target(torch.zeros(2)) is not piece
        assert seen == ["w", None]
    finally:
        layout._SHARDED.remove(handler)


def test_pieces_are_frozen_and_read_their_gradient_when_asked() -> None:
    grads = [None]
    piece = Piece(torch.zeros(2, 4), 5, lambda: grads[0], run=4, stride=10)
    assert piece.grad is None and piece.grads() is None
    (values,) = piece.values()
    assert values.place == (5, 4, 10)  # rows of 4 at 5 and 15: a box of a (?, 10) tensor
    grads[0] = torch.ones(2, 4)
    (grad,) = piece.grads()
    assert torch.equal(piece.grad, torch.ones(2, 4)) and grad.place == values.place
    with pytest.raises(dataclasses.FrozenInstanceError):
        piece.offset = 0  # type: ignore[misc]


def test_a_box_of_one_run_has_the_stride_of_its_length() -> None:
    assert Box(torch.zeros(6), 7).place == (7, 6, 6)
    assert Box(torch.zeros(6), 7, run=6, stride=100).place == (7, 6, 6)  # one run: no stride
    assert Box(torch.zeros(6), 7, run=3, stride=100).place == (7, 3, 100)


def test_flat_layout_cuts_flat_tensors_into_named_runs() -> None:
    flat = torch.arange(10.0)
    flat.grad = torch.arange(10.0) * 10
    layout = FlatLayout({id(flat): [Segment(0, 4, 1, 3), Segment(4, 6, 0, 0)]}, "test engine")
    pieces = list(layout.pieces([{"params": [flat]}]))
    assert [(index, p.offset, p.data.tolist()) for index, p in pieces] == [
        (1, 3, [0.0, 1.0, 2.0, 3.0]), (0, 0, [4.0, 5.0, 6.0, 7.0, 8.0, 9.0]),
    ]
    assert pieces[1][1].grad.tolist() == [40.0, 50.0, 60.0, 70.0, 80.0, 90.0]
    with pytest.raises(RuntimeError, match="under test engine"):
        list(layout.pieces([{"params": [torch.zeros(3)]}]))


def test_dropgrad_takes_a_layout_through_its_public_method() -> None:
    params = [torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(6))]
    opt = DropGrad(torch.optim.SGD(params, lr=1.0), drop_rate=0.5, seed=1)
    assert opt.layout is None and opt.num_params == 2
    with pytest.raises(TypeError, match="FlatLayout"):
        opt.set_layout({"not": "a layout"})  # type: ignore[arg-type]
    flat = torch.zeros(10)
    flat.grad = torch.ones(10)
    layout = FlatLayout({id(flat): [Segment(0, 4, 0, 0), Segment(4, 6, 1, 0)]})
    opt.set_layout(layout)
    opt.optimizer.param_groups[0]["params"] = [flat]  # what the engine steps instead
    opt.step()
    assert opt.step_count == 0  # the engine advances it
    opt.advance()
    assert opt.step_count == 1
    # the runs are masked as the parameters they stand for would be
    for p in params:
        p.grad = torch.ones(p.shape)
    plain = DropGrad(torch.optim.SGD(params, lr=1.0), drop_rate=0.5, seed=1)
    plain.step()
    assert torch.equal(flat.grad, torch.cat([p.grad for p in params]))
