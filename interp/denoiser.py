"""The Denoiser: a diffusion network plus everything needed to call it as a function of (x_t, timestep, c).

``Denoiser`` wraps any ``nn.Module`` with the ``UNet2DConditionModel`` call signature
(``module(sample, timestep, encoder_hidden_states, ...)``) — SDXL's U-Net, the CLEVR U-Nets, or a
hand-made analytic model — together with a diffusers scheduler that fixes the noise schedule. Probes and
interventions only ever see this one interface:

* ``den(x_t, timestep, cond)`` — the network's prediction (ε, v or x₀, whatever it was trained for),
  classifier-free-guided if a guidance scale is set;
* ``den.branches(x_t, timestep, cond)`` — the ``uncond`` / ``cond`` / ``guided`` predictions, labelled;
* ``den.score(x_t, timestep, cond)`` — the score ∇ log p_t(x_t | c) = −ε̂ / σ_t, whatever the parameterisation.

These low-level calls take the scheduler's **training timestep** (``0 … num_train_timesteps − 1``); a noise
fraction ``t ∈ [0, 1]`` converts with ``den.timestep(t)``. Timesteps are checked on every call (range, NaN,
and a value in ``(0, 1)`` that looks like a fraction), from plain values, so the check also holds when the
call sits inside a ``torch.func`` transform over ``x_t`` or the tokens.

Coordinates: ``x_t`` is the network's own input, ``x_t = α_t x₀ + σ_t ε`` with the scheduler's
:class:`~interp.schedule.Schedule`: the variance-preserving ``α = √ᾱ``, ``σ = √(1−ᾱ)`` (Euler-type samplers
scale their state into this space before calling it), or the rectified flow ``α = 1 − σ``, ``σ = timestep / T``
of flow-matching models (SD3, Flux), whose ``"flow"`` prediction is the velocity ``v = ε − x₀``.

Classifier-free guidance comes in two shapes, both labelled for hooks (see :mod:`interp.context`):
``cfg_mode="batched"`` makes one call on ``[uncond; cond]`` like the classic diffusers pipelines,
``cfg_mode="separate"`` makes one call per branch like modular guiders.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any, Literal

import torch
from torch import Tensor, nn

from interp.adapters import Adapter, adapter_for
from interp.conditioning import Conditioning, ConditioningBatch
from interp.context import batched_cfg_branches, current_call, unet_call
from interp.schedule import Schedule
from interp.validation import check_finite, check_guidance_scale, check_timesteps

PredictionType = Literal["epsilon", "v_prediction", "sample", "flow"]
Branch = Literal["uncond", "cond", "guided"]
CondLike = Conditioning | Sequence[Conditioning] | ConditioningBatch
Timestep = Tensor | float | int

def config_view(config: Any) -> Mapping[str, Any]:
    """A read-only ``Mapping`` view of a network's ``config``, whatever form it takes.

    diffusers configs are ``FrozenDict`` (a Mapping) and pass through; plain dicts pass through;
    attribute-style configs (``types.SimpleNamespace``, dataclasses, plain objects) are viewed through
    ``vars()`` — a live view, so later attribute changes show; objects with ``to_dict()`` (transformers'
    ``PretrainedConfig``) use it; ``None`` gives an empty mapping.
    """
    if config is None:
        return MappingProxyType({})
    if isinstance(config, Mapping):
        return config
    to_dict = getattr(config, "to_dict", None)
    if callable(to_dict):
        out = to_dict()
        if isinstance(out, Mapping):
            return MappingProxyType(dict(out))
    try:
        return MappingProxyType(vars(config))
    except TypeError:
        raise TypeError(
            f"the network's config is a {type(config).__name__}, which is neither a mapping nor an object with "
            "attributes; give the module a dict config (or none)"
        ) from None


def _scheduler_from(scheduler: Any) -> Any:
    from diffusers import DDPMScheduler

    if scheduler is None:
        return DDPMScheduler(num_train_timesteps=1000)
    if isinstance(scheduler, Mapping):
        cls_name = scheduler.get("_class_name", "DDPMScheduler")
        import diffusers

        cls = getattr(diffusers, cls_name, DDPMScheduler)
        return cls.from_config(dict(scheduler))
    return scheduler


def _network_of(target: Any) -> tuple[nn.Module, Any]:
    """``(network, scheduler or None)`` of a module or of a diffusers pipeline (its ``unet`` / ``transformer``)."""
    if isinstance(target, nn.Module):
        return target, None
    for attr in ("unet", "transformer"):
        net = getattr(target, attr, None)
        if isinstance(net, nn.Module):
            return net, getattr(target, "scheduler", None)
    raise TypeError(
        f"Denoiser wraps an nn.Module or a diffusers pipeline with a unet / transformer, got {type(target).__name__}"
    )


class Denoiser:
    """Call a diffusion network as ``D(x_t, timestep, c)`` and convert its output to a score.

    Args:
        unet: the network, or a diffusers pipeline (its ``unet`` or ``transformer``, and its scheduler unless
            ``scheduler`` is given). A U-Net-style network has the ``UNet2DConditionModel`` call signature:
            ``forward`` takes ``(sample, timestep, encoder_hidden_states)`` positionally (refused at construction
            otherwise) and, when a call needs them, ``encoder_attention_mask`` / ``added_cond_kwargs``. diffusers'
            PixArt, DiT, SD3 and Flux transformers are called through their family's adapter
            (:mod:`interp.adapters`), chosen from the class. Its ``config`` may be a dict, a diffusers
            ``FrozenDict``, an attribute object or absent (see :func:`config_view`).
        scheduler: a diffusers scheduler, or its config dict (default: DDPM, 1000 linear steps). Only its
            noise schedule (:class:`~interp.schedule.Schedule`: ``alphas_cumprod``, or a rectified flow for
            ``FlowMatch*`` schedulers) and prediction type are used here; sampling loops use it too.
        prediction_type: override the scheduler's ``prediction_type`` (default ``"flow"`` for flow schedules).
            ``"flow"`` (velocity ``ε − x₀``) needs a flow schedule; ``"v_prediction"`` a VP one.
        guidance_scale: classifier-free guidance scale, finite and >= 0; ``None`` or ``1.0`` means no guidance,
            ``0`` the unconditional prediction.
        cfg_mode: ``"batched"`` (one call holding both branches, in the family pipeline's order:
            ``[uncond; cond]``, DiT ``[cond; uncond]``) or ``"separate"`` (one call per branch).
        name: a name carried into result metadata.
        adapter: how the network is called (default: :func:`interp.adapters.adapter_for` the network).
    """

    def __init__(
        self,
        unet: nn.Module,
        scheduler: Any = None,
        *,
        prediction_type: PredictionType | None = None,
        guidance_scale: float | None = None,
        cfg_mode: Literal["batched", "separate"] = "batched",
        name: str | None = None,
        adapter: Adapter | None = None,
    ) -> None:
        unet, pipe_scheduler = _network_of(unet)
        if cfg_mode not in ("batched", "separate"):
            raise ValueError(f"cfg_mode must be 'batched' or 'separate', got {cfg_mode!r}")
        if adapter is not None and not isinstance(adapter, Adapter):
            raise TypeError(f"adapter must be an interp.adapters.Adapter, got {type(adapter).__name__}")
        self.adapter = adapter or adapter_for(unet)
        config_view(getattr(unet, "config", None))  # refuse an unreadable config now, not at first use
        self.unet = unet
        self.scheduler = _scheduler_from(scheduler if scheduler is not None else pipe_scheduler)
        self.schedule = Schedule.from_scheduler(self.scheduler)
        default = "flow" if self.schedule.kind == "flow" else "epsilon"
        self.prediction_type: PredictionType = prediction_type or config_view(self.scheduler.config).get(
            "prediction_type", default
        )
        if self.prediction_type not in ("epsilon", "v_prediction", "sample", "flow"):
            raise ValueError(
                f"unsupported prediction_type {self.prediction_type!r}; use 'epsilon', 'v_prediction', 'sample' or 'flow'"
            )
        # v = α ε − σ x₀ inverts with α² + σ² = 1 (VP only); the flow velocity ε − x₀ belongs to the flow schedule.
        wrong = {"flow": "vp", "v_prediction": "flow"}.get(self.prediction_type)
        if wrong == self.schedule.kind:
            raise ValueError(
                f"prediction_type {self.prediction_type!r} does not fit the {self.schedule.kind} schedule of "
                f"{type(self.scheduler).__name__}: 'flow' needs a flow-matching scheduler, 'v_prediction' a "
                "variance-preserving one"
            )
        self.guidance_scale = check_guidance_scale(guidance_scale)
        self.cfg_mode = cfg_mode
        self.name = name or type(unet).__name__
        self.alphas_cumprod = self.schedule.alphas_cumprod  # VP only (None for flows)

    # ----------------------------------------------------------------- model facts
    @property
    def config(self) -> Mapping[str, Any]:
        """The wrapped network's config as a read-only Mapping (empty for modules without one).

        Works for diffusers' ``FrozenDict``, plain dicts and attribute-style configs (see :func:`config_view`).
        """
        return config_view(getattr(self.unet, "config", None))

    def _first_tensor(self) -> Tensor | None:
        # Parameters first; a parameter-free network (an analytic model) is placed by its buffers.
        p = next(self.unet.parameters(), None)
        return p if p is not None else next(self.unet.buffers(), None)

    @property
    def device(self) -> torch.device:
        p = self._first_tensor()
        return p.device if p is not None else torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        p = self._first_tensor()
        return p.dtype if p is not None else torch.float32

    @property
    def family(self) -> str:
        """The adapter's family name (``"unet"`` for U-Net-style networks, ``"pixart"``, ``"dit"``, ``"sd3"``, ``"flux"``)."""
        return self.adapter.family

    def check_token_derivative(self) -> None:
        """Refuse a derivative along the conditioning tokens where they hold discrete values (DiT class ids)."""
        if self.adapter.discrete_tokens:
            from interp.adapters import DISCRETE_TOKENS

            raise TypeError(DISCRETE_TOKENS)

    @property
    def in_channels(self) -> int | None:
        """Channels ``C`` of ``x_t`` (Flux: the latent channels, before 2×2 packing)."""
        return self.adapter.in_channels(self.config)

    @property
    def cross_attention_dim(self) -> int | None:
        """Width ``D`` of the conditioning tokens the network reads."""
        return self.adapter.token_dim(self.config)

    @property
    def num_train_timesteps(self) -> int:
        return int(config_view(self.scheduler.config)["num_train_timesteps"])

    @property
    def max_timestep(self) -> int:
        """The largest training timestep: ``num_train_timesteps − 1`` (VP) or ``num_train_timesteps`` (flow)."""
        return self.schedule.max_timestep

    def timestep(self, fraction: float | Sequence[float] | Tensor) -> Tensor:
        """Training timestep(s) at noise ``fraction`` ∈ [0, 1] of the schedule (0 = clean, 1 = pure noise).

        Returns a tensor of ``fraction``'s shape (0-d for a number): the nearest integer timestep (long) on VP
        schedules, ``fraction · T`` (float32) on flows (see :meth:`interp.schedule.Schedule.timestep`).
        """
        return self.schedule.timestep(fraction)

    def fraction(self, timestep: Timestep) -> Tensor:
        """The noise fraction of training ``timestep`` (inverse of :meth:`timestep`); float64 of its shape."""
        return self.schedule.fraction(timestep)

    def alpha_bar(self, timestep: Timestep) -> Tensor:
        """ᾱ at training ``timestep`` (scalar or ``(B,)``), linearly interpolated between integer timesteps.

        VP schedules only (a flow has no ᾱ: use :meth:`alpha` / :meth:`sigma`). Returns float64 of
        ``timestep``'s shape, on CPU. Unlike the network calls, any value in ``[0, T − 1]`` is accepted here:
        interpolating ᾱ at a fractional timestep is well defined.
        """
        return self.schedule.alpha_bar(timestep)

    def alpha(self, timestep: Timestep) -> Tensor:
        """Signal coefficient α of ``x_t = α x₀ + σ ε`` at training ``timestep``; float64 of its shape."""
        return self.schedule.alpha(timestep)

    def sigma(self, timestep: Timestep) -> Tensor:
        """Noise std σ of ``x_t = α x₀ + σ ε`` at training ``timestep`` (VP: √(1 − ᾱ)); float64 of its shape."""
        return self.schedule.sigma(timestep)

    def add_noise(self, x0: Tensor, noise: Tensor, timestep: Timestep) -> Tensor:
        """Forward process: ``x_t = α x₀ + σ ε`` at training ``timestep`` (scalar or ``(B,)``); ``x0``'s shape."""
        if self.schedule.kind == "vp":
            ab = self._per_sample(self.alpha_bar(timestep), x0)
            return ab.sqrt() * x0 + (1 - ab).sqrt() * noise
        a, s = (self._per_sample(v, x0) for v in (self.alpha(timestep), self.sigma(timestep)))
        return a * x0 + s * noise

    @staticmethod
    def _per_sample(values: Tensor, like: Tensor) -> Tensor:
        values = values.to(device=like.device, dtype=like.dtype)
        if values.dim() == 0:
            return values
        return values.reshape(-1, *([1] * (like.dim() - 1)))

    # ----------------------------------------------------------------- validation
    def _check_inputs(self, x_t: Tensor, timestep: Tensor) -> None:
        if not isinstance(x_t, Tensor):
            raise TypeError(f"x_t must be a torch.Tensor, got {type(x_t).__name__}")
        if x_t.dim() != 4:
            raise ValueError(f"x_t must be (B, C, H, W), got shape {tuple(x_t.shape)}")
        if self.in_channels is not None and x_t.shape[1] != self.in_channels:
            raise ValueError(
                f"x_t has {x_t.shape[1]} channels but {self.name} expects {self.in_channels}: "
                f"pass (B, {self.in_channels}, H, W)"
            )
        if not x_t.is_floating_point():
            raise TypeError(f"x_t must be floating point, got {x_t.dtype}; use x_t.float()")
        if x_t.device != self.device:
            raise ValueError(f"x_t is on {x_t.device} but {self.name} is on {self.device}: use x_t.to({str(self.device)!r})")
        check_finite("x_t", x_t)
        if timestep.dim() > 1 or (timestep.dim() == 1 and timestep.shape[0] not in (1, x_t.shape[0])):
            raise ValueError(f"timestep must be a scalar or ({x_t.shape[0]},), got shape {tuple(timestep.shape)}")

    def _batch_cond(self, cond: CondLike | None, batch: int) -> ConditioningBatch:
        if cond is None:
            raise ValueError("no conditioning given; pass Conditioning.null() of the model for the null condition")
        if isinstance(cond, ConditioningBatch):
            cb = cond
        elif isinstance(cond, Conditioning):
            cb = ConditioningBatch.stack([cond]).repeat(batch)
        else:
            cb = ConditioningBatch.stack(list(cond))
        if cb.batch_size != batch:
            raise ValueError(f"{cb.batch_size} conditionings for a batch of {batch} samples")
        want = self.cross_attention_dim
        if want is not None and cb.tokens.shape[-1] != want:
            raise ValueError(
                f"conditioning tokens have width {cb.tokens.shape[-1]} but {self.name} cross-attends to width {want}"
            )
        if cb.tokens.device != self.device:
            raise ValueError(
                f"conditioning is on {cb.tokens.device} but {self.name} is on {self.device}: use cond.to({str(self.device)!r})"
            )
        check_finite("conditioning tokens", cb.tokens)
        return cb

    # ----------------------------------------------------------------- calls
    def _call_unet(self, x: Tensor, timestep: Tensor, cb: ConditioningBatch) -> Tensor:
        return self.adapter.call(self.unet, x, timestep, cb, self.dtype)

    def _timesteps(self, timestep: Timestep) -> Tensor:
        """Check ``timestep`` (from its plain values, see :func:`check_timesteps`) and put it on the device."""
        check_timesteps(timestep, self.num_train_timesteps, last=self.max_timestep)
        ts = torch.as_tensor(timestep, device=self.device)
        if ts.dim() == 1 and ts.shape[0] == 1:
            ts = ts[0]
        return ts

    def predict(self, x_t: Tensor, timestep: Timestep, cond: CondLike, *, branch: Branch = "cond") -> Tensor:
        """One branch's raw prediction.

        Args:
            x_t: ``(B, C, H, W)`` noisy input in the network's coordinates.
            timestep: scalar or ``(B,)`` training timestep(s) in ``[0, num_train_timesteps − 1]``
                (for a noise fraction ``t`` pass ``den.timestep(t)``).
            cond: one :class:`Conditioning` (broadcast over the batch), one per sample, or a batch.
            branch: ``"cond"``, ``"uncond"`` (the null condition) or ``"guided"``.

        Returns:
            ``(B, C, H, W)`` prediction in ``x_t``'s dtype.
        """
        if branch == "guided":
            return self.branches(x_t, timestep, cond)["guided"]
        if branch not in ("cond", "uncond"):
            raise ValueError(f"branch must be 'cond', 'uncond' or 'guided', got {branch!r}")
        t = self._timesteps(timestep)
        self._check_inputs(x_t, t)
        if branch == "uncond":
            cond = self._nulls(cond, x_t.shape[0])
        cb = self._batch_cond(cond, x_t.shape[0])
        outer = current_call()
        with unet_call(((branch, slice(0, x_t.shape[0])),), step=outer.step if outer else None,
                       conditionings=self._rows(cond, x_t.shape[0])):
            return self._call_unet(x_t, t, cb).to(x_t.dtype)

    @staticmethod
    def _rows(cond: CondLike, batch: int) -> tuple[Conditioning | None, ...]:
        """The Conditioning of each of ``batch`` rows, announced to hooks (a ConditioningBatch's ``rows``, else ``None``)."""
        if isinstance(cond, Conditioning):
            return (cond,) * batch
        if isinstance(cond, ConditioningBatch):
            return cond.rows or (None,) * batch
        return tuple(cond)

    def _nulls(self, cond: CondLike, batch: int) -> CondLike:
        if isinstance(cond, Conditioning):
            return cond.null()
        if isinstance(cond, ConditioningBatch):
            raise TypeError("the null condition of a ConditioningBatch is unknown; pass Conditioning objects for CFG")
        return [c.null() for c in cond]

    def branches(
        self, x_t: Tensor, timestep: Timestep, cond: CondLike, *, guidance_scale: float | None = None
    ) -> dict[str, Tensor]:
        """The ``uncond``, ``cond`` and ``guided`` predictions, each ``(B, C, H, W)``.

        ``timestep`` is scalar or ``(B,)`` training timestep(s) (see :meth:`predict`).
        ``guided = uncond + s · (cond − uncond)`` with ``s = guidance_scale`` (default: the denoiser's, else 1).
        """
        check_guidance_scale(guidance_scale)
        # ``is None``, not ``or``: a scale of 0 (the unconditional prediction) must not become 1.
        scale = guidance_scale if guidance_scale is not None else self.guidance_scale
        scale = 1.0 if scale is None else scale
        t = self._timesteps(timestep)
        self._check_inputs(x_t, t)
        B = x_t.shape[0]
        nulls = self._nulls(cond, B)
        cb_c = self._batch_cond(cond, B)
        cb_u = self._batch_cond(nulls, B)
        rows_c, rows_u = self._rows(cond, B), self._rows(nulls, B)
        outer = current_call()
        step = outer.step if outer else None
        if self.cfg_mode == "batched":
            # The family pipeline's own order ([uncond; cond], DiT [cond; uncond]), labelled as built.
            order = self.adapter.cfg_order
            parts = {"uncond": (cb_u, rows_u), "cond": (cb_c, rows_c)}
            both = ConditioningBatch.concat([parts[b][0] for b in order])
            tt = t if t.dim() == 0 else torch.cat([t, t])
            with unet_call(batched_cfg_branches(2 * B, order), step=step,
                           conditionings=parts[order[0]][1] + parts[order[1]][1]):
                out = self._call_unet(torch.cat([x_t, x_t]), tt, both).to(x_t.dtype)
            halves = dict(zip(order, (out[:B], out[B:])))
            uncond, cond_out = halves["uncond"], halves["cond"]
        else:
            with unet_call((("uncond", slice(0, B)),), step=step, conditionings=rows_u):
                uncond = self._call_unet(x_t, t, cb_u).to(x_t.dtype)
            with unet_call((("cond", slice(0, B)),), step=step, conditionings=rows_c):
                cond_out = self._call_unet(x_t, t, cb_c).to(x_t.dtype)
        return {"uncond": uncond, "cond": cond_out, "guided": uncond + scale * (cond_out - uncond)}

    def __call__(self, x_t: Tensor, timestep: Timestep, cond: CondLike, *, guidance_scale: float | None = None) -> Tensor:
        """The prediction the sampler uses, ``(B, C, H, W)``: guided when a guidance scale ≠ 1 is set, else conditional.

        ``timestep`` is scalar or ``(B,)`` training timestep(s) (see :meth:`predict`).
        """
        check_guidance_scale(guidance_scale)
        scale = guidance_scale if guidance_scale is not None else self.guidance_scale
        if scale is None or (not isinstance(scale, Tensor) and scale == 1.0):
            return self.predict(x_t, timestep, cond, branch="cond")
        return self.branches(x_t, timestep, cond, guidance_scale=scale)["guided"]

    # ----------------------------------------------------------------- conversions
    def to_epsilon(self, prediction: Tensor, x_t: Tensor, timestep: Timestep) -> Tensor:
        """Convert a raw ``(B, C, H, W)`` prediction of this denoiser's type at training ``timestep`` to ε̂."""
        if self.prediction_type == "epsilon":
            return prediction
        if self.schedule.kind == "vp":
            ab = self._per_sample(self.alpha_bar(timestep), x_t)
            if self.prediction_type == "v_prediction":
                return ab.sqrt() * prediction + (1 - ab).sqrt() * x_t
            return (x_t - ab.sqrt() * prediction) / (1 - ab).sqrt()
        a = self._per_sample(self.alpha(timestep), x_t)
        if self.prediction_type == "flow":
            # x_t + α v = α x₀ + σ ε + α (ε − x₀) = (σ + α) ε = ε, since α + σ = 1 on a rectified flow.
            return x_t + a * prediction
        s = self._per_sample(self.sigma(timestep), x_t)
        return (x_t - a * prediction) / s

    def to_x0(self, prediction: Tensor, x_t: Tensor, timestep: Timestep) -> Tensor:
        """Convert a raw ``(B, C, H, W)`` prediction at training ``timestep`` to x̂₀ = (x_t − σ ε̂) / α."""
        if self.schedule.kind == "vp":
            ab = self._per_sample(self.alpha_bar(timestep), x_t)
            if self.prediction_type == "v_prediction":
                # x̂₀ = √ᾱ·x_t − √(1−ᾱ)·v: the same value as via ε̂, without dividing by √ᾱ (≈ 5e-5 at t = T).
                return ab.sqrt() * x_t - (1 - ab).sqrt() * prediction
            return (x_t - (1 - ab).sqrt() * self.to_epsilon(prediction, x_t, timestep)) / ab.sqrt()
        if self.prediction_type == "sample":
            return prediction
        s = self._per_sample(self.sigma(timestep), x_t)
        if self.prediction_type == "flow":
            return x_t - s * prediction  # no division by α, which is 0 at pure noise
        a = self._per_sample(self.alpha(timestep), x_t)
        return (x_t - s * prediction) / a

    def score(
        self,
        x_t: Tensor,
        timestep: Timestep,
        cond: CondLike,
        *,
        branch: Branch | None = None,
        guidance_scale: float | None = None,
    ) -> Tensor:
        """The score ∇_x log p(x_t | c) = −ε̂ / σ at training ``timestep``, ``(B, C, H, W)`` (VP: σ = √(1 − ᾱ)).

        ``timestep`` is scalar or ``(B,)`` (see :meth:`predict`). ``branch=None`` scores what
        :meth:`__call__` predicts (guided if guidance is on).
        """
        if branch is None:
            pred = self(x_t, timestep, cond, guidance_scale=guidance_scale)
        elif branch == "guided":
            pred = self.branches(x_t, timestep, cond, guidance_scale=guidance_scale)["guided"]
        else:
            pred = self.predict(x_t, timestep, cond, branch=branch)
        sigma = self._per_sample(self.sigma(timestep), x_t)
        return -self.to_epsilon(pred, x_t, timestep) / sigma

    def metadata(self) -> dict[str, Any]:
        """Model facts carried into every result (name, class, config hash, prediction type)."""
        from interp.metadata import config_hash

        return {
            "model": self.name,
            "model_class": type(self.unet).__name__,
            "config_hash": config_hash(self.config),
            "prediction_type": self.prediction_type,
        }

    def __repr__(self) -> str:
        return (
            f"Denoiser({self.name}, prediction={self.prediction_type}, guidance={self.guidance_scale}, "
            f"cfg_mode={self.cfg_mode}, device={self.device}, dtype={self.dtype})"
        )
