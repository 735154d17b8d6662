"""Conditioning: the *set* of conditioners a diffusion model is asked to compose.

The paper's objects are conditioners c_1..c_k — an object location in CLEVR, a phrase of an SDXL prompt.
A :class:`Conditioning` holds the token embeddings the U-Net's cross-attention sees, and for every token
the conditioner that owns it (``-1`` for *context* tokens that are always present: CLEVR's learned null
token, CLIP's BOS/EOS/padding). That one ``owner`` vector is what makes ablations and compositions
model-agnostic:

* ``drop(j)`` removes conditioner j's tokens (for cross-attention, which has no positional encoding, this
  is exactly masking them out),
* ``only(j)`` keeps the context plus conditioner j,
* ``null()`` is the model's null condition (CLEVR: the null token alone; SDXL: the unconditional
  embedding the pipeline uses for classifier-free guidance).

A conditioning with no conditioners *is* the null condition: ``Conditioning.null()`` of the model.

Batching pads token sequences to a common length and returns a boolean attention mask, which diffusers'
``UNet2DConditionModel`` accepts as ``encoder_attention_mask``.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from interp.validation import check_finite, check_locations


def _check_index(j: object, k: int, arg: str = "j") -> int:
    """``j`` as an int in ``[0, k)``; TypeError for a non-integer, IndexError (naming ``arg``) out of range."""
    if isinstance(j, bool):  # bool is an int subclass: only(True) is a bug, not only(1)
        raise TypeError(f"{arg} must be a conditioner index (int), got the bool {j!r}")
    try:
        i = operator.index(j)
    except TypeError:
        raise TypeError(f"{arg} must be a conditioner index (int), got {type(j).__name__} {j!r}") from None
    if not 0 <= i < k:
        valid = f"0..{k - 1}" if k else "none: it holds no conditioner"
        raise IndexError(f"{arg}={i} out of range for a conditioning with {k} conditioners (valid: {valid})")
    return i


def _check_tokens(name: str, tokens: object, dim: int | None = None, *, finite: bool = True) -> None:
    if not isinstance(tokens, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (L, D), got {type(tokens).__name__}")
    if tokens.dim() != 2:
        raise ValueError(f"{name} must be (L, D), got shape {tuple(tokens.shape)}")
    if not tokens.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {tokens.dtype}; use {name.split('.')[-1]}.float()")
    if dim is not None and tokens.shape[1] != dim:
        raise ValueError(f"{name} have width {tokens.shape[1]} but the conditioning's tokens have width {dim}")
    if finite:
        check_finite(name, tokens)  # skipped inside torch.func transforms


def _check_added(name: str, added: object) -> None:
    if not isinstance(added, Mapping):
        raise TypeError(f"{name} must be a mapping of name -> tensor, got {type(added).__name__}")
    for key, value in added.items():
        if not isinstance(value, Tensor):
            raise TypeError(f"{name}[{key!r}] must be a tensor, got {type(value).__name__}")


@dataclass(frozen=True)
class Conditioning:
    """A set of conditioners, as the tokens a U-Net cross-attends to.

    Attributes:
        tokens: ``(L, D)`` token embeddings.
        owner: ``(L,)`` integer (int64), the index of the conditioner owning each token, ``-1`` for context
            tokens; every conditioner owns at least one token.
        labels: one name per conditioner (``k = len(labels)``; a list is stored as a tuple).
        locations: ``(k, 2)`` normalised ``(x, y)`` positions in ``[0, 1]`` (image x to the right, y down),
            or ``None`` for conditioners without a location. Floating, in the caller's precision (float64
            locations stay float64 — probes measure distances with them — while tokens follow the model).
        added: extra per-sample model inputs (SDXL: ``text_embeds (1280,)``, ``time_ids (6,)``).
        null_tokens: ``(L0, D)`` tokens of the model's null condition, when it is not just the context
            tokens (SDXL's unconditional prompt embedding).
        null_added: the ``added`` inputs of the null condition.
        attributes: free-form per-conditioner attributes (e.g. ``{"colour": [..]}``), kept through drop/only.
    """

    tokens: Tensor
    owner: Tensor
    labels: tuple[str, ...] = ()
    locations: Tensor | None = None
    added: Mapping[str, Tensor] = field(default_factory=dict)
    null_tokens: Tensor | None = None
    null_added: Mapping[str, Tensor] | None = None
    attributes: Mapping[str, tuple] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_tokens("Conditioning.tokens", self.tokens)
        # labels: a bare string would silently count one conditioner per character.
        if isinstance(self.labels, str) or not isinstance(self.labels, Sequence):
            raise TypeError(
                f"Conditioning.labels must be a sequence of names, one per conditioner, got {type(self.labels).__name__}"
                + (f"; for one conditioner pass ({self.labels!r},)" if isinstance(self.labels, str) else "")
            )
        if not all(isinstance(lab, str) for lab in self.labels):
            raise TypeError(f"Conditioning.labels must be strings, got {[type(lab).__name__ for lab in self.labels]}")
        object.__setattr__(self, "labels", tuple(self.labels))  # frozen: normalise a list to a tuple once
        k = len(self.labels)
        if not isinstance(self.owner, Tensor):
            raise TypeError(f"Conditioning.owner must be a torch.Tensor (L,), got {type(self.owner).__name__}")
        if self.owner.dtype == torch.bool or self.owner.is_floating_point() or self.owner.is_complex():
            # a bool owner would index by mask in drop/only instead of by conditioner
            raise TypeError(f"Conditioning.owner must be an integer tensor (int64), got {self.owner.dtype}; use owner.long()")
        if self.owner.shape != self.tokens.shape[:1]:
            raise ValueError(
                f"Conditioning.owner must be (L,) = ({self.tokens.shape[0]},), got {tuple(self.owner.shape)}"
            )
        if self.owner.numel() and (self.owner.max().item() >= k or self.owner.min().item() < -1):
            raise ValueError(f"Conditioning.owner values must lie in [-1, {k - 1}] for {k} labelled conditioners")
        owned = torch.bincount(self.owner[self.owner >= 0].long().cpu(), minlength=k) if k else torch.zeros(0)
        if k and (owned == 0).any():
            empty = torch.nonzero(owned == 0).flatten().tolist()
            raise ValueError(
                f"Conditioning.owner gives conditioner(s) {empty} ({[self.labels[j] for j in empty]}) no token; "
                "every labelled conditioner must own at least one token"
            )
        if self.locations is not None:
            if not isinstance(self.locations, Tensor):
                raise TypeError(f"Conditioning.locations must be a (k, 2) tensor or None, got {type(self.locations).__name__}")
            if tuple(self.locations.shape) != (k, 2):
                raise ValueError(f"Conditioning.locations must be ({k}, 2), got {tuple(self.locations.shape)}")
            check_locations("Conditioning.locations", self.locations)
        _check_added("Conditioning.added", self.added)
        if self.null_tokens is not None:
            _check_tokens("Conditioning.null_tokens", self.null_tokens, dim=self.tokens.shape[1])
        if self.null_added is not None:
            _check_added("Conditioning.null_added", self.null_added)
            if set(self.null_added) != set(self.added):
                raise ValueError(
                    f"Conditioning.null_added has keys {sorted(self.null_added)} but added has {sorted(self.added)}; "
                    "the null condition must carry the same extra inputs"
                )
        for name, values in self.attributes.items():
            if isinstance(values, str) or len(values) != k:
                n = "a string" if isinstance(values, str) else f"{len(values)} values"
                raise ValueError(f"attribute {name!r} has {n} for {k} conditioners; pass one value per conditioner")

    # ------------------------------------------------------------------ views
    @property
    def k(self) -> int:
        """Number of conditioners."""
        return len(self.labels)

    def __len__(self) -> int:
        return self.k

    @property
    def dim(self) -> int:
        """Token embedding width ``D``."""
        return self.tokens.shape[1]

    @property
    def is_null(self) -> bool:
        """True when the conditioning holds no conditioner (it then means the model's null condition)."""
        return self.k == 0

    def token_indices(self, j: int) -> Tensor:
        """``(n_j,)`` positions of conditioner ``j``'s tokens in :attr:`tokens`."""
        j = _check_index(j, self.k)
        return torch.nonzero(self.owner == j).flatten()

    def span(self, j: int) -> tuple[int, int]:
        """``(start, stop)`` token span of conditioner ``j`` (its tokens are contiguous for prompts)."""
        idx = self.token_indices(j)
        return int(idx.min()), int(idx.max()) + 1

    # ------------------------------------------------------------ set algebra
    def _keep(self, keep_cond: Sequence[int]) -> Conditioning:
        keep_cond = list(keep_cond)
        remap = torch.full((self.k + 1,), -2, dtype=torch.long)
        remap[-1] = -1  # owner -1 indexes the last slot: context tokens stay context tokens
        for new, old in enumerate(keep_cond):
            remap[old] = new
        new_owner = remap[self.owner]
        keep_tok = new_owner >= -1
        return Conditioning(
            tokens=self.tokens[keep_tok],
            owner=new_owner[keep_tok],
            labels=tuple(self.labels[j] for j in keep_cond),
            locations=None if self.locations is None else self.locations[keep_cond],
            added=self.added,
            null_tokens=self.null_tokens,
            null_added=self.null_added,
            attributes={n: tuple(v[j] for j in keep_cond) for n, v in self.attributes.items()},
        )

    def drop(self, j: int) -> Conditioning:
        """The same conditioning without conditioner ``j`` (remaining conditioners are renumbered)."""
        j = _check_index(j, self.k)
        return self._keep([i for i in range(self.k) if i != j])

    def only(self, j: int) -> Conditioning:
        """The context tokens plus conditioner ``j`` alone."""
        j = _check_index(j, self.k)
        return self._keep([j])

    def subset(self, js: Sequence[int]) -> Conditioning:
        """The context tokens plus the conditioners ``js`` (in that order; ``[]`` gives the null condition)."""
        if isinstance(js, (str, bytes)) or not isinstance(js, (Sequence, Tensor, range)):
            hint = f"; for one conditioner use only({js!r}) or subset([{js!r}])" if isinstance(js, int) else ""
            raise TypeError(f"js must be a sequence of conditioner indices, got {type(js).__name__}{hint}")
        keep = [_check_index(j, self.k, arg="js") for j in (js.tolist() if isinstance(js, Tensor) else js)]
        if len(set(keep)) != len(keep):
            dup = sorted({j for j in keep if keep.count(j) > 1})
            raise ValueError(f"js lists conditioner(s) {dup} more than once: {keep}; each may appear once")
        return self._keep(keep)

    def null(self) -> Conditioning:
        """The model's null condition (no conditioner)."""
        if self.null_tokens is None:
            return self._keep([])
        return Conditioning(
            tokens=self.null_tokens,
            owner=torch.full((self.null_tokens.shape[0],), -1, dtype=torch.long),
            added=self.null_added if self.null_added is not None else self.added,
            null_tokens=self.null_tokens,
            null_added=self.null_added,
        )

    def resolved(self) -> Conditioning:
        """What the model is actually fed: the null condition's tokens when this conditioning is empty."""
        return self.null() if self.is_null and self.null_tokens is not None else self

    def with_tokens(self, tokens: Tensor) -> Conditioning:
        """A copy with replaced token embeddings of the same shape (e.g. perturbed for a JVP)."""
        if not isinstance(tokens, Tensor):
            raise TypeError(f"tokens must be a torch.Tensor {tuple(self.tokens.shape)}, got {type(tokens).__name__}")
        if tokens.shape != self.tokens.shape:
            raise ValueError(f"replacement tokens must have shape {tuple(self.tokens.shape)}, got {tuple(tokens.shape)}")
        return Conditioning(
            tokens=tokens,
            owner=self.owner,
            labels=self.labels,
            locations=self.locations,
            added=self.added,
            null_tokens=self.null_tokens,
            null_added=self.null_added,
            attributes=self.attributes,
        )

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Conditioning:
        """Move floating tensors to ``device`` / ``dtype`` (``owner`` stays int64)."""

        def mv(t: Tensor | None) -> Tensor | None:
            if t is None:
                return None
            return t.to(device=device, dtype=dtype if t.is_floating_point() else None)

        return Conditioning(
            tokens=mv(self.tokens),
            owner=self.owner.to(device=device),
            labels=self.labels,
            locations=self.locations,
            added={k: mv(v) for k, v in self.added.items()},
            null_tokens=mv(self.null_tokens),
            null_added=None if self.null_added is None else {k: mv(v) for k, v in self.null_added.items()},
            attributes=self.attributes,
        )

    # ---------------------------------------------------------- construction
    @staticmethod
    def from_embeddings(pipe: Any, **kwargs: Any) -> Conditioning:
        """Build from text embeddings a user already has, with the keyword names of the family's pipeline call.

        ``Conditioning.from_embeddings(pipe, prompt_embeds=..., negative_prompt_embeds=...,
        pooled_prompt_embeds=..., negative_pooled_prompt_embeds=...)`` (SDXL, SD3, Flux; SD1.5/2 without the
        pooled ones; PixArt with ``prompt_attention_mask`` / ``negative_prompt_attention_mask``), optionally
        ``spans=[(start, stop), ...]`` and ``labels=`` for the conditioners (default: the whole prompt is one).
        See :func:`interp.models.prompts.conditioning_from_embeddings`.
        """
        from interp.models.prompts import conditioning_from_embeddings  # the zoo knows the families

        return conditioning_from_embeddings(pipe, **kwargs)

    @staticmethod
    def from_tokens(
        context: Tensor,
        conditioner_tokens: Sequence[Tensor],
        *,
        labels: Sequence[str] | None = None,
        locations: Tensor | Sequence[Sequence[float]] | None = None,
        null_tokens: Tensor | None = None,
        attributes: Mapping[str, Sequence] | None = None,
    ) -> Conditioning:
        """Build from context tokens ``(L0, D)`` and one ``(n_j, D)`` token group per conditioner.

        The context tokens come first (e.g. CLEVR's learned null token), then each conditioner's group
        (a ``(D,)`` group is one token). ``locations`` ``(k, 2)`` keep a floating tensor's dtype (float64 stays
        float64, as probes measure distances with it); sequences become float32.
        """
        _check_tokens("context", context, finite=False)  # values are checked once, as Conditioning.tokens
        if isinstance(conditioner_tokens, Tensor) and conditioner_tokens.dim() == 2:
            # iterating a (k, D) tensor would silently work, but a (n, D) group for ONE conditioner would not
            raise TypeError(
                "conditioner_tokens must be a list with one (n_j, D) or (D,) tensor per conditioner, got one 2-D "
                "tensor; use list(tokens.unbind(0)) for one token per conditioner"
            )
        groups = []
        for j, g in enumerate(conditioner_tokens):
            if not isinstance(g, Tensor) or g.dim() not in (1, 2) or g.shape[-1] != context.shape[1] or (g.dim() == 2 and g.shape[0] == 0):
                shape = tuple(g.shape) if isinstance(g, Tensor) else type(g).__name__
                raise ValueError(
                    f"conditioner_tokens[{j}] must be (n_j, {context.shape[1]}) with n_j >= 1 or ({context.shape[1]},), got {shape}"
                )
            groups.append(g if g.dim() == 2 else g.unsqueeze(0))
        tokens = torch.cat([context, *groups], dim=0) if groups else context
        owner = torch.cat(
            [torch.full((context.shape[0],), -1, dtype=torch.long)]
            + [torch.full((g.shape[0],), j, dtype=torch.long) for j, g in enumerate(groups)]
        )
        if isinstance(labels, str):
            raise TypeError(f"labels must be a list of names, one per conditioner, got the string {labels!r}; pass [{labels!r}]")
        labels = tuple(labels) if labels is not None else tuple(f"c{j}" for j in range(len(groups)))
        if len(labels) != len(groups):
            raise ValueError(f"{len(labels)} labels for {len(groups)} conditioners: pass one label per conditioner")
        if locations is not None:
            locations = _as_locations(locations)
        return Conditioning(
            tokens=tokens,
            owner=owner,
            labels=labels,
            locations=locations,
            null_tokens=null_tokens,
            attributes={k: tuple(v) for k, v in (attributes or {}).items()},
        )


def _as_locations(locations: Tensor | Sequence[Sequence[float]]) -> Tensor:
    """``(k, 2)`` locations as a floating tensor, keeping a floating tensor's own dtype (float64 stays float64).

    Sequences and integer tensors become the default float dtype (float32). The shape is not reshaped:
    a flat ``[x, y]`` is an error, not one location, so a missing bracket cannot pair the wrong numbers.
    """
    loc = locations if isinstance(locations, Tensor) else torch.as_tensor(locations)
    if not loc.is_floating_point():
        if loc.dtype == torch.bool or loc.is_complex():
            raise TypeError(f"locations must be real (x, y) numbers, got {loc.dtype}")
        loc = loc.to(torch.get_default_dtype())
    if loc.numel() == 0 and loc.dim() == 1:
        loc = loc.reshape(0, 2)
    if loc.dim() != 2 or loc.shape[1] != 2:
        raise ValueError(f"locations must be (k, 2) normalised (x, y) pairs, got shape {tuple(loc.shape)}")
    return loc


@dataclass(frozen=True)
class ConditioningBatch:
    """Padded batch of conditionings, ready for a U-Net call.

    Attributes:
        tokens: ``(B, L, D)`` token embeddings, zero-padded.
        mask: ``(B, L)`` bool, True where a token is attended.
        added: per-sample extra inputs stacked to ``(B, ...)``.
        rows: the :class:`Conditioning` each row was built from (``()`` when unknown). Metadata only — the
            U-Net sees ``tokens`` — announced by the Denoiser to edits that need token owners and locations, also
            when the tokens are a traced or perturbed version of the row's own (forward-mode probes).
    """

    tokens: Tensor
    mask: Tensor
    added: dict[str, Tensor]
    rows: tuple[Conditioning, ...] = ()
    #: Whether every token of every row is attended (no padding): read once, when the batch is built, so that
    #: a network call never has to read mask values (e.g. inside a fake-tensor shape pass).
    unpadded: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.tokens, Tensor) or self.tokens.dim() != 3:
            shape = tuple(self.tokens.shape) if isinstance(self.tokens, Tensor) else type(self.tokens).__name__
            raise ValueError(f"ConditioningBatch.tokens must be (B, L, D), got {shape}")
        if not isinstance(self.mask, Tensor) or self.mask.dtype != torch.bool:
            kind = self.mask.dtype if isinstance(self.mask, Tensor) else type(self.mask).__name__
            raise TypeError(f"ConditioningBatch.mask must be a bool tensor (True = attended), got {kind}; use mask.bool()")
        if self.mask.shape != self.tokens.shape[:2]:
            raise ValueError(
                f"ConditioningBatch.mask must be (B, L) = {tuple(self.tokens.shape[:2])}, got {tuple(self.mask.shape)}"
            )
        _check_added("ConditioningBatch.added", self.added)
        if self.rows and len(self.rows) != self.tokens.shape[0]:
            raise ValueError(f"ConditioningBatch.rows must name one Conditioning per row ({self.tokens.shape[0]}), "
                             f"got {len(self.rows)}")
        for key, value in self.added.items():
            if value.dim() == 0 or value.shape[0] != self.tokens.shape[0]:
                raise ValueError(
                    f"ConditioningBatch.added[{key!r}] must have the batch size {self.tokens.shape[0]} first, "
                    f"got shape {tuple(value.shape)}"
                )
        object.__setattr__(self, "unpadded", bool(self.mask.all()))

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    @staticmethod
    def stack(conds: Sequence[Conditioning], *, pad_to: int | None = None) -> ConditioningBatch:
        """Pad ``conds`` (each resolved to the null condition when empty) into one batch."""
        if not conds:
            raise ValueError("cannot batch an empty list of conditionings")
        conds = [c.resolved() for c in conds]
        dims = {c.dim for c in conds}
        if len(dims) != 1:
            raise ValueError(f"conditionings with different token widths {sorted(dims)} cannot be batched")
        length = max(c.tokens.shape[0] for c in conds)
        if pad_to is not None:
            if pad_to < length:
                raise ValueError(f"pad_to={pad_to} is shorter than the longest conditioning ({length} tokens)")
            length = pad_to
        ref = conds[0].tokens
        tokens = ref.new_zeros((len(conds), length, ref.shape[1]))
        mask = torch.zeros((len(conds), length), dtype=torch.bool, device=ref.device)
        for b, c in enumerate(conds):
            n = c.tokens.shape[0]
            tokens[b, :n] = c.tokens
            mask[b, :n] = True
        keys = set(conds[0].added)
        if any(set(c.added) != keys for c in conds):
            raise ValueError("conditionings in one batch must carry the same extra inputs (added)")
        added = {k: torch.stack([c.added[k] for c in conds]) for k in sorted(keys)}
        return ConditioningBatch(tokens=tokens, mask=mask, added=added, rows=tuple(conds))

    def with_tokens(self, tokens: Tensor) -> ConditioningBatch:
        """The same batch (mask, extra inputs, row conditionings) with ``tokens`` ``(B, L, D)`` instead."""
        return ConditioningBatch(tokens=tokens, mask=self.mask, added=self.added, rows=self.rows)

    def repeat(self, n: int) -> ConditioningBatch:
        """Tile every sample ``n`` times along the batch (``[c0, c1, c0, c1, ...]``)."""
        return ConditioningBatch(
            tokens=self.tokens.repeat(n, 1, 1),
            mask=self.mask.repeat(n, 1),
            added={k: v.repeat(n, *([1] * (v.dim() - 1))) for k, v in self.added.items()},
            rows=self.rows * n,
        )

    @staticmethod
    def concat(batches: Sequence[ConditioningBatch]) -> ConditioningBatch:
        """Concatenate batches along the batch dimension, padding token sequences to a common length."""
        length = max(b.tokens.shape[1] for b in batches)

        def pad(t: Tensor, value: float | bool) -> Tensor:
            extra = length - t.shape[1]
            if extra == 0:
                return t
            shape = (t.shape[0], extra, *t.shape[2:])
            return torch.cat([t, t.new_full(shape, value)], dim=1)

        return ConditioningBatch(
            tokens=torch.cat([pad(b.tokens, 0.0) for b in batches]),
            mask=torch.cat([pad(b.mask, False) for b in batches]),
            added={k: torch.cat([b.added[k] for b in batches]) for k in batches[0].added},
            rows=sum((b.rows for b in batches), ()) if all(b.rows for b in batches) else (),
        )
