"""The U-Net: shapes for several encoders/channels/sizes, fastai's parameter count, ICNR, groups, weights, CLI."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from typer.testing import CliRunner

from cellseg.errors import ConfigError
from cellseg.model import build_model
from cellseg.model.layers import PixelShuffleICNR
from cellseg.model.weights import adapt_first_conv

FASTAI_RESNET34_PARAMS = 41_221_168  # fastai 2.8.12 create_unet_model(resnet34, n_out=2, img_size=(400, 400))


@pytest.mark.parametrize(
    ("encoder", "in_channels", "num_classes", "size"),
    [
        ("resnet34", 3, 2, 64),
        ("resnet34", 5, 2, 100),  # not a multiple of 32: 100 -> 50, 25, 13, 7, 4 (like 400 -> ..., 13)
        ("resnet18", 1, 3, 97),  # odd size: every level needs the nearest resize, and the final one
        ("resnet18", 16, 2, 96),
        ("efficientnet_b0", 4, 2, 64),
        ("mobilenetv3_small_100", 2, 2, 80),
    ],
)
def test_output_matches_input_size(encoder, in_channels, num_classes, size):
    model = build_model(encoder, in_channels=in_channels, num_classes=num_classes)
    out = model(torch.randn(2, in_channels, size, size))
    assert out.shape == (2, num_classes, size, size)
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_encoder_with_first_feature_at_quarter_resolution():
    model = build_model("convnext_atto", in_channels=3)  # features at 1/4..1/32, no 1/2 skip
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 2, 64, 64)


def test_resnet34_matches_fastai_topology_and_parameter_count():
    model = build_model("resnet34", in_channels=3, num_classes=2)
    n = sum(p.numel() for p in model.parameters())
    assert n == FASTAI_RESNET34_PARAMS
    assert abs(n - FASTAI_RESNET34_PARAMS) <= 0.01 * FASTAI_RESNET34_PARAMS
    assert [b.out_channels for b in model.blocks] == [512, 384, 256, 96]
    assert model.tail.conv1[0].in_channels == 99 and model.head.out_channels == 2


def test_parameter_count_grows_only_in_first_conv_with_channels():
    base = sum(p.numel() for p in build_model(in_channels=3).parameters())
    more = sum(p.numel() for p in build_model(in_channels=16).parameters())
    # encoder conv1 (64 x 7 x 7 per channel) + tail/head widen by the raw-input channels
    width = 96 + 16
    tail = 2 * (width * width * 9 + width) + width * 2 + 2
    width3 = 96 + 3
    tail3 = 2 * (width3 * width3 * 9 + width3) + width3 * 2 + 2
    assert more - base == 13 * 64 * 49 + tail - tail3


def test_icnr_makes_subpixels_identical_at_init():
    up = PixelShuffleICNR(8, 6)
    with torch.no_grad():
        y = up(torch.randn(2, 8, 5, 7))
    assert y.shape == (2, 6, 10, 14)
    for dy, dx in ((0, 1), (1, 0), (1, 1)):
        assert torch.equal(y[..., dy::2, dx::2], y[..., 0::2, 0::2])
    model = build_model("resnet18")
    with torch.no_grad():
        z = model.final_up(torch.randn(1, 96, 4, 4))
    assert torch.equal(z[..., 1::2, 1::2], z[..., 0::2, 0::2])


@pytest.mark.parametrize("encoder", ["resnet34", "efficientnet_b0", "convnext_atto"])
def test_param_groups_cover_every_parameter_once(encoder):
    model = build_model(encoder)
    groups = model.param_groups()
    assert len(groups) == 3 and all(groups)
    ids = [id(p) for g in groups for p in g]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    encoder_ids = {id(p) for p in model.encoder.parameters()}
    assert {id(p) for p in groups[0] + groups[1]} == encoder_ids
    if encoder == "resnet34":  # fastai's resnet split: stem..layer2 | layer3..layer4 | decoder
        assert groups[0][0] is model.encoder.conv1.weight
        assert groups[1][0] is model.encoder.layer3[0].conv1.weight


def _save_timm_weights(path, name="resnet18"):
    """A full timm model's state dict (classifier included), as an ImageNet file would be."""
    torch.manual_seed(1)
    state = timm.create_model(name, pretrained=False).state_dict()
    torch.save(state, path)
    return state


def test_local_weights_load_into_encoder(tmp_path):
    state = _save_timm_weights(tmp_path / "r18.pth")
    model = build_model("resnet18", encoder_weights=tmp_path / "r18.pth")
    assert torch.equal(model.encoder.conv1.weight, state["conv1.weight"])
    assert torch.equal(model.encoder.layer4[1].bn2.running_var, state["layer4.1.bn2.running_var"])


def test_local_weights_from_torchvision_and_safetensors(tmp_path):
    from safetensors.torch import save_file
    from torchvision.models import resnet18

    state = resnet18().state_dict()
    torch.save({"state_dict": state}, tmp_path / "tv.pth")
    model = build_model("resnet18", encoder_weights=tmp_path / "tv.pth")
    assert torch.equal(model.encoder.layer3[0].downsample[0].weight, state["layer3.0.downsample.0.weight"])
    save_file(state, tmp_path / "tv.safetensors")
    model = build_model("resnet18", encoder_weights=tmp_path / "tv.safetensors")
    assert torch.equal(model.encoder.conv1.weight, state["conv1.weight"])


def test_local_weights_adapt_the_first_conv(tmp_path):
    state = _save_timm_weights(tmp_path / "r18.pth")
    rgb = state["conv1.weight"]
    five = build_model("resnet18", in_channels=5, encoder_weights=tmp_path / "r18.pth").encoder.conv1.weight
    assert torch.allclose(five[:, 3], rgb[:, 0] * 3 / 5) and torch.allclose(five[:, 4], rgb[:, 1] * 3 / 5)
    grey = build_model("resnet18", in_channels=1, encoder_weights=tmp_path / "r18.pth").encoder.conv1.weight
    assert torch.allclose(grey[:, 0], rgb.sum(1))
    six = adapt_first_conv(rgb, 6)  # a constant input gives the same response as before
    assert torch.allclose(six.sum(1), rgb.sum(1), atol=1e-6)


def test_local_weights_errors_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        build_model("resnet18", encoder_weights=tmp_path / "missing.pth")
    (tmp_path / "junk.pth").write_text("not weights")
    with pytest.raises(ConfigError, match="not a PyTorch weights file"):
        build_model("resnet18", encoder_weights=tmp_path / "junk.pth")
    _save_timm_weights(tmp_path / "r18.pth")
    with pytest.raises(ConfigError, match="lacks") as err:  # resnet34 has more blocks than resnet18
        build_model("resnet34", encoder_weights=tmp_path / "r18.pth")
    assert "\n" not in str(err.value)
    _save_timm_weights(tmp_path / "r50.pth", "resnet50")
    with pytest.raises(ConfigError, match="shape"):
        build_model("resnet34", encoder_weights=tmp_path / "r50.pth")


def test_unknown_encoder_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown timm model"):
        build_model("resnet_does_not_exist")


def test_same_output_as_fastai_with_the_same_weights():
    """Only where fastai is installed (a scratch environment; it is not a dependency)."""
    pytest.importorskip("fastai")
    from fastai.vision.learner import create_unet_model
    from torchvision.models import resnet34

    theirs = create_unet_model(resnet34, n_out=2, img_size=(96, 96), pretrained=False).eval()
    ours = build_model("resnet34").eval()
    # Both register their tensors in forward order: copy theirs into ours one by one.
    ours.load_state_dict(dict(zip(ours.state_dict(), theirs.state_dict().values())))
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        assert torch.allclose(ours(x), theirs(x).as_subclass(torch.Tensor), atol=1e-5)


def test_cli_summary_json_and_table():
    from cellseg.cli.main import app

    runner = CliRunner()
    result = runner.invoke(app, ["model", "summary", "--in-channels", "3", "--classes", "2", "--size", "64", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["parameters"] == FASTAI_RESNET34_PARAMS
    assert report["output_shape"] == [1, 2, 64, 64]
    table = runner.invoke(app, ["model", "summary", "--encoder", "resnet18", "--in-channels", "4", "--size", "64"])
    assert table.exit_code == 0 and "block4" in table.output and "parameters" in table.output
    bad = runner.invoke(app, ["model", "summary", "--weights", "nowhere.pth"])
    assert bad.exit_code == 1 and "nowhere.pth" in bad.output
