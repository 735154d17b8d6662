"""Conditioning: set algebra (drop / only / null), batching masks, phrase spans, validation."""

from __future__ import annotations

import pytest
import torch

from interp import Conditioning, ConditioningBatch
from interp.models import prompt_conditioning
from interp.models.sdxl import phrase_spans


def make(k: int = 3) -> Conditioning:
    ctx = torch.full((1, 4), -1.0)
    groups = [torch.full((j + 1, 4), float(j)) for j in range(k)]  # conditioner j owns j+1 tokens of value j
    return Conditioning.from_tokens(ctx, groups, labels=[f"c{j}" for j in range(k)],
                                    locations=[[0.1 * (j + 1), 0.2] for j in range(k)],
                                    attributes={"colour": ["red", "green", "blue"][:k]})


def test_drop_only_null_renumber_and_keep_context():
    c = make(3)
    assert c.k == 3 and c.tokens.shape == (7, 4)
    d = c.drop(1)
    assert d.labels == ("c0", "c2") and d.attributes["colour"] == ("red", "blue")
    assert torch.equal(d.locations, c.locations[[0, 2]])
    assert d.owner.tolist() == [-1, 0, 1, 1, 1]
    assert torch.equal(d.tokens[d.token_indices(1)], torch.full((3, 4), 2.0))
    o = c.only(2)
    assert o.k == 1 and o.owner.tolist() == [-1, 0, 0, 0] and o.labels == ("c2",)
    n = c.null()
    assert n.is_null and n.tokens.shape == (1, 4) and torch.equal(n.tokens, torch.full((1, 4), -1.0))
    assert c.subset([2, 0]).labels == ("c2", "c0")
    assert c.span(2) == (4, 7)


def test_index_and_value_errors():
    c = make(2)
    with pytest.raises(IndexError, match="out of range for a conditioning with 2"):
        c.drop(2)
    with pytest.raises(ValueError, match="Conditioning.tokens contains 1 NaN"):
        Conditioning.from_tokens(torch.tensor([[float("nan")]]), [])
    with pytest.raises(ValueError, match=r"locations must be \(2, 2\)"):
        Conditioning(tokens=c.tokens, owner=c.owner, labels=c.labels, locations=torch.zeros(3, 2))
    with pytest.raises(ValueError, match="owner values"):
        Conditioning(tokens=c.tokens, owner=torch.full_like(c.owner, 5), labels=c.labels)
    with pytest.raises(ValueError, match="different token widths"):
        ConditioningBatch.stack([c, Conditioning.from_tokens(torch.zeros(1, 3), [])])
    with pytest.raises(ValueError, match="empty list"):
        ConditioningBatch.stack([])


def test_batch_pads_and_masks():
    a, b = make(3), make(1)
    batch = ConditioningBatch.stack([a, b])
    assert batch.tokens.shape == (2, 7, 4)
    assert batch.mask.tolist() == [[True] * 7, [True, True] + [False] * 5]
    assert torch.equal(batch.tokens[1, 2:], torch.zeros(5, 4))


def test_padding_mask_is_equivalent_to_removing_tokens(tiny_clevr_pipe):
    """Cross-attention has no positional encoding: a masked token is a removed token."""
    den = tiny_clevr_pipe.denoiser()
    one = tiny_clevr_pipe.conditioning([[0.3, 0.3]])
    three = tiny_clevr_pipe.conditioning([[0.3, 0.3], [0.6, 0.7], [0.8, 0.2]])
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        padded = den(x, 200, [one, three])
        alone = den(x[:1], 200, one)
    assert torch.allclose(padded[:1], alone, atol=1e-5)
    assert not torch.allclose(padded[1:], den(x[1:], 200, one), atol=1e-3)


def test_prompt_phrases_own_their_tokens(tiny_sdxl_pipe):
    tok = tiny_sdxl_pipe.tokenizer
    phrases = ["a red cube", "a blue sphere in watercolor style"]
    spans = phrase_spans(tok, phrases)
    ids = tok(", ".join(phrases)).input_ids
    for phrase, (a, b) in zip(phrases, spans):
        assert tok.decode(ids[a:b]).strip() == phrase
    c = prompt_conditioning(tiny_sdxl_pipe, phrases)
    assert c.k == 2 and c.tokens.shape == (77, 64)
    assert [c.span(j) for j in range(2)] == spans
    assert set(c.added) == {"text_embeds", "time_ids"}
    with pytest.raises(ValueError, match="at least one phrase"):
        prompt_conditioning(tiny_sdxl_pipe, [])
    with pytest.raises(ValueError, match="over CLIP's limit"):
        phrase_spans(tok, ["word " * 80])


def test_token_perturbations_work_under_vmap(tiny_clevr_pipe):
    """JVPs along a batch of token directions (vmap over jvp) must not trip the NaN validation."""
    den = tiny_clevr_pipe.denoiser()
    cond = tiny_clevr_pipe.conditioning([[0.4, 0.5]])
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    dirs = torch.randn(3, *cond.tokens.shape, generator=torch.Generator().manual_seed(1))

    def f(tokens):
        return den(x, 300, cond.with_tokens(tokens))

    def jvp(v):
        return torch.func.jvp(f, (cond.tokens,), (v,))[1]

    from probes import forward_mode_ready  # forward-mode AD needs the plain attention processor

    with torch.no_grad(), forward_mode_ready(den.unet):
        batched = torch.func.vmap(jvp)(dirs)
        eps = 1e-3
        fd = (f(cond.tokens + eps * dirs[1]) - f(cond.tokens - eps * dirs[1])) / (2 * eps)
    assert batched.shape == (3, 1, 3, 32, 32)
    assert torch.allclose(batched[1], fd, atol=5e-3, rtol=5e-2)
