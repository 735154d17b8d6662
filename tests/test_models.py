"""Model zoo: the real SDXL loader (offline, from a folder), the tiny pipeline, CLEVR save/load."""

from __future__ import annotations

import pytest
import torch

from interp import ClevrPipeline
from interp.models import clevr_pipeline, load_sdxl, sdxl_unet_config, sdxl_unet_meta, tiny_sdxl, validate_locations
from interp.models.registry import load_model


def _latents(pipe, seed=0):
    return pipe("a red cube, a blue sphere", num_inference_steps=2, output_type="latent",
                generator=torch.Generator().manual_seed(seed)).images


def test_tiny_sdxl_is_deterministic_and_survives_save_and_load(tmp_path):
    a, b = tiny_sdxl(0), tiny_sdxl(0)
    with torch.no_grad():
        la, lb = _latents(a), _latents(b)
        assert torch.equal(la, lb)
        a.save_pretrained(tmp_path / "tiny")
        loaded = load_sdxl(str(tmp_path / "tiny"), dtype=torch.float32, device="cpu")
        for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
            saved, back = getattr(a, name).state_dict(), getattr(loaded, name).state_dict()
            assert saved.keys() == back.keys() and all(torch.equal(saved[k], back[k]) for k in saved)
        assert torch.equal(_latents(loaded), la)  # needs aligned weight storage (interp.models.alignment)
        assert not torch.equal(_latents(tiny_sdxl(1)), la)
    assert (tmp_path / "tiny" / "unet" / "diffusion_pytorch_model.safetensors").exists()


def test_load_sdxl_explains_a_missing_model(tmp_path):
    with pytest.raises(OSError, match="save_pretrained"):
        load_sdxl(str(tmp_path / "nowhere"), dtype=torch.float32, device="cpu")


def test_full_sdxl_config_builds_the_real_tree_on_meta():
    unet = sdxl_unet_meta()
    n = sum(p.numel() for p in unet.parameters())
    assert 2.5e9 < n < 2.7e9  # SDXL-base's U-Net has 2.567B parameters
    assert all(p.device.type == "meta" for p in unet.parameters())
    assert sdxl_unet_config()["cross_attention_dim"] == 2048


def test_clevr_pipeline_round_trips(tmp_path):
    pipe = clevr_pipeline("tiny", seed=3)
    pipe.save_pretrained(tmp_path / "clevr")
    again = ClevrPipeline.from_pretrained(tmp_path / "clevr")
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        c1, c2 = pipe.conditioning([[0.2, 0.4]]), again.conditioning([[0.2, 0.4]])
        assert torch.equal(c1.tokens, c2.tokens)
        assert torch.equal(pipe.denoiser()(x, 50, c1), again.denoiser()(x, 50, c2))
    assert load_model(str(tmp_path / "clevr")).family == "clevr"


def test_location_encoder_gives_one_token_per_object_plus_null(tiny_clevr_pipe):
    enc = tiny_clevr_pipe.location_encoder
    tokens, mask = enc(torch.rand(2, 3, 2), torch.tensor([[True, True, False], [True, False, False]]))
    assert tokens.shape == (2, 4, 32) and mask.tolist() == [[True, True, True, False], [True, True, False, False]]
    assert torch.equal(tokens[0, 0], tokens[1, 0])  # the learned null token
    c = tiny_clevr_pipe.conditioning([[0.1, 0.2], [0.9, 0.8]])
    assert c.k == 2 and c.owner.tolist() == [-1, 0, 1] and torch.allclose(c.locations, torch.tensor([[0.1, 0.2], [0.9, 0.8]]))


def test_location_validation():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        validate_locations([[0.5, 1.2]])
    with pytest.raises(ValueError, match=r"\(k, 2\)"):
        validate_locations([[0.5, 0.2, 0.1]])
    with pytest.raises(ValueError, match="maximum of 3"):
        validate_locations(torch.rand(4, 2), max_objects=3)
    assert validate_locations([]).shape == (0, 2)


def test_unknown_model_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="tiny-clevr"):
        load_model("exp9")
