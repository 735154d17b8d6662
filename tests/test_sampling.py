"""Sampling loop: seeded determinism, callbacks per step, schedulers."""

from __future__ import annotations

import pytest
import torch

from interp import sample


@pytest.mark.parametrize("scheduler", ["ddim", "euler"])
def test_same_seed_same_sample(tiny_clevr_pipe, scheduler):
    den = tiny_clevr_pipe.denoiser(guidance_scale=2.0)
    cond = tiny_clevr_pipe.conditioning([[0.3, 0.3], [0.7, 0.6]])
    seen = []
    kw = dict(shape=(2, 3, 32, 32), num_steps=4, scheduler=scheduler)
    a = sample(den, cond, seed=5, callbacks=[lambda i, t, x, p: seen.append((i, tuple(x.shape)))], **kw)
    b = sample(den, cond, seed=5, **kw)
    c = sample(den, cond, seed=6, **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert seen == [(i, (2, 3, 32, 32)) for i in range(4)]


def test_sampling_rejects_bad_arguments(tiny_clevr_pipe):
    den = tiny_clevr_pipe.denoiser()
    cond = tiny_clevr_pipe.conditioning([[0.5, 0.5]])
    with pytest.raises(ValueError, match="num_steps"):
        sample(den, cond, shape=(1, 3, 32, 32), num_steps=0)
    with pytest.raises(ValueError, match="unknown scheduler"):
        sample(den, cond, shape=(1, 3, 32, 32), num_steps=2, scheduler="heun2")
    with pytest.raises(ValueError, match="latents have shape"):
        sample(den, cond, shape=(1, 3, 32, 32), num_steps=2, latents=torch.zeros(1, 3, 16, 16))
