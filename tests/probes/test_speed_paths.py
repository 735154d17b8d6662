"""The fast derivative paths: frozen parameters restored on every exit, one forward per linearisation, the
device-dependent defaults, and forward / reverse / rows modes giving the same conditional maps."""

from __future__ import annotations

import pytest
import torch

import probes.jacobian as jacobian_mod
from interp.evaluate import evaluate
from interp.hooks import HookSet
from interp.forward_mode import derivative_ready_default, forward_chunk_default, frozen_parameters
from interp.inputs import forward_samples
from probes import conditional_locality, pixel_jacobian
from probes.conditional import choose_mode
from probes.jacobian import RowEngine


def test_frozen_parameters_restore_on_every_exit_path():
    net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3))
    net[1].bias.requires_grad_(False)  # a user's frozen parameter stays frozen
    with pytest.raises(ZeroDivisionError):
        with frozen_parameters(net, net[0]) as switched:  # a shared module is switched once
            assert len(switched) == 3 and not any(p.requires_grad for p in net.parameters())
            with frozen_parameters(net) as inner:
                assert inner == []  # nested: nothing left to switch, nothing to restore
            assert not any(p.requires_grad for p in net.parameters())
            1 / 0
    assert [p.requires_grad for p in net.parameters()] == [True, True, True, False]


def test_row_engine_runs_one_forward_with_frozen_parameters(global_den):
    x, ts = forward_samples(global_den, 0.5, [1], dtype=torch.float64)
    params = list(global_den.unet.parameters())
    seen = []

    def fn(v):
        seen.append([p.requires_grad for p in params])
        return evaluate(global_den, v, ts, toy_cond_())

    eng = RowEngine(fn, x, chunk_size=None, freeze=(global_den.unet,))
    cot = torch.zeros(5, *eng.out.shape[1:], dtype=torch.float64)
    for i in range(5):
        cot.view(5, -1)[i, 7 * i] = 1
    rows = eng(cot)
    assert len(seen) == 1 and not any(seen[0])  # one forward (no measuring forward), parameters frozen in it
    assert all(p.requires_grad for p in params)  # restored after it
    assert eng.saved_bytes > 0 and 1 <= eng.chunk_size <= 32
    jac = torch.func.jacrev(lambda v: evaluate(global_den, v, ts, toy_cond_()))(x)  # (1, C, H, W, 1, C, H, W)
    ref = jac.reshape(-1, *x.shape[1:])[[7 * i for i in range(5)]]
    torch.testing.assert_close(rows, ref, rtol=1e-10, atol=1e-12)


def test_row_engine_restores_parameters_when_the_forward_raises(global_den):
    x, ts = forward_samples(global_den, 0.5, [1], dtype=torch.float64)

    def fn(v):
        evaluate(global_den, v, ts, toy_cond_())
        raise RuntimeError("mid-way")

    with pytest.raises(RuntimeError, match="mid-way"):
        RowEngine(fn, x, freeze=(global_den.unet,))
    assert all(p.requires_grad for p in global_den.unet.parameters())


def test_device_defaults_and_derivative_ready_selection(global_den, monkeypatch):
    assert derivative_ready_default("cpu") is False and derivative_ready_default(torch.device("cuda", 0)) is True
    assert forward_chunk_default("cpu") == 8 and forward_chunk_default("cuda") == 64
    entered = []
    real = jacobian_mod.forward_mode_ready

    def spy(model):
        entered.append(model)
        return real(model)

    monkeypatch.setattr(jacobian_mod, "forward_mode_ready", spy)
    x, ts = forward_samples(global_den, 0.5, [1], dtype=torch.float64)
    a = pixel_jacobian(global_den, toy_cond_(), x_t=x, timestep=ts, pixels=[(2, 3)])
    assert entered == []  # CPU model: the fused SDPA backward is kept
    monkeypatch.setattr(jacobian_mod, "model_device", lambda module: torch.device("cuda"))  # as a CUDA model would
    b = pixel_jacobian(global_den, toy_cond_(), x_t=x, timestep=ts, pixels=[(2, 3)])
    assert entered == [global_den.unet]
    c = pixel_jacobian(global_den, toy_cond_(), x_t=x, timestep=ts, pixels=[(2, 3)], derivative_ready=False)
    assert len(entered) == 1 and torch.equal(a, b) and torch.equal(a, c)


def test_auto_mode_cost_model():
    assert choose_mode(64, 3072, "cpu") == "reverse"
    assert choose_mode(64, 3072, "cuda") == "forward"
    assert choose_mode(4000, 3072, "cpu") == "rows" and choose_mode(4000, 3072, "cuda") == "rows"


_COND = None


def toy_cond_():
    global _COND
    if _COND is None:
        from interp.models.analytic import toy_conditioning

        _COND = toy_conditioning([[0.25, 0.25], [0.75, 0.7]])
    return _COND


@pytest.mark.parametrize("directions", ["all", 3])
def test_forward_reverse_and_rows_give_the_same_maps_on_the_toy(global_den, toy_cond, directions):
    maps = ("jvp", "attribution")
    grad_seen = []
    with HookSet() as hooks:  # records whether any parameter required grad in each forward of every mode
        hooks.pre(global_den.unet, lambda m, args, kw: grad_seen.append(any(p.requires_grad for p in m.parameters())))
        res = {m: conditional_locality(global_den, toy_cond, 0.4, [0, 1], maps=maps, directions=directions, mode=m,
                                       dtype=torch.float64) for m in ("forward", "reverse", "rows")}
    assert grad_seen and not any(grad_seen)
    auto = conditional_locality(global_den, toy_cond, 0.4, [0, 1], maps=maps, directions=directions, dtype=torch.float64)
    assert {m: r.metadata["mode"] for m, r in res.items()} == {"forward": "forward", "reverse": "reverse", "rows": "rows"}
    assert auto.metadata["mode"] == "reverse"  # CPU, 12×12×3 rows > directions
    for m in maps:
        assert float(res["forward"][m].abs().max()) > 0
        for other in ("reverse", "rows"):
            torch.testing.assert_close(res[other][m], res["forward"][m], rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(auto[m], res["forward"][m], rtol=1e-6, atol=1e-9)
    assert all(p.requires_grad for p in global_den.unet.parameters())


def test_forward_and_reverse_agree_on_tiny_clevr(clevr):
    pipe, den, cond = clevr
    kw = dict(maps=("jvp", "attribution"), directions=1)
    fwd = conditional_locality(den, cond, 0.5, [0], mode="forward", **kw)
    rev = conditional_locality(den, cond, 0.5, [0], mode="reverse", **kw)
    for m in ("jvp", "attribution"):
        scale = float(fwd[m].abs().max())
        assert scale > 0
        torch.testing.assert_close(rev[m], fwd[m], rtol=0, atol=1e-4 * scale)
    with pytest.raises(ValueError, match="mode must be one of"):
        conditional_locality(den, cond, 0.5, [0], mode="backward", **kw)
