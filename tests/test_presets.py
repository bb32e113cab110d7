"""Network sizes per image size: `auto` keys take the preset, explicit keys win, every size builds."""

from __future__ import annotations

import pytest
import torch

from mgdm_core.config import load_params
from mgdm_core.errors import ConfigError
from mgdm_core.layout import Layout
from mgdm_core.networks.classifier import NoisyClassifier
from mgdm_core.networks.presets import classifier_preset, unet_preset
from mgdm_core.networks.unet import UNet
from mgdm_core.stages import prepare
from mgdm_core.stages.common import classifier_config, unet_config
from mgdm_core.tracking import NullTracker

AUTO = {f"{section}.{key}": "auto" for section in ("diffusion", "classifier")
        for key in ("width", "channel_mult", "attention_resolutions")}


@pytest.fixture()
def auto_params(repo_root):
    return load_params(repo_root / "params.yaml").with_overrides(AUTO)


@pytest.mark.parametrize(
    ("size", "levels", "attention"),
    [(28, [28, 14, 7], (14, 7)), (32, [32, 16, 8], (16, 8)), (64, [64, 32, 16, 8], (16, 8)),
     (128, [128, 64, 32, 16, 8], (16, 8))],
)
@pytest.mark.parametrize("channels", [1, 3])
def test_auto_network_sizes_follow_the_image_size(auto_params, size, levels, attention, channels):
    unet = unet_config(auto_params, size, channels, 10)
    classifier = classifier_config(auto_params, size, channels, 10)
    assert len(unet.channel_mult) == len(levels) == len(classifier.channel_mult)
    assert unet.attention_resolutions == attention == classifier.attention_resolutions
    assert (unet.width, unet.channel_mult) == (unet_preset(size)["width"], unet_preset(size)["channel_mult"])
    assert classifier.width == classifier_preset(size)["width"]


def test_explicit_sizes_win_over_the_preset(auto_params):
    params = auto_params.with_overrides({"diffusion.width": 32, "diffusion.channel_mult": [1, 2],
                                         "classifier.channel_mult": [1, 1, 2]})
    unet = unet_config(params, 64, 3, 5)
    assert (unet.width, unet.channel_mult, unet.attention_resolutions) == (32, (1, 2), (64, 32))
    classifier = classifier_config(params, 64, 3, 5)
    assert classifier.channel_mult == (1, 1, 2) and classifier.attention_resolutions == (32, 16)


def test_null_means_auto(repo_root):
    params = load_params(repo_root / "params.yaml").with_overrides(
        {"diffusion.channel_mult": None, "diffusion.attention_resolutions": None})
    config = unet_config(params, 64, 1, 2)
    assert config.channel_mult == unet_preset(64)["channel_mult"] and config.attention_resolutions == (16, 8)
    assert config.width == params.diffusion.width  # params.yaml's explicit width stays


@pytest.mark.parametrize("size", [28, 32, 64, 128])
def test_preset_level_structure_runs_forward_at_every_size(auto_params, size):
    """The preset levels and attention at a narrow width (the preset widths cost minutes at 128 px on a CPU)."""
    narrow = auto_params.with_overrides({"diffusion.width": 32, "diffusion.num_res_blocks": 1, "classifier.width": 32,
                                         "classifier.depth": 1, "classifier.head_channels": 32})
    torch.manual_seed(0)
    unet = UNet(unet_config(narrow, size, 3, 10)).eval()
    classifier = NoisyClassifier(classifier_config(narrow, size, 3, 10)).eval()
    x = torch.randn(2, 3, size, size)
    t = torch.tensor([0, 999])
    with torch.no_grad():
        assert unet(x, t, torch.tensor([0, 9])).shape == (2, 6, size, size)
        assert classifier(x, t).shape == (2, 10)


def test_the_committed_parameters_give_the_demo_shapes_at_28_px_and_follow_other_sizes(repo_root):
    """params.yaml keeps the demo's 28 px networks and builds at any other size without an edit."""
    params = load_params(repo_root / "params.yaml")
    for config in (unet_config(params, 28, 1, 2), classifier_config(params, 28, 1, 2)):
        assert (config.width, config.channel_mult, config.attention_resolutions) == (32, (1, 2, 2), (7,))
    for config in (unet_config(params, 64, 3, 5), classifier_config(params, 64, 3, 5)):
        assert (config.channel_mult, config.attention_resolutions) == ((1, 2, 3, 4), (8,))


def test_the_committed_parameters_prepare_64_px_data(repo_root, tmp_path):
    """A user who only sets data.image_size: 64 is not refused (the pinned 28 px shapes were)."""
    params = load_params(repo_root / "params.yaml").with_overrides(
        {"data.image_size": 64, "data.phantom_counts": [24, 16], "generate.mode": "balance"})
    prepare.run(params, Layout(tmp_path), NullTracker())
    assert Layout(tmp_path).split_file("train").exists()


def test_coarsest_attention_is_the_last_level_of_any_layout(auto_params):
    params = auto_params.with_overrides({"diffusion.channel_mult": [1, 2], "diffusion.attention_resolutions": "coarsest",
                                         "classifier.attention_resolutions": "coarsest"})
    assert unet_config(params, 64, 1, 2).attention_resolutions == (32,)
    assert classifier_config(params, 128, 1, 2).attention_resolutions == (8,)


def test_an_attention_size_the_network_lacks_names_the_size_independent_choices(repo_root):
    params = load_params(repo_root / "params.yaml").with_overrides({"diffusion.attention_resolutions": [7]})
    with pytest.raises(ConfigError, match="coarsest / auto"):
        unet_config(params, 64, 1, 2)
