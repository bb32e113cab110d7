"""The UNet and the noisy classifier: shapes across sizes, the null class, parity with the original, learning."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mgdm_core.diffusion.losses import hybrid_loss
from mgdm_core.diffusion.schedule import make_schedule
from mgdm_core.errors import ConfigError
from mgdm_core.networks.blocks import group_norm, norm_groups
from mgdm_core.networks.classifier import ClassifierConfig, NoisyClassifier
from mgdm_core.networks.unet import UNet, UNetConfig, default_unet_config
from mgdm_core.training.loop import train_loop

# The original MGDM / guided-diffusion networks at these configurations (counted from the release's code).
ORIGINAL_UNET_PARAMS = 7.99e6
ORIGINAL_CLASSIFIER_PARAMS = 0.82e6
PARITY_TOLERANCE = 0.10


def reference_unet_config() -> UNetConfig:
    """The original release's 28x28x1 two-class diffusion model."""
    return UNetConfig(
        image_size=28,
        in_channels=1,
        num_classes=2,
        width=64,
        channel_mult=(1, 2, 2),
        num_res_blocks=2,
        attention_resolutions=(14, 7),
        num_heads=4,
        num_head_channels=-1,
        dropout=0.0,
        scale_shift_norm=True,
        resblock_updown=True,
        learn_sigma=True,
    )


def reference_classifier_config(**overrides: object) -> ClassifierConfig:
    """The original release's 28x28x1 two-class noisy classifier."""
    fields: dict[str, object] = dict(
        image_size=28,
        in_channels=1,
        num_classes=2,
        width=32,
        depth=2,
        channel_mult=(1, 2, 2),
        attention_resolutions=(14, 7),
        num_head_channels=64,
        pool="attention",
        scale_shift_norm=True,
        resblock_updown=True,
        dropout=0.0,
    )
    return ClassifierConfig(**{**fields, **overrides})


@pytest.fixture(autouse=True)
def one_thread():
    """Run on one thread: these tensors are tiny, and on a busy 2-core machine OpenMP spin-waiting made
    two threads about 10x slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def parameter_count(module: nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


def timesteps(batch: int) -> torch.Tensor:
    return torch.linspace(0, 999, batch).long()


@pytest.mark.parametrize("image_size", [28, 32, 64])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("learn_sigma", [True, False])
def test_unet_output_has_c_or_2c_channels_at_the_input_size(image_size: int, channels: int, learn_sigma: bool) -> None:
    config = default_unet_config(image_size, channels, 3, width=32, num_res_blocks=1, learn_sigma=learn_sigma)
    model = UNet(config)
    x = torch.randn(2, channels, image_size, image_size)
    out = model(x, timesteps(2), torch.tensor([0, 2]))
    assert out.shape == (2, channels * (2 if learn_sigma else 1), image_size, image_size)


def test_unet_takes_odd_feature_sizes_on_the_way_down_and_up() -> None:
    # 28 -> 14 -> 7 -> 4 -> 2: the 7 -> 4 halving rounds up and the way back must land on 7 again.
    for resblock_updown in (True, False):
        config = default_unet_config(
            28, 1, 2, width=32, num_res_blocks=1, channel_mult=(1, 1, 2, 2, 2),
            attention_resolutions=(7, 4), resblock_updown=resblock_updown,
        )
        assert UNet(config)(torch.randn(2, 1, 28, 28), timesteps(2)).shape == (2, 2, 28, 28)


def test_unet_none_label_is_the_null_class() -> None:
    config = default_unet_config(28, 1, 2, width=32, num_res_blocks=1)
    model = UNet(config).eval()
    # Zero-initialised output convs make every output 0; randomise them so the class matters.
    torch.manual_seed(0)
    for parameter in model.parameters():
        nn.init.normal_(parameter, std=0.05)
    x, t = torch.randn(3, 1, 28, 28), timesteps(3)
    null = torch.full((3,), config.null_class)
    assert config.null_class == 2
    torch.testing.assert_close(model(x, t, None), model(x, t, null))
    assert not torch.allclose(model(x, t, None), model(x, t, torch.zeros(3, dtype=torch.long)))


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"attention_resolutions": (8,)}, "attention_resolutions"),
        ({"channel_mult": (1, 1, 1, 1, 1, 1, 1)}, "channel_mult"),
        ({"num_heads": 3}, "num_heads"),
        ({"kernel": 3}, "kernel"),
    ],
)
def test_impossible_unet_configs_raise_config_error_naming_the_key(overrides: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        default_unet_config(28, 1, 2, **overrides)


def test_default_unet_config_derives_levels_and_attention_from_the_image_size() -> None:
    assert default_unet_config(28, 1, 2).attention_resolutions == (14, 7)
    assert default_unet_config(32, 3, 2).attention_resolutions == (16, 8)
    config_64 = default_unet_config(64, 1, 2)
    assert config_64.channel_mult == (1, 2, 3, 4)
    assert config_64.attention_resolutions == (16, 8)


def test_unet_parameter_count_matches_the_original_within_10_percent() -> None:
    count = parameter_count(UNet(reference_unet_config()))
    print(f"UNet reference parameters: {count:,} (original {ORIGINAL_UNET_PARAMS:,.0f})")
    assert abs(count / ORIGINAL_UNET_PARAMS - 1) < PARITY_TOLERANCE


def test_classifier_parameter_count_matches_the_original_within_10_percent() -> None:
    count = parameter_count(NoisyClassifier(reference_classifier_config()))
    print(f"classifier reference parameters: {count:,} (original {ORIGINAL_CLASSIFIER_PARAMS:,.0f})")
    assert abs(count / ORIGINAL_CLASSIFIER_PARAMS - 1) < PARITY_TOLERANCE


@pytest.mark.parametrize("pool", ["attention", "mean"])
@pytest.mark.parametrize(("image_size", "channels", "attention"), [(28, 1, (14, 7)), (32, 3, (8,)), (64, 1, (16,))])
def test_classifier_gives_logits_and_penultimate_features(
    pool: str, image_size: int, channels: int, attention: tuple[int, ...]
) -> None:
    config = reference_classifier_config(
        pool=pool, image_size=image_size, in_channels=channels, attention_resolutions=attention, num_classes=3
    )
    classifier = NoisyClassifier(config)
    x_t = torch.randn(4, channels, image_size, image_size)
    assert classifier(x_t, timesteps(4)).shape == (4, 3)
    assert classifier.features(x_t, timesteps(4)).shape == (4, config.feature_channels)


def test_classifier_attention_resolution_must_be_a_feature_size() -> None:
    with pytest.raises(ConfigError, match="attention_resolutions"):
        reference_classifier_config(attention_resolutions=(10,))


def test_tiny_unet_hybrid_loss_falls_on_a_toy_set(tmp_path) -> None:
    # Two classes of 8x8 images: a bright square top-left or bottom-right on a dark field.
    images = torch.full((64, 1, 8, 8), -1.0)
    labels = torch.arange(64) % 2
    images[labels == 0, :, 1:4, 1:4] = 1.0
    images[labels == 1, :, 4:7, 4:7] = 1.0
    schedule = make_schedule("linear", 1000)
    config = default_unet_config(
        8, 1, 2, width=32, channel_mult=(1, 2), attention_resolutions=(4,), num_res_blocks=1, dropout=0.0
    )

    def loss_fn(model: nn.Module, step: int, generator: torch.Generator) -> torch.Tensor:
        index = torch.randint(0, 64, (16,), generator=generator)
        t = torch.randint(0, schedule.num_timesteps, (16,), generator=generator)
        noise = torch.randn(16, 1, 8, 8, generator=generator)
        loss, _ = hybrid_loss(model, schedule, images[index], t, labels[index], noise)
        return loss.mean()

    torch.manual_seed(0)
    result = train_loop(
        model=UNet(config), loss_fn=loss_fn, steps=200, lr=2e-3, weight_decay=0.0, ema_decay=0.99,
        device=torch.device("cpu"), seed=0, checkpoint_path=tmp_path / "checkpoint.pt", checkpoint_every=200,
        config=config.model_dump(), kind="diffusion", on_log=None, log_every=50, progress=False,
    )
    # Per-step losses vary with the random timesteps; compare means over 50 steps each.
    first, last = torch.tensor(result.losses[:50]).mean(), torch.tensor(result.losses[-50:]).mean()
    print(f"hybrid loss: first 50 steps {first:.3f}, last 50 steps {last:.3f}")
    assert last < 0.5 * first


def test_group_norm_keeps_at_least_four_channels_per_group_and_the_originals_32_groups_from_128() -> None:
    assert {c: norm_groups(c) for c in (3, 8, 32, 48, 64, 96, 128, 256, 512)} == {
        3: 1, 8: 2, 32: 8, 48: 12, 64: 16, 96: 24, 128: 32, 256: 32, 512: 32,
    }
    assert group_norm(64).num_groups == 16


def test_attention_runs_on_the_fused_cpu_kernel_and_matches_plain_softmax_attention():
    from mgdm_core.networks.blocks import multi_head_attention

    torch.manual_seed(0)
    batch, heads, head_channels, tokens = 2, 2, 4, 16
    qkv = torch.randn(batch, 3 * heads * head_channels, tokens)
    with torch.profiler.profile() as prof:
        out = multi_head_attention(qkv, heads)
    # A strided last dimension silently sends SDPA to its unfused math path (2-3x slower).
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in {e.name for e in prof.events()}
    q, k, v = qkv.reshape(batch, 3, heads, head_channels, tokens).unbind(1)  # [B, heads, ch, T] each
    weights = torch.softmax(torch.einsum("bhct,bhcs->bhts", q, k) / head_channels**0.5, dim=-1)
    expected = torch.einsum("bhts,bhcs->bhct", weights, v).reshape(batch, heads * head_channels, tokens)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_group_norm_on_channels_last_input_matches_the_nchw_kernel_with_scale_shift_folded_in() -> None:
    torch.manual_seed(0)
    norm = group_norm(64)
    nn.init.normal_(norm.weight)
    nn.init.normal_(norm.bias)
    # A large common offset: the statistics must not cancel catastrophically (centred before squaring).
    x = torch.randn(3, 64, 7, 7) * 2 + 30
    scale, shift = torch.randn(3, 64, 1, 1), torch.randn(3, 64, 1, 1)
    expected = norm(x) * (1 + scale) + shift
    out = norm.normalize(x.contiguous(memory_format=torch.channels_last), scale, shift)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_channels_last_unet_is_the_same_function_and_keeps_nhwc_activations_into_every_convolution() -> None:
    torch.manual_seed(0)
    config = reference_unet_config().model_copy(update={"width": 32, "image_size": 14, "channel_mult": (1, 2), "attention_resolutions": (7,)})
    reference = UNet(config).eval()
    with torch.no_grad():  # no zero-initialised branch: every block must contribute
        for parameter in reference.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    nhwc = UNet(config).eval()
    nhwc.load_state_dict(reference.state_dict())
    nhwc.use_channels_last()
    layouts = []
    for module in nhwc.modules():
        if isinstance(module, nn.Conv2d) and module.kernel_size == (3, 3):
            module.register_forward_pre_hook(lambda _, args: layouts.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    x, t, y = torch.randn(4, 1, 14, 14), timesteps(4), torch.tensor([0, 1, 2, 1])
    with torch.no_grad():
        expected, out = reference(x, t, y), nhwc(x, t, y)
    assert out.is_contiguous() and out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    assert layouts and all(layouts)  # a single NCHW activation would mean a layout conversion inside the net
    nhwc.use_channels_last(False)
    torch.testing.assert_close(nhwc(x, t, y), expected, rtol=0, atol=0)
