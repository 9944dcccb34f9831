"""The U-Net: shapes for several encoders/channels/sizes, fastai's parameter count, ICNR, groups, weights, CLI."""

from __future__ import annotations

import json
import time

import pytest
import timm
import torch
from timm.models import adapt_input_conv
from typer.testing import CliRunner

from cellseg.errors import ConfigError
from cellseg.model import build_model
from cellseg.model.layers import PixelShuffleICNR
from cellseg.model.weights import describe_encoder_weights

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
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, path)
    else:
        torch.save(state, path)
    return state


def test_local_weights_load_from_a_file_and_a_folder(tmp_path):
    state = _save_timm_weights(tmp_path / "r18.pth")
    model = build_model("resnet18", encoder_weights=tmp_path / "r18.pth")
    assert torch.equal(model.encoder.conv1.weight, state["conv1.weight"])
    assert torch.equal(model.encoder.layer4[1].bn2.running_var, state["layer4.1.bn2.running_var"])
    hub = tmp_path / "hub_folder"  # a timm/HF hub folder: model.safetensors (+ config.json)
    state = _save_timm_weights(hub / "model.safetensors", "test_resnet")
    (hub / "config.json").write_text("{}")
    (hub / "other.pth").write_text("ignored: model.safetensors wins")
    model = build_model("test_resnet", encoder_weights=str(hub))
    assert torch.equal(model.encoder.conv1[0].weight, state["conv1.0.weight"])
    _save_timm_weights(tmp_path / "single" / "weights.pth", "test_resnet")  # one weights file in a folder
    assert describe_encoder_weights("test_resnet", tmp_path / "single") == f"file {tmp_path / 'single' / 'weights.pth'}"
    model = build_model("test_resnet", encoder_weights=tmp_path / "single")
    assert torch.equal(model.encoder.conv1[0].weight, state["conv1.0.weight"])


def test_local_weights_from_torchvision_and_safetensors(tmp_path):
    from safetensors.torch import save_file
    from torchvision.models import resnet18

    state = resnet18().state_dict()
    torch.save({"state_dict": state}, tmp_path / "tv.pth")
    model = build_model("resnet18", encoder_weights=tmp_path / "tv.pth")
    assert torch.equal(model.encoder.layer3[0].downsample[0].weight, state["layer3.0.downsample.0.weight"])
    save_file(state, tmp_path / "tv.safetensors")
    model = build_model("resnet18", encoder_weights=str(tmp_path / "tv.safetensors"))
    assert torch.equal(model.encoder.conv1.weight, state["conv1.weight"])


@pytest.mark.parametrize("in_channels", [1, 5])
def test_local_weights_adapt_the_input_conv_as_timm_does(tmp_path, in_channels):
    rgb = _save_timm_weights(tmp_path / "r18.pth")["conv1.weight"]
    conv = build_model("resnet18", in_channels=in_channels, encoder_weights=tmp_path / "r18.pth").encoder.conv1
    assert torch.equal(conv.weight, adapt_input_conv(in_channels, rgb))
    if in_channels == 1:  # grey: the three filters summed
        assert torch.allclose(conv.weight[:, 0], rgb.sum(1))
    else:  # cycled R, G, B, R, G, scaled by 3/5
        assert torch.allclose(conv.weight[:, 3], rgb[:, 0] * 3 / 5)


def test_local_weights_errors_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        build_model("resnet18", encoder_weights=tmp_path / "missing.pth")
    with pytest.raises(ConfigError, match="not found"):  # a suffix makes it a path, not a tag
        build_model("resnet18", encoder_weights="missing.safetensors")
    (tmp_path / "junk.pth").write_text("not weights")
    with pytest.raises(ConfigError, match="not a PyTorch weights file"):
        build_model("resnet18", encoder_weights=tmp_path / "junk.pth")
    (tmp_path / "two").mkdir()
    (tmp_path / "two" / "a.pth").write_text("")
    (tmp_path / "two" / "b.pth").write_text("")
    with pytest.raises(ConfigError, match="exactly one"):
        build_model("resnet18", encoder_weights=tmp_path / "two")
    _save_timm_weights(tmp_path / "r18.pth")
    with pytest.raises(ConfigError, match="lacks") as err:  # resnet34 has more blocks than resnet18
        build_model("resnet34", encoder_weights=tmp_path / "r18.pth")
    assert "\n" not in str(err.value)
    _save_timm_weights(tmp_path / "r50.pth", "resnet50")
    with pytest.raises(ConfigError, match="shape") as err:
        build_model("resnet34", encoder_weights=tmp_path / "r50.pth")
    assert "\n" not in str(err.value)


def test_unknown_pretrained_tag_lists_the_tags():
    with pytest.raises(ConfigError, match="not a pretrained tag of resnet34") as err:
        build_model("resnet34", encoder_weights="no_such_tag")
    assert "\n" not in str(err.value) and "a1_in1k" in str(err.value) and "tv_in1k" not in str(err.value)
    assert describe_encoder_weights("resnet34", "imagenet") == "timm resnet34.a1_in1k"
    assert describe_encoder_weights("resnet34", "tv_in1k") == "timm resnet34.tv_in1k"
    assert describe_encoder_weights("resnet34", None) == "random"


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache and HF_HUB_OFFLINE=1: no test ever reaches the network.

    huggingface_hub reads HF_HUB_CACHE/HF_HUB_OFFLINE once, at import: set its constants as the variables would.
    """
    from huggingface_hub import constants

    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    for name, value in (("HF_HOME", tmp_path / "hf"), ("HF_HUB_CACHE", cache), ("HF_HUB_OFFLINE", "1")):
        monkeypatch.setenv(name, str(value))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.mark.parametrize("why", ["HF_HUB_OFFLINE is set", "cannot be reached"])
def test_pretrained_tag_offline_without_cache_is_one_line(hf_cache, monkeypatch, why):
    from huggingface_hub import constants

    if why == "cannot be reached":  # no HF_HUB_OFFLINE, a hub that refuses connections: the probe's answer
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    start = time.monotonic()
    with pytest.raises(ConfigError, match="not in the local cache") as err:
        build_model("test_resnet", encoder_weights="imagenet")
    assert time.monotonic() - start < 5
    text = str(err.value)
    assert "\n" not in text and why in text and str(hf_cache) in text and "timm test_resnet.r160_in1k" in text
    assert constants.HF_HUB_OFFLINE is (why == "HF_HUB_OFFLINE is set")  # the cache-only switch was restored


def test_pretrained_tag_loads_offline_from_the_cache(hf_cache):
    """timm's weights as the hub cache holds them: models--timm--<name>/snapshots/<commit>/model.safetensors."""
    repo = hf_cache / "models--timm--test_resnet.r160_in1k"
    commit = "0123456789abcdef0123456789abcdef01234567"
    state = _save_timm_weights(repo / "snapshots" / commit / "model.safetensors", "test_resnet")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    model = build_model("test_resnet", in_channels=5, encoder_weights="imagenet")
    assert torch.equal(model.encoder.conv1[0].weight, adapt_input_conv(5, state["conv1.0.weight"]))
    assert torch.equal(model.encoder.layer4[0].conv1.weight, state["layer4.0.conv1.weight"])
    assert describe_encoder_weights("test_resnet", "r160_in1k") == "timm test_resnet.r160_in1k"


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


def test_cli_summary_and_config_take_tags_and_paths(hf_cache, tmp_path):
    from pathlib import Path

    from cellseg.cli.main import app
    from cellseg.config import ModelConfig

    runner = CliRunner()
    base = ["model", "summary", "--encoder", "test_resnet", "--size", "64", "--json", "--weights"]
    _save_timm_weights(tmp_path / "w" / "model.safetensors", "test_resnet")
    assert runner.invoke(app, [*base, str(tmp_path / "w")]).exit_code == 0
    for value, said in (("nope", "not a pretrained tag of test_resnet"), ("imagenet", "not in the local cache")):
        result = runner.invoke(app, [*base, value])
        assert result.exit_code == 1 and said in result.output and result.output.count("\n") == 1, result.output
    assert ModelConfig(encoder_weights=Path("w/r34.pth")).encoder_weights == "w/r34.pth"  # the former Path type
    assert ModelConfig(encoder_weights="imagenet").encoder_weights == "imagenet"
