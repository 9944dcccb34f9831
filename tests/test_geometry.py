"""The model's input contract: the pixel scale and intensity normalisation a model was trained at are
the ones inference applies (issue 10), for each resize policy, and contradicting options are refused."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch
from scipy import ndimage
from torch import nn
from typer.testing import CliRunner

from cellseg.cli.main import app
from cellseg.config import load_config
from cellseg.data.batches import make_batch_source
from cellseg.data.codes import resolve_codes
from cellseg.data.geometry import Geometry, median_cell_diameter
from cellseg.data.intensity import Normalisation
from cellseg.data.layouts import load_layout
from cellseg.data.store import StackRecord, write_store
from cellseg.engine.checkpoint import save_checkpoint
from cellseg.engine.session import TrainingSession
from cellseg.errors import ConfigError
from cellseg.inference.predict import Stack, inference_factor, model_input, segment
from cellseg.model import build_model
from cellseg.model.loading import TrainedModel

runner = CliRunner()
TRAINER = load_layout("trainer")
DIAMETER = 40  # px, native


def disks(height: int, width: int, diameter: float, spacing: int) -> np.ndarray:
    """A grid of separate disks (bool) of ``diameter`` px."""
    yy, xx = np.mgrid[:height, :width]
    mask = np.zeros((height, width), bool)
    for cy in range(spacing // 2, height - spacing // 2 + 1, spacing):
        for cx in range(spacing // 2, width - spacing // 2 + 1, spacing):
            mask |= (yy - cy) ** 2 + (xx - cx) ** 2 <= (diameter / 2) ** 2
    return mask


def seen_diameter(planes: list[np.ndarray]) -> float:
    """Median diameter of the whole disks (not cut by a border) the network was shown."""
    sizes = []
    for plane in planes:
        labels, n = ndimage.label(plane > 0.5)
        for k, box in enumerate(ndimage.find_objects(labels), start=1):
            ys, xs = box
            if ys.start > 0 and xs.start > 0 and ys.stop < plane.shape[0] and xs.stop < plane.shape[1]:
                sizes.append(2 * np.sqrt((labels[box] == k).sum() / np.pi))
    assert sizes, "no whole disk in view"
    return float(np.median(sizes))


@pytest.fixture(scope="module")
def disk_store(tmp_path_factory):
    """Two 'trainer' stacks of 240 x 320 px whose channel 0 and mask are disks of DIAMETER px."""
    mask = disks(240, 320, DIAMETER, 80)
    image = np.full((16, 240, 320), 100, np.uint16)
    image[0][mask] = 3000
    records = [StackRecord(id=f"s{i}", image=image, mask=mask.astype(np.uint8), source=f"s{i}.tif") for i in range(2)]
    return write_store(tmp_path_factory.mktemp("geo") / "disks.zarr", records, TRAINER, ["Background", "Cell"])


class Spy(nn.Module):
    """Records what it is shown; predicts background everywhere."""

    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))
        self.seen: list[torch.Tensor] = []

    def forward(self, x):
        self.seen.extend(x.detach().cpu())
        return torch.zeros(x.shape[0], 2, *x.shape[-2:])


def spy_model(geometry: Geometry, cell_diameter: float | None = DIAMETER, method: str = "percentile"):
    metadata = {"geometry": {**geometry.to_dict(), "cell_diameter": cell_diameter},
                "normalisation": Normalisation(method).to_dict(), "size": geometry.size, "in_channels": 1}
    return TrainedModel(Spy(), metadata, "spy")


@pytest.mark.parametrize("geometry", [Geometry("stack", 96), Geometry("none", 64), Geometry("none", 64, scale=0.5)],
                         ids=["stack", "native", "half"])
def test_cells_appear_at_one_diameter_in_training_and_predict(disk_store, geometry):
    plan = resolve_codes([0], TRAINER)
    source = make_batch_source(disk_store, [0, 1], plan, geometry, 2, "cpu", "ram",
                               normalisation=Normalisation("percentile"))
    trained_view = [x[0].numpy() for batch, _ in source.epoch(0) for x in batch]
    spy = spy_model(geometry)
    mask = disks(240, 320, DIAMETER, 80)
    channels = np.where(mask, 3000, 100).astype(np.uint16)[None]
    probs = segment(spy, Stack("s", "s", channels), plan)
    assert probs.shape == (2, 240, 320)  # mapped back to native pixels
    predicted_view = [x[0].numpy() for x in spy.model.seen]
    expected = DIAMETER * geometry.shape(240, 320)[1] / 320
    assert seen_diameter(trained_view) == pytest.approx(expected, abs=1.5)
    assert seen_diameter(predicted_view) == pytest.approx(seen_diameter(trained_view), abs=1.0)


def test_diameter_option_rescales_larger_cells_to_the_training_diameter():
    geometry = Geometry("none", 64)
    plan = resolve_codes([0], TRAINER)
    big = np.where(disks(240, 320, 2 * DIAMETER, 160), 3000, 100).astype(np.uint16)[None]
    spy = spy_model(geometry)
    segment(spy, Stack("s", "s", big), plan, factor=inference_factor(spy, diameter=2 * DIAMETER))
    assert seen_diameter([x[0].numpy() for x in spy.model.seen]) == pytest.approx(DIAMETER, abs=1.5)


def test_training_records_geometry_normalisation_and_cell_diameter(disk_store, tmp_path):
    config = load_config(overrides={"data.store": disk_store, "data.codes": [0], "data.strategy": None,
                                    "data.size": 64, "data.val_fraction": 0.5, "model.encoder": "test_resnet",
                                    "train.device": "cpu"})
    metadata = TrainingSession(config, tmp_path).metadata()
    assert metadata["geometry"] == {"resize": "none", "size": 64, "scale": 1.0, "keep_aspect": True,
                                    "cell_diameter": pytest.approx(DIAMETER, abs=1.0)}
    assert metadata["normalisation"] == {"method": "percentile", "low": 1.0, "high": 99.8}


def test_median_cell_diameter_counts_regions_and_handles_empty_masks():
    assert median_cell_diameter([np.zeros((8, 8), np.uint8)]) is None
    assert median_cell_diameter([disks(100, 100, 20, 50).astype(np.uint8)]) == pytest.approx(20, abs=1.0)


def test_a_saturated_pixel_changes_nothing_else_under_percentile_normalisation():
    plan = resolve_codes([0], TRAINER)
    rng = np.random.default_rng(0)
    clean = rng.integers(100, 1000, (1, 64, 64)).astype(np.uint16)
    hot = clean.copy()
    hot[0, 10, 10] = 65535
    for method, changes_elsewhere in (("percentile", False), ("max", True)):
        a = model_input(Stack("a", "a", clean), plan, Normalisation(method))
        b = model_input(Stack("b", "b", hot), plan, Normalisation(method))
        differs = (a != b)[0]
        differs[10, 10] = False
        assert bool(differs.any()) is changes_elsewhere, method


def test_options_that_contradict_the_model_geometry_are_one_line(tmp_path):
    stack_model = spy_model(Geometry("stack", 96))
    with pytest.raises(ConfigError, match=r"--tile 128: .*resize: stack"):
        inference_factor(stack_model, tile=128)
    with pytest.raises(ConfigError, match=r"--diameter 30: .*resize: stack"):
        inference_factor(stack_model, diameter=30)
    with pytest.raises(ConfigError, match="no training cell diameter"):
        inference_factor(spy_model(Geometry("none", 64), cell_diameter=None), diameter=30)
    with pytest.raises(ConfigError, match="positive"):
        inference_factor(spy_model(Geometry("none", 64)), diameter=0)
    # through the CLI: a real checkpoint trained with resize: stack
    model = build_model("test_resnet", 3, 2)
    metadata = {"codes": [0, 3, 6], "strategy": None, "layout": TRAINER.model_dump(mode="json"),
                "classes": ["Background", "Cell"], "size": 64, "in_channels": 3, "num_classes": 2,
                "encoder": "test_resnet", "geometry": Geometry("stack", 64).to_dict(),
                "normalisation": Normalisation("max").to_dict()}
    save_checkpoint(tmp_path / "run" / "checkpoint_last.pt", {"metadata": metadata, "model": model.state_dict()})
    image = tmp_path / "x.tif"
    tifffile.imwrite(image, np.ones((16, 80, 80), np.uint16))
    result = runner.invoke(app, ["predict", str(tmp_path / "run"), str(image), "--out", str(tmp_path / "o"),
                                 "--tile", "128", "--device", "cpu"])
    assert result.exit_code == 1 and "--tile 128" in result.output and "resize: stack" in result.output
    assert "Traceback" not in result.output
    ok = runner.invoke(app, ["predict", str(tmp_path / "run"), str(image), "--out", str(tmp_path / "o"),
                             "--device", "cpu"])
    assert ok.exit_code == 0, ok.output
    assert "records no input geometry" not in ok.output


def test_a_model_without_the_record_is_used_as_before_with_one_line(tmp_path):
    model = build_model("test_resnet", 3, 2)
    metadata = {"codes": [0, 3, 6], "strategy": None, "layout": TRAINER.model_dump(mode="json"),
                "classes": ["Background", "Cell"], "size": 64, "in_channels": 3, "num_classes": 2,
                "encoder": "test_resnet"}
    save_checkpoint(tmp_path / "run" / "checkpoint_last.pt", {"metadata": metadata, "model": model.state_dict()})
    tifffile.imwrite(tmp_path / "x.tif", np.ones((16, 80, 80), np.uint16))
    result = runner.invoke(app, ["predict", str(tmp_path / "run"), str(tmp_path / "x.tif"), "--out",
                                 str(tmp_path / "o"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    notes = [line for line in result.output.splitlines() if "records no input geometry" in line]
    assert len(notes) == 1 and "native-pixel tiles of 64 px" in notes[0] and "maximum" in notes[0]


def test_a_run_from_before_the_record_is_not_resumed_with_a_silently_different_input():
    from cellseg.engine.restore import check_resume_config

    config = load_config()
    saved = config.to_dict()
    check_resume_config(saved, config)  # a current run resumes
    for key in ("resize", "keep_aspect", "scale", "normalize", "percentiles"):
        del saved["data"][key]
    with pytest.raises(ConfigError, match="before cellseg recorded its input geometry.*--init-from"):
        check_resume_config(saved, config)
