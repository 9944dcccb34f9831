"""Loading codes: each code's semantics against an independent numpy computation, dropout rates,
reproducibility, and the errors a user sees for bad codes, channels and code files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cellseg.data.codes import load_codebook, load_strategies, parse_codes, resolve_codes
from cellseg.data.intensity import Normalisation, apply_ranges
from cellseg.data.layouts import indexed_layout, load_layout
from cellseg.errors import ConfigError

TRAINER = load_layout("trainer")
EXTERNAL = load_layout("external")
DRAWS = 4000


def _binomial_ok(hits: int, n: int, p: float) -> bool:
    """Within 5 standard deviations of n·p (flaky with probability ~1e-6)."""
    return abs(hits - n * p) <= 5 * np.sqrt(n * p * (1 - p)) + 1e-9


def _stack(batch: int = 4, h: int = 6, w: int = 5, seed: int = 0) -> np.ndarray:
    """Normalised channels of a 16-channel stack, (B, 16, H, W) in [0, 1]."""
    return np.random.default_rng(seed).random((batch, 16, h, w), dtype=np.float32)


def _apply(plan, full: np.ndarray, generator=None) -> np.ndarray:
    """Feed the plan its needed channels (as the dataset does) and return numpy output."""
    x = torch.from_numpy(full[:, plan.needed_channels])
    return plan.apply(x, generator).numpy()


def _tagged(batch: int) -> np.ndarray:
    """Channel c is the constant c + 1, so an output value names the channel it came from."""
    return np.broadcast_to(np.arange(1, 17, dtype=np.float32)[None, :, None, None], (batch, 16, 2, 2)).copy()


@pytest.mark.parametrize("code", [0, 3, 6, 12, 15])
def test_channel_codes_copy_the_channel_exactly(code):
    full = _stack()
    out = _apply(resolve_codes([code], TRAINER), full)
    assert out.shape == (4, 1, 6, 5)
    np.testing.assert_array_equal(out[:, 0], full[:, code])


@pytest.mark.parametrize(("code", "channels"), [(100, [0, 3, 6]), (104, list(range(9, 16)))])
def test_merge_codes_are_the_mean_of_the_listed_channels(code, channels):
    full = _stack()
    out = _apply(resolve_codes([code], TRAINER, merge_dropout=0.9), full)  # no merge dropout on these
    np.testing.assert_allclose(out[:, 0], full[:, channels].mean(axis=1), rtol=1e-6, atol=1e-7)


def test_black_code_is_zero():
    out = _apply(resolve_codes([110], TRAINER), _stack())
    assert out.shape == (4, 1, 6, 5) and not out.any()


@pytest.mark.parametrize(
    ("code", "channels"),
    [(101, [9, 10, 11]), (102, [13, 14, 15]), (103, list(range(9, 16))), (107, list(range(16))), (108, [0, 3, 6])],
)
def test_random_codes_pick_one_listed_channel_uniformly(code, channels):
    plan = resolve_codes([code], TRAINER)
    out = _apply(plan, _tagged(DRAWS), torch.Generator().manual_seed(1))
    assert (out == out[:, :, :1, :1]).all()  # each sample is one whole channel, not a mixture
    picked = out[:, 0, 0, 0].astype(int) - 1
    assert set(picked) == set(channels)
    for c in channels:
        assert _binomial_ok(int((picked == c).sum()), DRAWS, 1 / len(channels))


@pytest.mark.parametrize("p", [0.0, 0.3, 0.5, 1.0])
def test_merge_dropout_leaves_each_channel_out_independently(p):
    """111 = mean of 0, 3, 6 with merge dropout: a dropped channel contributes zero, divisor stays 3."""
    plan = resolve_codes([111], TRAINER, merge_dropout=p)
    full = np.zeros((DRAWS, 16, 2, 2), dtype=np.float32)
    full[:, 0], full[:, 3], full[:, 6] = 1.0, 2.0, 4.0  # the sum's bits say which channels were kept
    out = _apply(plan, full, torch.Generator().manual_seed(2))
    kept = np.rint(out[:, 0, 0, 0] * 3).astype(int)
    np.testing.assert_allclose(out[:, 0, 0, 0] * 3, kept, atol=1e-5)
    bits = np.stack([(kept >> b) & 1 for b in range(3)], axis=1)
    for b in range(3):
        assert _binomial_ok(int(bits[:, b].sum()), DRAWS, 1 - p)
    assert _binomial_ok(int((bits[:, 0] & bits[:, 1]).sum()), DRAWS, (1 - p) ** 2)


@pytest.mark.parametrize("p", [0.0, 0.25, 0.5, 1.0])
def test_channel_dropout_blacks_out_at_the_given_rate(p):
    plan = resolve_codes([212], TRAINER, channel_dropout=p)
    full = _tagged(DRAWS)
    out = _apply(plan, full, torch.Generator().manual_seed(3))
    dropped = out[:, 0, 0, 0] == 0
    assert set(np.unique(out)) <= {0.0, 13.0}
    assert _binomial_ok(int(dropped.sum()), DRAWS, p)


def test_channel_dropout_of_a_composite_code():
    """300 = code 100 (merge) with channel dropout: either the merge or black."""
    plan = resolve_codes([300], TRAINER, channel_dropout=0.5)
    full = _stack(batch=DRAWS, h=2, w=2)
    out = _apply(plan, full, torch.Generator().manual_seed(4))
    merged = full[:, [0, 3, 6]].mean(axis=1)
    dropped = ~out[:, 0].any(axis=(1, 2))
    np.testing.assert_allclose(out[~dropped, 0], merged[~dropped], rtol=1e-6)
    assert _binomial_ok(int(dropped.sum()), DRAWS, 0.5)


def test_dropout_draws_are_independent_across_channels():
    plan = resolve_codes([200, 200], TRAINER, channel_dropout=0.5)
    out = _apply(plan, _tagged(DRAWS), torch.Generator().manual_seed(5))
    a, b = out[:, 0, 0, 0] == 0, out[:, 1, 0, 0] == 0
    assert _binomial_ok(int((a & b).sum()), DRAWS, 0.25)


def test_strategy_outputs_and_needed_channels():
    plan = resolve_codes("merge_brightfield", TRAINER)
    assert plan.codes == [111, 12, 102] and plan.strategy == "merge_brightfield"
    assert plan.in_channels == 3 and plan.needed_channels == [0, 3, 6, 12, 13, 14, 15]
    out = _apply(plan, _stack(), torch.Generator().manual_seed(0))
    assert out.shape == (4, 3, 6, 5)


def test_any_number_of_input_channels():
    plan = resolve_codes([0, 3, 6, 12, 110], TRAINER)
    full = _stack()
    out = _apply(plan, full)
    assert out.shape == (4, 5, 6, 5)
    np.testing.assert_array_equal(out[:, :4], full[:, [0, 3, 6, 12]])


def test_same_generator_seed_same_draw_and_different_seeds_differ():
    plan = resolve_codes([107, 111, 212], TRAINER)
    full = _stack(batch=64)
    first = _apply(plan, full, torch.Generator().manual_seed(7))
    again = _apply(plan, full, torch.Generator().manual_seed(7))
    other = _apply(plan, full, torch.Generator().manual_seed(8))
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def _ranges(raw: np.ndarray, method: str = "max") -> torch.Tensor:
    """(B, K, 2) intensity ranges of raw (B, K, H, W)."""
    return torch.from_numpy(np.stack([Normalisation(method).ranges(r) for r in raw]))


def test_all_zero_channels_stay_zero_never_nan():
    raw = torch.zeros(2, 3, 4, 4, dtype=torch.uint16)
    raw[:, 1] = 1000
    for method in ("max", "percentile"):
        x = apply_ranges(raw, _ranges(raw.numpy(), method))
        assert torch.isfinite(x).all() and not x[:, 0].any() and not x[:, 2].any()
    full = np.zeros((2, 16, 4, 4), dtype=np.float32)
    out = _apply(resolve_codes([100, 111, 0], TRAINER), full, torch.Generator().manual_seed(0))
    assert np.isfinite(out).all() and not out.any()


def test_max_normalisation_matches_numpy_division():
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 65535, (3, 4, 8, 8), dtype=np.uint16)
    maxima = raw.reshape(3, 4, -1).max(axis=2).astype(np.float32)
    x = apply_ranges(torch.from_numpy(raw), _ranges(raw)).numpy()
    assert x.dtype == np.float32
    np.testing.assert_allclose(x, raw / maxima[..., None, None], rtol=1e-6)


def test_combine_on_raw_intensities_matches_normalise_then_combine():
    """The batch paths normalise each plane as they gather it, from raw uint16 storage."""
    plan = resolve_codes([107, 111, 212, 110], TRAINER)
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 65535, (4, len(plan.needed_channels), 6, 5), dtype=np.uint16)
    raw[3, 2] = 0  # an all-zero channel
    for method in ("max", "percentile"):
        ranges = _ranges(raw, method)
        index, weight = plan.draw(4, torch.Generator().manual_seed(0))
        fused = plan.combine(torch.from_numpy(raw), index, weight, ranges)
        separate = plan.combine(apply_ranges(torch.from_numpy(raw), ranges), index, weight)
        assert torch.isfinite(fused).all() and not fused[:, 3].any()
        torch.testing.assert_close(fused, separate, rtol=1e-6, atol=1e-7)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_apply_on_cuda_matches_cpu():
    plan = resolve_codes([107, 111, 212], TRAINER)
    full = _stack(batch=16)
    cpu = _apply(plan, full, torch.Generator().manual_seed(9))
    x = torch.from_numpy(full[:, plan.needed_channels]).cuda()
    gpu = plan.apply(x, torch.Generator().manual_seed(9))
    assert gpu.device.type == "cuda"
    np.testing.assert_allclose(gpu.cpu().numpy(), cpu, rtol=1e-6)


@pytest.mark.parametrize("code", [51, 55, 199, 400, 1000, -1])
def test_unknown_code_is_a_config_error_naming_it(code):
    with pytest.raises(ConfigError, match=rf"unknown loading code {code}\b"):
        resolve_codes([0, code], TRAINER)


@pytest.mark.parametrize(
    ("code", "layout", "message"),
    [
        (12, EXTERNAL, r"loading code 12 cannot be used: layout 'external' has no channel 12"),
        (212, EXTERNAL, r"loading code 212 cannot be used"),
        (100, EXTERNAL, r"loading code 100 is defined for layouts trainer, test"),
        (121, TRAINER, r"loading code 121 is defined for layouts external"),
        (101, indexed_layout(9), r"loading code 101 cannot be used: layout 'indexed' has no channel 9"),
    ],
)
def test_code_needing_a_missing_channel_fails_naming_the_code(code, layout, message):
    with pytest.raises(ConfigError, match=message):
        resolve_codes([code], layout)


def test_indexed_layout_accepts_any_code_whose_channels_exist():
    assert resolve_codes("brightfield", indexed_layout(16)).needed_channels == [9, 10, 11, 12, 13, 14, 15]


def test_external_codes_use_channel_names():
    plan = resolve_codes([121, 122, 123], EXTERNAL)
    assert [r.sources for r in plan.recipes] == [(0, 1), (2, 3, 4), (6, 7, 8)]


def test_user_code_file_by_channel_name(tmp_path, monkeypatch):
    extra = tmp_path / "my_codes.yaml"
    extra.write_text(
        "codes:\n"
        "  150: {op: merge, channels: [memb_total, bf_0], description: membrane and focus}\n"
        "  151: {op: channel, channels: [bf_p10], channel_dropout: 0.25}\n"
    )
    monkeypatch.setenv("CELLSEG_CODES", str(extra))
    plan = resolve_codes([150, 151], TRAINER)
    assert [r.sources for r in plan.recipes] == [(3, 12), (15,)]
    assert plan.recipes[1].drop_p == 0.25
    full = _stack()
    out = _apply(plan, full, torch.Generator().manual_seed(0))
    np.testing.assert_allclose(out[:, 0], full[:, [3, 12]].mean(axis=1), rtol=1e-6)
    with pytest.raises(ConfigError, match="loading code 150 cannot be used: layout 'external' has no channel named 'memb_total'"):
        resolve_codes([150], EXTERNAL)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("codes:\n  20: {op: black}\n", "loading code '20' must be an integer in 51–199"),
        ("codes:\n  150: {op: channel, channels: [1, 2]}\n", "invalid loading code 150"),
        ("codes:\n  150: {op: random, channels: [1], merge_dropout: true}\n", "merge_dropout applies to merge"),
        ("codes:\n  150: {op: merge, channels: [1], merge_dropout: 2}\n", "invalid loading code 150"),
        ("codes:\n  150: {op: blend, channels: [1]}\n", "invalid loading code 150"),
        ("codes: [1, 2]\n", "expected a mapping 'codes:'"),
    ],
)
def test_invalid_code_file_is_one_line_naming_the_file(tmp_path, text, message):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        load_codebook([bad])
    assert str(bad) in str(info.value) and "\n" not in str(info.value)


def test_default_codebook_has_spec_table():
    book = load_codebook()
    assert set(book) == {100, 101, 102, 103, 104, 107, 108, 110, 111, 121, 122, 123}
    assert book[111].merge_dropout is True and book[100].merge_dropout is False


def test_spec_strategies_are_defined_and_resolve():
    strategies = load_strategies()
    spec = {
        "fluorescence": [0, 3, 6], "cytoplasm": [0, 0, 0], "membrane": [3, 3, 3], "mitochondria": [6, 6, 6],
        "random": [107, 107, 107], "brightfield": [101, 12, 102], "in_focus_brightfield": [12, 12, 12],
        "merge_brightfield": [111, 12, 102], "all_black": [110, 110, 110],
    }
    for name, codes in spec.items():
        assert strategies[name] == codes
        assert resolve_codes(name, TRAINER).codes == codes
    for name in strategies:
        if name.startswith("ext_"):
            resolve_codes(name, EXTERNAL)


def test_strategy_for_another_layout_and_unknown_strategy():
    with pytest.raises(ConfigError, match="strategy cytoplasm is defined for layouts trainer, not for layout 'test'"):
        resolve_codes("cytoplasm", load_layout("test"))
    with pytest.raises(ConfigError, match="unknown strategy 'flourescence'"):
        resolve_codes("flourescence", TRAINER)


def test_parse_codes():
    assert parse_codes("100,12, 103") == [100, 12, 103]
    assert resolve_codes("100,12,103", TRAINER).codes == [100, 12, 103]
    with pytest.raises(ConfigError, match="codes '1,x'"):
        parse_codes("1,x")


def test_bad_dropout_probability_and_empty_codes():
    with pytest.raises(ConfigError, match="channel_dropout"):
        resolve_codes([200], TRAINER, channel_dropout=1.5)
    with pytest.raises(ConfigError, match="no loading codes"):
        resolve_codes([], TRAINER)
