"""Hook hygiene as a generated property (captum's ``test_hook_removal.py`` style).

For every verb that touches a model × every way of leaving it — a normal return, an exception raised in the
``with`` block, an exception raised inside the model's forward (from a hook), ``KeyboardInterrupt`` there, and a
generator closed early while inside the block — the model must come back exactly as it was: no hook left on any
module, the same attention processor objects, the same SDPA backend selection, the same ``requires_grad`` and
grad mode, and outputs bit-identical to the clean model's.

New verbs join by adding one entry to ``CONTEXT_VERBS`` or ``FUNCTION_VERBS``; every intervention edit type
(``interventions.Patch`` with each kind of source, ``MaskCrossAttention``, ``Compose``, ``ComposeScores``) is one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import pytest
import torch

import interventions as iv
import probes
from interp import Site, count_hooks, sample
from interp.capture import capture, capture_run, plan_capture, read_activation
from interp.forward_mode import forward_mode_ready, sdpa_backends
from interp.models import clevr_pipeline


class Injected(RuntimeError):
    """The failure this suite raises on purpose."""


@pytest.fixture(scope="module")
def model():
    pipe = clevr_pipeline("tiny", seed=0)
    den = pipe.denoiser()
    cond = pipe.conditioning([[0.25, 0.3], [0.7, 0.65]])
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return den, cond, x


def snapshot(den) -> dict:
    from interventions import applied as live

    unet = den.unet
    procs = {name: id(p) for name, p in getattr(unet, "attn_processors", {}).items()}
    return {
        "live_edits": (len(live._ACTIVE.get()), len(live._EDITED)),  # interventions' own registries emptied
        "hooks": count_hooks(unet),
        "processors": procs,
        "sdpa": sdpa_backends(),
        "requires_grad": [p.requires_grad for p in unet.parameters()],
        "grad_mode": torch.is_grad_enabled(),
        "training": unet.training,
    }


def clean_output(den, cond, x) -> torch.Tensor:
    with torch.no_grad():
        return den.predict(x, 500, cond)


# --------------------------------------------------------------------------- verbs
# Each verb runs ``body()`` somewhere inside its model-touching region (for context managers: inside the
# ``with``; for functions: ``body`` is unused and failures come from inside the forward).

ContextVerb = Callable[..., contextlib.AbstractContextManager]


def _capture(den, cond, x):
    return capture(den, ["*attn2", "mid_block"])


def _capture_disk(den, cond, x, tmp_path):
    return capture(den, "*attn2", store=tmp_path / "store")


def _forward_mode(den, cond, x):
    return forward_mode_ready(den.unet)


def _patch_from_store(den, cond, x):
    """Patch from a store recorded here (blocks, attn2 and the U-Net output), plus a zero-ablation of a channel."""
    with iv.record(den, ["mid_block", "*attn2", "output"]) as rec, torch.no_grad():
        den.predict(x, 500, cond)
    return iv.apply(den, iv.Patch(["mid_block", "*attn2", "output"], iv.FromStore(rec.store)),
                    iv.Patch("down_blocks.1", iv.Zero(), channels=[0]))


CONTEXT_VERBS: dict[str, Callable] = {
    "capture": _capture,
    "capture_disk": _capture_disk,
    "forward_mode_ready": _forward_mode,
    "apply_patch": _patch_from_store,
    "apply_patch_fn_region": lambda den, cond, x: iv.apply(
        den, iv.Patch("*attn2", iv.Fn(lambda a, call: -a), region=(0.0, 0.5, 0.0, 0.5))),
    "apply_mask_cross_attention": lambda den, cond, x: iv.apply(den, iv.MaskCrossAttention("*attn2", radius=0.2)),
    "apply_compose": lambda den, cond, x: iv.apply(den, iv.Compose(["mid_block", "up_blocks.*attn2"], radius=0.2)),
    "apply_compose_scores": lambda den, cond, x: iv.apply(den, iv.ComposeScores(radius=0.2, soft=0.05)),
    "apply_all_edits": lambda den, cond, x: iv.apply(
        den, iv.Patch("down_blocks.1", iv.Zero()), iv.MaskCrossAttention("up_blocks.*attn2", radius=0.2),
        iv.Compose("mid_block", radius=0.2), iv.ComposeScores(radius=0.2)),
}

FUNCTION_VERBS: dict[str, Callable] = {
    "sample_under_capture": lambda den, cond, x: _sample_captured(den, cond),
    "read_activation": lambda den, cond, x: read_activation(den, "mid_block", cond, x_t=x, t=0.5),
    "pixel_jacobian": lambda den, cond, x: probes.pixel_jacobian(den, cond, x_t=x, t=0.5, pixels=[(3, 4)]),
    "pixel_jacobian_derivative_ready": lambda den, cond, x: probes.pixel_jacobian(
        den, cond, x_t=x, t=0.5, pixels=[(3, 4)], derivative_ready=True),
    "pixel_locality": lambda den, cond, x: probes.pixel_locality(den, cond, t=0.5, seeds=1, pixels=[(5, 5)]),
    "conditional_locality": lambda den, cond, x: probes.conditional_locality(
        den, cond, t=0.5, seeds=1, directions=1, maps=("jvp", "ablation", "attribution")),
    "cpc_residual": lambda den, cond, x: probes.cpc_residual(den, cond, t=0.5, seeds=1),
    "feature_dependence": lambda den, cond, x: probes.feature_dependence(
        den, "mid_block", cond, t=0.5, seeds=1, directions=1),
    "integrated_gradients": lambda den, cond, x: probes.integrated_gradients_map(
        den, cond, t=0.5, seeds=1, pixels=[(5, 5)], n_steps=2),
    "compressed_jacobian": lambda den, cond, x: probes.compressed_jacobian(
        den, cond, x_t=x, t=0.5, radius_px=1, fallback=False),
    "conditioner_jvp": lambda den, cond, x: _jvp(den, cond, x),
    "concept_cosines": lambda den, cond, x: probes.concept_cosines(
        den, "mid_block", {"a": cond.only(0), "b": cond.only(1)}, t=0.5, seeds=1),
    "locality_sweep": lambda den, cond, x: probes.locality_sweep(
        den, cond, sites=["output", "mid_block"], t=[0.5], seeds=1, directions=1),
    "plan_capture": lambda den, cond, x: plan_capture(den, "*attn2", sample_shape=(1, 3, 32, 32)),
    "capture_nnsight": lambda den, cond, x: capture_run(
        den, "mid_block", lambda: den.predict(x, 500, cond), backend="nnsight", calls=1),
    "effect": lambda den, cond, x: iv.effect(den, iv.MaskCrossAttention(radius=0.2), cond, t=0.5, seeds=1),
    "patching_sweep": lambda den, cond, x: iv.patching_sweep(
        den, cond, cond.only(0), ["mid_block"], [0], shape=(1, 3, 32, 32), num_steps=1),
}


def _jvp(den, cond, x):
    with forward_mode_ready(den.unet):
        return probes.conditioner_jvp(den, cond, torch.ones(1, *cond.tokens.shape), x_t=x, t=0.5)


def _sample_captured(den, cond):
    with capture(den, "*attn2"):
        return sample(den, cond, shape=(1, 3, 32, 32), num_steps=2, seed=0)


@contextlib.contextmanager
def failing_forward(den, exc: type[BaseException]) -> Iterator[None]:
    """Raise ``exc`` from inside the U-Net's forward (a hook on a deep module), removed afterwards."""

    def boom(module, args, output):
        raise exc("injected")

    handle = den.unet.mid_block.register_forward_hook(boom)
    try:
        yield
    finally:
        handle.remove()


def assert_restored(den, cond, x, before: dict, reference: torch.Tensor) -> None:
    assert snapshot(den) == before
    assert torch.equal(clean_output(den, cond, x), reference)


# --------------------------------------------------------------------------- the property


@pytest.mark.parametrize("verb", sorted(FUNCTION_VERBS))
@pytest.mark.parametrize("exit_path", ["normal", "exception_in_forward", "keyboard_interrupt_in_forward"])
def test_function_verbs_leave_the_model_as_they_found_it(model, verb, exit_path):
    den, cond, x = model
    before, reference = snapshot(den), clean_output(den, cond, x)
    run = FUNCTION_VERBS[verb]
    if exit_path == "normal":
        run(den, cond, x)
    else:
        exc = Injected if exit_path == "exception_in_forward" else KeyboardInterrupt
        with failing_forward(den, exc), pytest.raises(exc):
            run(den, cond, x)
    assert_restored(den, cond, x, before, reference)


@pytest.mark.parametrize("verb", sorted(CONTEXT_VERBS))
@pytest.mark.parametrize(
    "exit_path", ["normal", "exception_in_block", "exception_in_forward", "keyboard_interrupt", "generator_closed"]
)
def test_context_verbs_leave_the_model_as_they_found_it(model, verb, exit_path, tmp_path):
    den, cond, x = model
    before, reference = snapshot(den), clean_output(den, cond, x)
    make = CONTEXT_VERBS[verb]
    args = (den, cond, x, tmp_path) if verb == "capture_disk" else (den, cond, x)

    def forward() -> None:
        with torch.no_grad():
            den.predict(x, 500, cond)

    if exit_path == "normal":
        with make(*args):
            forward()
    elif exit_path == "exception_in_block":
        with pytest.raises(Injected), make(*args):
            forward()
            raise Injected("in block")
    elif exit_path == "exception_in_forward":
        with pytest.raises(Injected), make(*args), failing_forward(den, Injected):
            forward()
    elif exit_path == "keyboard_interrupt":
        with pytest.raises(KeyboardInterrupt), make(*args):
            raise KeyboardInterrupt
    else:

        def gen():
            with make(*args):
                forward()
                yield "inside"
                forward()  # never reached: the generator is closed while suspended inside the block

        g = gen()
        assert next(g) == "inside"
        g.close()
    assert_restored(den, cond, x, before, reference)


def test_forward_mode_contexts_closed_out_of_order_restore_everything(model):
    """Two contexts entered A, B and closed A, B (not LIFO): the last exit restores the SDPA backends."""
    den, cond, x = model
    before, reference = snapshot(den), clean_output(den, cond, x)
    a, b = forward_mode_ready(den.unet), forward_mode_ready(den.unet)
    a.__enter__()
    b.__enter__()
    assert sdpa_backends() != before["sdpa"]  # math only while any context is open
    a.__exit__(None, None, None)
    assert sdpa_backends() != before["sdpa"]  # b is still open
    b.__exit__(None, None, None)
    assert_restored(den, cond, x, before, reference)


def test_forward_mode_keeps_a_users_own_attention_processor(model):
    """A custom processor stays installed while differentiating, so the probe measures the user's network."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    den, cond, x = model

    class Scaled(AttnProcessor2_0):
        """A user's processor that changes the function (scales attention outputs by 0.5)."""

        def __call__(self, attn, hidden_states, *args, **kwargs):
            return 0.5 * super().__call__(attn, hidden_states, *args, **kwargs)

    original = dict(den.unet.attn_processors)
    den.unet.set_attn_processor(Scaled())
    try:
        with torch.no_grad():
            custom = den.predict(x, 500, cond)
        installed = dict(den.unet.attn_processors)
        with forward_mode_ready(den.unet), torch.no_grad():
            assert {k: id(v) for k, v in den.unet.attn_processors.items()} == {k: id(v) for k, v in installed.items()}
            inside = den.predict(x, 500, cond)
        torch.testing.assert_close(inside, custom, rtol=1e-5, atol=1e-6)  # math vs fused SDPA rounding only
        assert not torch.allclose(inside, clean_output_with(den, original, cond, x), atol=1e-4)
    finally:
        den.unet.set_attn_processor(original)


def clean_output_with(den, processors, cond, x) -> torch.Tensor:
    current = dict(den.unet.attn_processors)
    den.unet.set_attn_processor(dict(processors))
    try:
        return clean_output(den, cond, x)
    finally:
        den.unet.set_attn_processor(current)


def test_processor_swaps_restore_the_exact_object_and_refuse_a_second_live_swap(model):
    from diffusers.models.attention_processor import AttnProcessor

    from interp.hooks import HookSet, ProcessorConflictError

    den, cond, x = model
    attn = den.unet.mid_block.attentions[0].transformer_blocks[0].attn2
    original = attn.processor
    with HookSet() as a:
        a.swap_processor(attn, AttnProcessor())
        assert attn.processor is not original
        with HookSet() as b, pytest.raises(ProcessorConflictError):
            b.swap_processor(attn, AttnProcessor())
    assert attn.processor is original
    with HookSet() as again:  # the module is free again once the first swap is undone
        again.swap_processor(attn, AttnProcessor())
    assert attn.processor is original


def test_the_denoiser_announces_each_rows_conditioning(model):
    """Edits inside the network read which conditioning each batch row carries (batched CFG: nulls, then conds)."""
    from interp.context import current_call

    den, cond, x = model
    seen = []
    handle = den.unet.register_forward_pre_hook(lambda m, a: seen.append(current_call().conditionings))
    try:
        with torch.no_grad():
            den.predict(x, 500, cond)
            den.branches(x, 500, cond)
    finally:
        handle.remove()
    assert seen[0] == (cond,)
    assert len(seen[1]) == 2 and seen[1][0].is_null and seen[1][1] is cond


# --------------------------------------------------------------------------- transformers (SD3: dual-stream blocks)

TRANSFORMER_VERBS: dict[str, Callable] = {
    "capture_streams": lambda den, cond, x: capture(
        den, [Site("transformer_blocks.0"), Site("transformer_blocks.1", stream="image"),
              Site("transformer_blocks.0.attn", stream="text")]),
    "forward_mode_ready": lambda den, cond, x: forward_mode_ready(den.unet),
    "apply_patch_image_stream": lambda den, cond, x: iv.apply(
        den, iv.Patch("transformer_blocks.0", iv.Fn(lambda a, call: -a), region=(0.0, 0.5, 0.0, 0.5))),
}


@pytest.fixture(scope="module")
def transformer_model():
    from interp import Denoiser
    from interp.models import prompt_conditioning, tiny

    pipe = tiny("sd3", 0)
    with torch.no_grad():
        cond = prompt_conditioning(pipe, ["a red cube", "a blue sphere"])
    return Denoiser(pipe), cond, torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("verb", sorted(TRANSFORMER_VERBS))
@pytest.mark.parametrize("exit_path", ["normal", "exception_in_block", "exception_in_forward", "keyboard_interrupt"])
def test_transformer_verbs_leave_the_model_as_they_found_it(transformer_model, verb, exit_path):
    den, cond, x = transformer_model
    before, reference = snapshot(den), clean_output(den, cond, x)

    def forward() -> None:
        with torch.no_grad():
            den.predict(x, 500, cond)

    @contextlib.contextmanager
    def failing() -> Iterator[None]:
        handle = den.unet.transformer_blocks[1].register_forward_hook(lambda m, a, o: (_ for _ in ()).throw(Injected()))
        try:
            yield
        finally:
            handle.remove()

    make = TRANSFORMER_VERBS[verb]
    if exit_path == "normal":
        with make(den, cond, x):
            forward()
    elif exit_path == "exception_in_block":
        with pytest.raises(Injected), make(den, cond, x):
            forward()
            raise Injected("in block")
    elif exit_path == "exception_in_forward":
        with pytest.raises(Injected), make(den, cond, x), failing():
            forward()
    else:
        with pytest.raises(KeyboardInterrupt), make(den, cond, x):
            raise KeyboardInterrupt
    assert_restored(den, cond, x, before, reference)
