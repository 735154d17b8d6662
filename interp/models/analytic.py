"""Analytic toy denoisers whose locality is known by construction — ground truth for the probes.

:class:`ToyUNet` has the ``UNet2DConditionModel`` call signature, so :class:`interp.Denoiser` wraps it
like any U-Net. Each conditioner token carries its own location in its first two coordinates
``(x, y)`` (normalised, x → columns) and features in the rest; context tokens sit far outside the image.

* ``kind="local"`` — **exactly local**: ``n_convs`` 3×3 convolutions (receptive-field radius
  ``n_convs`` pixels, Chebyshev), no normalisation, no pooling, no attention; conditioner ``j`` enters
  only through a compactly supported bump ``(1 − d²/r²)₊²`` around its location (``r = cond_radius``),
  so ``∂D/∂c_j`` vanishes identically outside that disc, and the output is *additive* over conditioners
  (the conditional projective composition holds exactly for well-separated conditioners).
* ``kind="global"`` — the same plus GroupNorm and a global self-attention-like mixing and conditioners
  injected everywhere: non-local in pixels and in conditioners.
* ``kind="linear"`` — linear in ``x`` and in the conditioner *features* (the bump uses the token's location,
  which gets no gradient): integrated gradients equal the JVP attribution exactly when the baseline keeps
  the locations (:func:`feature_baseline`).

:class:`GaussianFlowModel` is the exact denoiser of a Gaussian data distribution under the rectified-flow
schedule ``x_t = (1 − σ) x₀ + σ ε`` (SD3 / Flux): its velocity, ε or x₀ prediction is the true conditional
expectation, so the score of any correct conversion is known in closed form (:meth:`GaussianFlowModel.score`).

:class:`ChannelLocalUNet` has a *feature-space* structure known by construction: its layer ``features``
(a hookable site at ``1/stride`` of the image resolution) has channels that each depend on exactly one
conditioner, only inside a disc around it, with the same dependence magnitude in every channel of a group
(ground truth for :func:`probes.features.layer_dependence` and the feature profile).
"""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace
from typing import Literal

import torch
from torch import Tensor, nn

from interp import Conditioning, Denoiser

FAR = -10.0  # location of context tokens: far outside the image, so their bump is zero


class _Config(dict):
    """dict with attribute access, like diffusers' FrozenDict."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class ToyUNet(nn.Module):
    """A hand-made denoiser with known locality (see the module docstring).

    Args:
        kind: ``"local"``, ``"global"`` or ``"linear"``.
        channels: image channels ``C``.
        size: image side ``H = W``.
        hidden: hidden channels.
        n_convs: number of 3×3 convolutions (pixel receptive-field radius).
        cond_dim: token width ``D`` (2 location coordinates + ``D − 2`` features).
        cond_radius: support radius of a conditioner's bump (normalised units).
        seed: weight initialisation seed.
    """

    def __init__(
        self,
        kind: Literal["local", "global", "linear"] = "local",
        *,
        channels: int = 3,
        size: int = 16,
        hidden: int = 8,
        n_convs: int = 2,
        cond_dim: int = 8,
        cond_radius: float = 0.2,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if kind not in ("local", "global", "linear"):
            raise ValueError(f"kind must be 'local', 'global' or 'linear', got {kind!r}")
        g = torch.Generator().manual_seed(seed)
        self.kind = kind
        self.cond_radius = cond_radius
        self.config = _Config(in_channels=channels, out_channels=channels, sample_size=size, cross_attention_dim=cond_dim)
        chans = [channels] + [hidden] * n_convs
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, padding=1) for a, b in zip(chans[:-1], chans[1:]))
        self.norm = nn.GroupNorm(2, hidden) if kind == "global" else None
        self.out = nn.Conv2d(hidden, channels, 1)
        self.feat = nn.Linear(cond_dim - 2, channels)
        self.mix = nn.Conv2d(hidden, channels, 1)
        self.inject = nn.Identity()  # a site: the conditioners' contribution, before it joins the output
        for p in self.parameters():
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * (0.6 / max(1, p[0].numel()) ** 0.5 if p.dim() > 1 else 0.1))

    def _bumps(self, loc: Tensor, H: int, W: int) -> Tensor:
        """``(B, L, H, W)`` bump of each token around its location."""
        y = (torch.arange(H, dtype=loc.dtype, device=loc.device) + 0.5) / H
        x = (torch.arange(W, dtype=loc.dtype, device=loc.device) + 0.5) / W
        d2 = (x.view(1, 1, 1, W) - loc[..., 0, None, None]) ** 2 + (y.view(1, 1, H, 1) - loc[..., 1, None, None]) ** 2
        return torch.relu(1 - d2 / self.cond_radius**2) ** 2

    def forward(
        self,
        sample: Tensor,
        timestep: Tensor | float | int,
        encoder_hidden_states: Tensor,
        encoder_attention_mask: Tensor | None = None,
        return_dict: bool = True,
        **kwargs: object,
    ):
        B, C, H, W = sample.shape
        t = torch.as_tensor(timestep, dtype=sample.dtype, device=sample.device).reshape(-1)
        gain = (1 + 0.5 * torch.cos(t / 1000.0)).reshape(-1, 1, 1, 1)
        h = sample
        for conv in self.convs:
            h = conv(h) * gain
            h = h if self.kind == "linear" else torch.tanh(h)
        if self.norm is not None:
            h = self.norm(h)
            attn = torch.softmax(h.flatten(2).mean(1), -1).view(B, 1, H, W)  # global mixing
            h = h + (h * attn).sum((2, 3), keepdim=True)
        tokens = encoder_hidden_states.to(sample.dtype)
        loc, feats = tokens[..., :2], tokens[..., 2:]
        if self.kind == "linear":
            loc = loc.detach()
        bumps = self._bumps(loc, H, W)  # (B, L, H, W)
        if self.kind == "global":
            bumps = torch.ones_like(bumps) * (loc[..., :1, None] > FAR / 2).to(sample.dtype)  # every pixel
        if encoder_attention_mask is not None:
            bumps = bumps * encoder_attention_mask.to(sample.dtype)[..., None, None]
        f = self.feat(feats)  # (B, L, C)
        if self.kind == "linear":
            inj = torch.einsum("blhw,blc->bchw", bumps, f)
        else:
            local = self.mix(h)  # (B, C, H, W)
            inj = torch.einsum("blhw,blchw->bchw", bumps, torch.tanh(f[..., None, None] + local[:, None]))
        out = self.out(h) + self.inject(inj)
        return (out,) if not return_dict else SimpleNamespace(sample=out)


class ChannelLocalUNet(nn.Module):
    """A denoiser whose layer ``features`` has a known conditioner → channel → region structure.

    ``h = features(tanh(conv(avgpool(x_t))) + B(c))`` on an ``(size/stride)²`` grid, with channel ``c`` of
    group ``g`` (``c ∈ groups[g]``) receiving ``B_c(p) = b_g(p) · (w_c · f_g)``: ``f_g`` the features of
    conditioner token ``1 + g`` (token 0 is the context token), ``w_c`` a fixed *unit* vector and
    ``b_g(p) = (1 − d²/ρ²)₊²`` the bump of radius ``ρ = cond_radius`` (normalised units) around the token's
    location, evaluated at the layer's cell centres. Locations get no gradient. Hence, exactly:

    * ``‖∂h_{c,p}/∂c_g‖ = b_g(p)`` for ``c ∈ groups[g]`` and 0 for every other channel: the dependence lies
      inside the disc of radius ``ρ`` around the conditioner, at the layer's resolution;
    * the channels of a group carry equal mass, so over channels the participation ratio is ``|groups[g]|``,
      Hoyer's sparsity ``(√C − √n)/(√C − 1)`` with ``n = |groups[g]|`` and ``C = features`` channels, and
      the fraction of channels holding a share ``q`` of the mass is ``ceil(q·n)/C``;
    * conditioners with disjoint discs give one effective conditioner per position (``n_eff = 1``); two at the
      same location with groups of equal size give ``n_eff = 2``.

    The output is a 1×1 convolution of ``h``, upsampled back to the image (nearest).

    Args:
        channels: image channels. size: image side. features: channels ``C`` of the ``features`` layer.
        stride: the layer's down-sampling factor (``size`` must be divisible by it).
        groups: channel indices of each conditioner (disjoint); channels in no group depend on no conditioner.
        cond_dim: token width ``D`` (2 location coordinates + ``D − 2`` features). cond_radius: ``ρ``.
        seed: weight initialisation seed.
    """

    def __init__(
        self,
        *,
        channels: int = 3,
        size: int = 16,
        features: int = 8,
        stride: int = 2,
        groups: Sequence[Sequence[int]] = ((0, 1, 2, 3), (4, 5)),
        cond_dim: int = 8,
        cond_radius: float = 0.25,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if size % stride:
            raise ValueError(f"size {size} must be divisible by stride {stride}")
        flat = [c for g in groups for c in g]
        if len(set(flat)) != len(flat) or any(not 0 <= c < features for c in flat):
            raise ValueError(f"groups must be disjoint channel indices in [0, {features}), got {groups}")
        g = torch.Generator().manual_seed(seed)
        self.stride, self.cond_radius, self.groups = stride, cond_radius, tuple(tuple(gr) for gr in groups)
        self.config = _Config(in_channels=channels, out_channels=channels, sample_size=size, cross_attention_dim=cond_dim)
        self.conv = nn.Conv2d(channels, features, 3, padding=1)
        self.features = nn.Identity()  # the site with the known structure
        self.out = nn.Conv2d(features, channels, 1)
        for p in self.parameters():
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        w = torch.zeros(len(self.groups), features, cond_dim - 2)
        for j, gr in enumerate(self.groups):
            for c in gr:
                v = torch.randn(cond_dim - 2, generator=g)
                w[j, c] = v / v.norm()  # unit: every channel of a group depends equally strongly
        self.register_buffer("weights", w)  # (groups, C, D − 2)

    def forward(
        self,
        sample: Tensor,
        timestep: Tensor | float | int,
        encoder_hidden_states: Tensor,
        encoder_attention_mask: Tensor | None = None,
        return_dict: bool = True,
        **kwargs: object,
    ):
        B, C, H, W = sample.shape
        s = self.stride
        hx = torch.tanh(self.conv(nn.functional.avg_pool2d(sample, s)))  # (B, C_L, h, w)
        h, w = H // s, W // s
        tokens = encoder_hidden_states.to(sample.dtype)
        loc, feats = tokens[..., :2].detach(), tokens[..., 2:]
        y = (torch.arange(h, dtype=loc.dtype, device=loc.device) + 0.5) / h
        x = (torch.arange(w, dtype=loc.dtype, device=loc.device) + 0.5) / w
        d2 = (x.view(1, 1, 1, w) - loc[..., 0, None, None]) ** 2 + (y.view(1, 1, h, 1) - loc[..., 1, None, None]) ** 2
        bumps = torch.relu(1 - d2 / self.cond_radius**2) ** 2  # (B, L, h, w)
        if encoder_attention_mask is not None:
            bumps = bumps * encoder_attention_mask.to(sample.dtype)[..., None, None]
        n = min(len(self.groups), tokens.shape[1] - 1)  # conditioner g is token 1 + g
        inj = torch.zeros_like(hx)
        if n:
            proj = torch.einsum("gcd,bgd->bgc", self.weights[:n].to(sample.dtype), feats[:, 1 : 1 + n])  # (B, g, C_L)
            inj = torch.einsum("bgc,bghw->bchw", proj, bumps[:, 1 : 1 + n])
        act = self.features(hx + inj)
        out = nn.functional.interpolate(self.out(act), scale_factor=s, mode="nearest")
        return (out,) if not return_dict else SimpleNamespace(sample=out)


class GaussianFlowModel(nn.Module):
    """The exact flow-matching denoiser of ``x₀ ~ N(μ, s² I)`` (per pixel), for ``x_t = (1 − σ) x₀ + σ ε``.

    With ``σ = timestep / T``, ``m = (1 − σ) μ``, ``V = (1 − σ)² s² + σ²`` and ``r = x_t − m``, the posterior
    means are ``E[ε | x_t] = σ r / V`` and ``E[x₀ | x_t] = μ + (1 − σ) s² r / V``; the network returns the velocity
    ``E[ε − x₀ | x_t]`` (``prediction="flow"``), ``E[ε | x_t]`` (``"epsilon"``) or ``E[x₀ | x_t]`` (``"sample"``),
    and the true score is ``−r / V``. The conditioning tokens do not change the output.

    Args:
        mean: ``μ`` of shape ``(C, H, W)``. std: ``s`` > 0.
        prediction: what the network returns (see above).
        num_train_timesteps: ``T`` of the scheduler it is wrapped with.
    """

    def __init__(self, mean: Tensor, std: float, *, prediction: Literal["flow", "epsilon", "sample"] = "flow",
                 num_train_timesteps: int = 1000, cond_dim: int = 8) -> None:
        super().__init__()
        if mean.dim() != 3:
            raise ValueError(f"mean must be (C, H, W), got shape {tuple(mean.shape)}")
        if not std > 0:
            raise ValueError(f"std must be > 0, got {std}")
        if prediction not in ("flow", "epsilon", "sample"):
            raise ValueError(f"prediction must be 'flow', 'epsilon' or 'sample', got {prediction!r}")
        self.register_buffer("mean", mean.clone())
        self.std, self.prediction, self.T = float(std), prediction, num_train_timesteps
        C, H, W = mean.shape
        self.config = _Config(in_channels=C, out_channels=C, sample_size=H, cross_attention_dim=cond_dim)

    def _moments(self, sample: Tensor, timestep: Tensor | float | int) -> tuple[Tensor, Tensor, Tensor]:
        """``(σ, r, V)`` at ``timestep``, each broadcastable to ``sample`` ``(B, C, H, W)``."""
        sigma = (torch.as_tensor(timestep, dtype=sample.dtype, device=sample.device) / self.T).reshape(-1, 1, 1, 1)
        mu = self.mean.to(sample.dtype)
        r = sample - (1 - sigma) * mu
        V = (1 - sigma) ** 2 * self.std**2 + sigma**2
        return sigma, r, V

    def score(self, sample: Tensor, timestep: Tensor | float | int) -> Tensor:
        """The true score ``∇ log p_t(x_t) = −r / V`` ``(B, C, H, W)``."""
        _, r, V = self._moments(sample, timestep)
        return -r / V

    def forward(self, sample: Tensor, timestep: Tensor | float | int, encoder_hidden_states: Tensor,
                return_dict: bool = True, **kwargs: object):
        sigma, r, V = self._moments(sample, timestep)
        eps = sigma * r / V
        x0 = self.mean.to(sample.dtype) + (1 - sigma) * self.std**2 * r / V
        out = {"flow": eps - x0, "epsilon": eps, "sample": x0}[self.prediction]
        return (out,) if not return_dict else SimpleNamespace(sample=out)


def gaussian_flow_denoiser(mean: Tensor, std: float, *, prediction: Literal["flow", "epsilon", "sample"] = "flow",
                           shift: float = 3.0) -> Denoiser:
    """A :class:`Denoiser` over a :class:`GaussianFlowModel` with a flow-matching Euler scheduler (``shift`` as SD3's)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    model = GaussianFlowModel(mean, std, prediction=prediction)
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    return Denoiser(model, sched, prediction_type=prediction, name=f"gaussian-flow-{prediction}")


def channel_local_denoiser(*, dtype: torch.dtype = torch.float32, **kwargs: object) -> Denoiser:
    """A :class:`Denoiser` over a :class:`ChannelLocalUNet` (DDPM schedule, ε-prediction)."""
    return Denoiser(ChannelLocalUNet(**kwargs).to(dtype), name="toy-channel-local")  # type: ignore[arg-type]


def toy_conditioning(locations: Sequence[Sequence[float]], *, dim: int = 8, seed: int = 0, dtype: torch.dtype = torch.float32) -> Conditioning:
    """A :class:`Conditioning` for :class:`ToyUNet`: one context token far away, one token per location."""
    g = torch.Generator().manual_seed(seed)
    loc = torch.as_tensor(locations, dtype=torch.float64).reshape(-1, 2)
    context = torch.cat([torch.full((1, 2), FAR, dtype=torch.float64), torch.randn(1, dim - 2, generator=g, dtype=torch.float64)], 1)
    groups = [torch.cat([loc[j : j + 1], torch.randn(1, dim - 2, generator=g, dtype=torch.float64)], 1) for j in range(loc.shape[0])]
    return Conditioning.from_tokens(
        context.to(dtype), [gr.to(dtype) for gr in groups], locations=loc.float(), labels=[f"obj{j}" for j in range(loc.shape[0])]
    )


def feature_baseline(cond: Conditioning) -> Tensor:
    """Integrated-gradients baseline that keeps token locations and zeroes token features, ``(L, D)``."""
    base = cond.tokens.clone()
    base[:, 2:] = 0
    return base


def toy_denoiser(kind: Literal["local", "global", "linear"] = "local", *, dtype: torch.dtype = torch.float32, **kwargs: object) -> Denoiser:
    """A :class:`Denoiser` over a :class:`ToyUNet` (DDPM schedule, ε-prediction)."""
    unet = ToyUNet(kind, **kwargs).to(dtype)  # type: ignore[arg-type]
    return Denoiser(unet, name=f"toy-{kind}")
