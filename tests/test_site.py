"""Sites: resolution by path and glob (on the real full-size SDXL module tree), close-match errors, selection."""

from __future__ import annotations

import pytest
import torch

from interp import Site, SiteError
from interp.models import sdxl_unet_meta
from interp.site import resolve_paths, spatial_view


@pytest.fixture(scope="module")
def sdxl_meta():
    return sdxl_unet_meta()


def test_full_sdxl_tree_resolves_real_paths(sdxl_meta):
    attn2 = resolve_paths(sdxl_meta, "*.attn2")
    # SDXL-base: down 2x2 + 2x10, mid 10, up 3x10 + 3x2 transformer blocks = 70 cross-attentions.
    assert len(attn2) == 70
    assert all(p.endswith("attn2") for p, _ in attn2)
    assert resolve_paths(sdxl_meta, "up_blocks.1.attentions.0")[0][0] == "up_blocks.1.attentions.0"
    assert len(Site("down_blocks.2.attentions.*.transformer_blocks.9").resolve(sdxl_meta)) == 2


def test_down_blocks_0_has_no_attention(sdxl_meta):
    with pytest.raises(SiteError):
        resolve_paths(sdxl_meta, "down_blocks.0.attentions.0")


def test_unknown_path_lists_close_matches(sdxl_meta):
    with pytest.raises(SiteError) as err:
        resolve_paths(sdxl_meta, "up_blocks.1.attention.0")
    msg = str(err.value)
    assert "up_blocks.1.attentions.0" in msg and "Closest real paths" in msg
    with pytest.raises(SiteError, match="mid_block.attentions.0"):
        resolve_paths(sdxl_meta, "mid_block.attentions.O")
    with pytest.raises(SiteError, match="attn2"):
        resolve_paths(sdxl_meta, "*.attn3")


def test_step_and_branch_selectors():
    s = Site("x", steps=slice(2, 10, 3), branch="cond")
    assert [i for i in range(12) if s.applies(i, "cond")] == [2, 5, 8]
    assert not s.applies(2, "uncond") and not s.applies(None, "cond")
    assert Site("x", steps=[0, 7]).applies(7, "uncond")
    assert Site("x").applies(None, "anything")


def test_region_and_channels_select_the_right_cells():
    act = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    s = Site("x", region=(0.0, 0.5, 0.5, 1.0), channels=[2])
    out = s.select(act)
    assert out.shape == (2, 1, 4, 4) and torch.equal(out, act[:, 2:3, :4, 4:])
    tokens = act.flatten(2).transpose(1, 2)  # (B, N, C) as attention modules emit
    assert torch.equal(spatial_view(tokens, (32, 32)), act)
    assert torch.equal(Site("x", region=(0.0, 0.5, 0.5, 1.0)).select(tokens, (32, 32)), act[:, :, :4, 4:])
    with pytest.raises(ValueError, match="region"):
        Site("x", region=(0.5, 0.2, 0, 1))
    with pytest.raises(ValueError, match="grid"):
        spatial_view(torch.zeros(1, 7, 3), (32, 32))


@pytest.mark.parametrize("branch", ["uncnd", "conditional", ["cond", "unc"], [], 3])
def test_branch_typos_are_refused_naming_the_valid_branches(branch):
    with pytest.raises((ValueError, TypeError), match="branch") as err:
        Site("x", branch=branch)
    if isinstance(err.value, ValueError):
        assert "'uncond', 'cond', 'guided'" in str(err.value)


@pytest.mark.parametrize(
    "steps",
    [-1, 1.5, "3", True, [0, -2], [0, 1.0], [], slice(-3, None), slice(0, 10, 0), slice(0.5, 3), range(5, 2), range(3, -1, -1)],
)
def test_bad_step_selectors_are_refused(steps):
    with pytest.raises((ValueError, TypeError), match="Site.steps"):
        Site("x", steps=steps)


@pytest.mark.parametrize("channels", [3, -1, [0, -1], ["a"], [], 2.0])
def test_bad_channel_selectors_are_refused(channels):
    with pytest.raises((ValueError, TypeError), match="Site.channels"):
        Site("x", channels=channels)


def test_good_selectors_are_kept_and_lists_become_tuples():
    assert Site("x", steps=[3, 1]).steps == (3, 1) and Site("x", steps=range(0, 10, 2)).applies(4, "cond")
    assert Site("x", steps=torch.tensor([2])).applies(2, "cond")
    assert Site("x", branch=["uncond", "cond"]).branch == ("uncond", "cond")
    assert Site("x", channels=slice(0, 2)).channels == slice(0, 2) and Site("x", channels=[1]).channels == (1,)
    assert Site("x", steps=[1, 3]) == Site("x", steps=(1, 3))
    assert not Site("x").selective and Site("x", branch="cond").selective and Site("x", steps=0).selective
