"""Token streams: which tensor of a transformer module's output is the *image* and which the *text*.

A U-Net block has one output, a feature map. The dual-stream blocks of SD3 (``JointTransformerBlock``) and Flux
(``FluxTransformerBlock``) carry two token sequences side by side and return both — ``(text, image)`` from the
blocks, ``(image, text)`` from their joint attention — and Flux's single-stream blocks run on the two
concatenated (``[text; image]``). "The first tensor of the output" therefore means different streams at
different sites; a site must say which it wants (:attr:`interp.Site.stream`), and the image stream is the
default because that is what a U-Net site means.

The streams are told apart by their *lengths*, known from the network call: the image stream holds one token
per latent patch (``h × w``, :class:`TokenLayout`), the text stream one per encoder token. When the two lengths
coincide the output is ambiguous and is refused, never guessed. Image tokens are patches in row-major order
(every diffusers patch embedding and Flux's 2×2 packing flatten them so), so :func:`interp.site.spatial_view`
maps them back to their grid and a ``region`` means the same part of the image as on a U-Net.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from interp.hooks import iter_tensors, primary_tensor

Stream = Literal["image", "text"]
STREAMS = ("image", "text")


@dataclass(frozen=True)
class TokenLayout:
    """Token counts of one transformer call.

    Attributes:
        image: the number of image tokens (latent patches, ``h × w``).
        text: the number of text tokens, or ``None`` for a network without a text stream.
        joint_order: the order of the two streams in a concatenated sequence (Flux: text first).
    """

    image: int
    text: int | None = None
    joint_order: tuple[str, str] = ("text", "image")


class StreamError(ValueError):
    """A site's stream cannot be read from a module output (absent, or ambiguous)."""


def check_stream(stream: object) -> Stream | None:
    """``stream`` validated: ``"image"``, ``"text"`` or ``None`` (the image stream where there is a choice)."""
    if stream is not None and stream not in STREAMS:
        raise ValueError(f"Site.stream must be 'image', 'text' or None (image), got {stream!r}")
    return stream  # type: ignore[return-value]


def _locate(output: Any, stream: Stream | None, layout: TokenLayout | None, path: str) -> tuple[Tensor, slice | None]:
    """The output tensor holding ``stream``, and its token range when it is part of a concatenated sequence."""
    if layout is None or layout.text is None:
        if stream == "text":
            raise StreamError(f"site {path!r}: this network has no text token stream; drop stream='text'")
        return primary_tensor(output), None
    tokens = [t for t in iter_tensors(output) if t.dim() == 3]
    image = [t for t in tokens if t.shape[1] == layout.image]
    text = [t for t in tokens if t.shape[1] == layout.text]
    joint = [t for t in tokens if t.shape[1] == layout.image + layout.text]
    if image and text:
        if layout.image == layout.text:
            raise StreamError(
                f"site {path!r} holds two token sequences of {layout.image} tokens each: the image and text streams "
                "cannot be told apart by length. Sample at another size or pad the prompt to another length"
            )
        return (image if stream != "text" else text)[0], None
    if joint and not (image or text):
        # One concatenated sequence (Flux single-stream blocks): the stream is a token range of it.
        first = layout.joint_order[0]
        n_first = layout.text if first == "text" else layout.image
        want = stream or "image"
        return joint[0], slice(0, n_first) if want == first else slice(n_first, None)
    if stream is not None:
        found = text if stream == "text" else image
        if found:
            return found[0], None
        want = layout.text if stream == "text" else layout.image
        raise StreamError(f"site {path!r} holds no {stream} stream (token counts {[t.shape[1] for t in tokens]}, "
                          f"the {stream} stream has {want}); pick the other stream or a dual-stream block")
    return primary_tensor(output), None


def pick_stream(output: Any, stream: Stream | None, layout: TokenLayout | None, *, path: str = "") -> Tensor:
    """The tensor of ``stream`` in a module ``output`` (``(B, N, C)`` tokens, or the primary tensor).

    Args:
        output: what the module returned (a tensor, a tuple, a ``BaseOutput``).
        stream: ``"image"``, ``"text"``, or ``None`` (image where the output holds both, else the primary tensor).
        layout: the call's token counts; ``None`` for networks without token streams (U-Nets).
        path: the module path, for messages.

    Raises:
        StreamError: ``"text"`` asked where there is no text stream, or two streams of equal length.
    """
    tensor, tokens = _locate(output, stream, layout, path)
    return tensor if tokens is None else tensor[:, tokens]


def replace_stream(output: Any, stream: Stream | None, layout: TokenLayout | None, new: Tensor, *, path: str = "") -> Any:
    """``output`` with the tensor :func:`pick_stream` selects replaced by ``new`` (same container type).

    A stream that is one element of a tuple takes that element's place; a stream that is a token range of a
    concatenated sequence is written into a new sequence (the model's own tensor is never modified in place).
    """
    from interp.hooks import replace_primary

    old, tokens = _locate(output, stream, layout, path)
    if tokens is not None:
        new = torch.cat([old[:, : tokens.start], new], 1) if tokens.start else torch.cat([new, old[:, tokens.stop:]], 1)
    if isinstance(output, Tensor):
        return new
    if isinstance(output, (tuple, list)):
        items = list(output)
        for i, item in enumerate(items):
            if item is old:
                items[i] = new
                return tuple(items) if isinstance(output, tuple) else items
    return replace_primary(output, new)
