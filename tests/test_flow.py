"""Flow matching: the rectified-flow schedule, the ``flow`` (velocity) prediction and the flow-matching sampler.

Ground truth is a Gaussian data distribution, whose exact velocity, ε, x₀ and score are known in closed form
(:class:`interp.models.analytic.GaussianFlowModel`).
"""

from __future__ import annotations

import pytest
import torch

from interp import Conditioning, Denoiser, sample
from interp.models.analytic import gaussian_flow_denoiser

MEAN = torch.linspace(-1.0, 1.5, 2 * 4 * 4, dtype=torch.float64).reshape(2, 4, 4)
STD = 0.6


def _null() -> Conditioning:
    return Conditioning.from_tokens(torch.zeros(1, 8, dtype=torch.float64), [])


@pytest.mark.parametrize("prediction", ["flow", "epsilon", "sample"])
def test_flow_score_equals_the_analytic_gaussian_score(prediction):
    den = gaussian_flow_denoiser(MEAN, STD, prediction=prediction)
    den.unet.double()
    g = torch.Generator().manual_seed(0)
    x0 = MEAN + STD * torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    timestep = torch.tensor([20.0, 500.0, 1000.0], dtype=torch.float64)  # 1000 = pure noise, valid on a flow
    x_t = den.add_noise(x0, eps, timestep)
    sigma = (timestep / 1000).reshape(-1, 1, 1, 1)
    assert torch.equal(x_t, (1 - sigma) * x0 + sigma * eps)
    truth = den.unet.score(x_t, timestep)
    assert torch.allclose(den.score(x_t, timestep, _null()), truth, rtol=1e-10, atol=1e-10)
    # x̂₀ is the posterior mean, whatever the parameterisation (not at σ = 1 for ε: x̂₀ = (x − σε̂)/α, α = 0).
    rows = slice(0, 3) if prediction != "epsilon" else slice(0, 2)
    x0_hat = den.to_x0(den(x_t, timestep, _null()), x_t, timestep)[rows]
    V = (1 - sigma) ** 2 * STD**2 + sigma**2
    want = MEAN + (1 - sigma) * STD**2 * (x_t - (1 - sigma) * MEAN) / V
    assert torch.allclose(x0_hat, want[rows], rtol=1e-10, atol=1e-10)


def test_flow_schedule_units():
    den = gaussian_flow_denoiser(MEAN.float(), STD)
    assert den.schedule.kind == "flow" and den.prediction_type == "flow" and den.max_timestep == 1000
    assert den.alphas_cumprod is None
    assert den.timestep(0.25).item() == 250.0 and den.timestep(1.0).item() == 1000.0
    assert den.fraction(den.timestep(torch.tensor([0.1, 0.9]))).tolist() == pytest.approx([0.1, 0.9])
    assert den.sigma(250.0).item() == 0.25 and den.alpha(250.0).item() == 0.75
    x = torch.zeros(1, 2, 4, 4)
    den(x, 1000.0, _null().to(dtype=torch.float32))  # T itself is a valid flow timestep
    with pytest.raises(ValueError, match=r"must lie in \[0, 1000\]"):
        den(x, 1001.0, _null().to(dtype=torch.float32))
    with pytest.raises(ValueError, match="flow schedule has no alphas_cumprod"):
        den.alpha_bar(10)


def test_prediction_type_must_fit_the_schedule(tiny_clevr_pipe):
    from diffusers import FlowMatchEulerDiscreteScheduler

    with pytest.raises(ValueError, match="'flow' needs a flow-matching scheduler"):
        Denoiser(tiny_clevr_pipe.unet, tiny_clevr_pipe.scheduler, prediction_type="flow")
    model = gaussian_flow_denoiser(MEAN.float(), STD).unet
    with pytest.raises(ValueError, match="'v_prediction' a variance-preserving one"):
        Denoiser(model, FlowMatchEulerDiscreteScheduler(), prediction_type="v_prediction")


def test_flow_sampler_follows_the_exact_ode():
    """With the exact velocity the flow ODE maps noise ε to μ + s·ε; Euler converges to it at first order."""
    den = gaussian_flow_denoiser(MEAN.float(), STD)
    cond = _null().to(dtype=torch.float32)
    want = MEAN.float() + STD * torch.randn((2, 2, 4, 4), generator=torch.Generator().manual_seed(3))
    # the default scheduler on a flow model is "flow"
    err = {n: (sample(den, cond, shape=(2, 2, 4, 4), num_steps=n, seed=3) - want).abs().max().item() for n in (50, 400)}
    assert err[400] < 0.01 and err[50] / err[400] > 6  # error ∝ 1/steps (measured: 0.073 at 50, 0.0093 at 400)
    explicit = sample(den, cond, shape=(2, 2, 4, 4), num_steps=50, seed=3, scheduler="flow")
    assert (explicit - want).abs().max().item() == err[50]


def test_sampler_names_must_fit_the_schedule(tiny_clevr_pipe):
    den = gaussian_flow_denoiser(MEAN.float(), STD)
    with pytest.raises(ValueError, match=r"scheduler 'ddim' samples a vp schedule .* use one of \['flow'\]"):
        sample(den, _null().to(dtype=torch.float32), shape=(1, 2, 4, 4), num_steps=2, scheduler="ddim")
    vp = tiny_clevr_pipe.denoiser()
    with pytest.raises(ValueError, match="scheduler 'flow' samples a flow schedule"):
        sample(vp, tiny_clevr_pipe.conditioning([[0.5, 0.5]]), shape=(1, 3, 32, 32), num_steps=2, scheduler="flow")
