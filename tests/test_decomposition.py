import math

import pytest
import torch
import torch.nn.functional as F

from dfm_diffusers import LaplacianDecomposition


@pytest.mark.parametrize(
    "num_stages,factors,size",
    [(1, 2, (8, 12)), (2, 2, (16, 24)), (2, 4, (32, 16)), (3, 2, (32, 32)), (3, [2, 4], (32, 64)), (3, [4, 2], (16, 32))],
)
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 5e-2)])
def test_round_trip_is_exact(num_stages, factors, size, dtype, atol):
    dec = LaplacianDecomposition(num_stages, factors)
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0)).to(dtype)
    bands = dec.decompose(x)
    assert len(bands) == num_stages
    assert [tuple(b.shape[-2:]) for b in bands] == dec.stage_shapes(*size)
    assert all(b.dtype == dtype for b in bands)
    y = dec.recompose(bands)
    assert y.dtype == dtype and y.shape == x.shape
    assert (y.float() - x.float()).abs().max() <= atol * max(1.0, x.float().abs().max().item())


def test_down_is_average_pooling_at_every_factor():
    x = torch.randn(2, 4, 16, 16)
    bands = LaplacianDecomposition(2, 2).decompose(x)
    torch.testing.assert_close(bands[0], F.avg_pool2d(x, 2), rtol=0, atol=1e-6)
    # the official operator at factor 2: bilinear without antialias == 2x2 average pooling
    official = F.interpolate(x, size=(8, 8), mode="bilinear", align_corners=False)
    torch.testing.assert_close(bands[0], official, rtol=0, atol=1e-6)
    bands3 = LaplacianDecomposition(3, [2, 4]).decompose(x)
    torch.testing.assert_close(bands3[0], F.avg_pool2d(F.avg_pool2d(x, 4), 2), rtol=0, atol=1e-6)
    torch.testing.assert_close(LaplacianDecomposition(2, 4).decompose(x)[0], F.avg_pool2d(x, 4), rtol=0, atol=1e-6)
    aa = LaplacianDecomposition(2, 4, antialias=True).decompose(x)
    ref_aa = F.interpolate(x, size=(4, 4), mode="bilinear", align_corners=False, antialias=True)
    torch.testing.assert_close(aa[0], ref_aa)


def stage0_energy(dec, cycles_per_pixel, size=64):
    """Share of a unit cosine's energy (mean square) that lands in stage 0."""
    cols = torch.arange(size, dtype=torch.float64)
    x = torch.cos(2 * torch.pi * cycles_per_pixel * cols + 0.3).expand(1, 1, size, size).float()
    return (dec.decompose(x)[0].pow(2).mean() / x.pow(2).mean()).item()


def test_factor_four_does_not_alias():
    """A cosine at 3/16 cycles/pixel is above stage 0's Nyquist (1/8) at factor 4: a 4-tap box keeps
    (sin(3 pi / 4) / (4 sin(3 pi / 16)))^2 = 10.1% of it; plain bilinear (the central 2x2 of each block) kept
    cos(3 pi / 16)^2 = 69%."""
    box = stage0_energy(LaplacianDecomposition(2, 4), 3 / 16)
    assert abs(box - (math.sin(3 * math.pi / 4) / (4 * math.sin(3 * math.pi / 16))) ** 2) < 0.01
    assert box < 0.12
    assert stage0_energy(LaplacianDecomposition(2, 4, antialias=True), 3 / 16) < 0.03
    # what the previous default did, for reference: the test above would catch a return to it
    cols = torch.arange(64, dtype=torch.float64)
    x = torch.cos(2 * torch.pi * 3 / 16 * cols + 0.3).expand(1, 1, 64, 64).float()
    plain = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
    assert plain.pow(2).mean() / x.pow(2).mean() > 0.65
    # a low frequency passes almost untouched
    assert stage0_energy(LaplacianDecomposition(2, 4), 1 / 64) > 0.97


def test_stage_upsampling_carries_bands_nearest_upsampled():
    dec = LaplacianDecomposition(3, [2, 2], stage_upsampling=[4, 2, 1])
    plain = LaplacianDecomposition(3, [2, 2])
    x = torch.randn(2, 3, 16, 16)
    carriers, bands = dec.decompose(x), plain.decompose(x)
    assert dec.stage_shapes(16, 16) == [(16, 16), (16, 16), (16, 16)]
    assert dec.band_shapes(16, 16) == [(4, 4), (8, 8), (16, 16)]
    for c, b, u in zip(carriers, bands, [4, 2, 1]):
        torch.testing.assert_close(c, F.interpolate(b, scale_factor=u, mode="nearest"))
    torch.testing.assert_close(dec.recompose(carriers), x, rtol=0, atol=1e-5)
    torch.testing.assert_close(dec.preview(carriers, 0), bands[0])  # previews at the band's own resolution
    torch.testing.assert_close(dec.preview(carriers, 1), plain.preview(bands, 1), rtol=0, atol=1e-6)
    # a carrier with within-block content (a sampler's noisy state) is read through its block means
    noisy = [c + torch.randn_like(c) for c in carriers]
    means = [F.avg_pool2d(n, u) for n, u in zip(noisy, [4, 2, 1])]
    torch.testing.assert_close(dec.recompose(noisy), plain.recompose(means), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="expected"):
        dec.recompose(bands)
    with pytest.raises(ValueError, match="stage_upsampling"):
        LaplacianDecomposition(2, 2, stage_upsampling=[2])
    assert LaplacianDecomposition(2, 2, stage_upsampling=[1, 1]).stage_upsampling is None


def test_detail_band_is_residual_of_upsampled_coarse():
    x = torch.randn(1, 2, 8, 8)
    low, band = LaplacianDecomposition(2, 2).decompose(x)
    torch.testing.assert_close(band, x - F.interpolate(low, size=(8, 8), mode="bilinear", align_corners=False))


def test_preview_shapes_and_values():
    dec = LaplacianDecomposition(3, [2, 2])
    x = torch.randn(2, 4, 32, 32)
    bands = dec.decompose(x)
    assert dec.preview(bands, 0).shape == (2, 4, 8, 8)
    torch.testing.assert_close(dec.preview(bands, 0), bands[0])
    p1 = dec.preview(bands, 1)
    assert p1.shape == (2, 4, 16, 16)
    # the preview at stage 1 is the pyramid's low-pass at 16x16 (the input downsampled once)
    torch.testing.assert_close(p1, F.avg_pool2d(x, 2), rtol=0, atol=1e-5)
    torch.testing.assert_close(dec.preview(bands, 2), x, rtol=0, atol=1e-5)
    assert dec.preview(bands[:2], 1).shape == (2, 4, 16, 16)
    with pytest.raises(ValueError):
        dec.preview(bands, 3)


def test_stage_scales_standardize_and_undo():
    dec = LaplacianDecomposition(2, 2, stage_scales=[1.0, 0.25])
    x = torch.randn(1, 4, 16, 16)
    plain = LaplacianDecomposition(2, 2).decompose(x)
    scaled = dec.decompose(x)
    torch.testing.assert_close(scaled[1], plain[1] / 0.25)
    torch.testing.assert_close(dec.recompose(scaled), x, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="stage_scales"):
        LaplacianDecomposition(2, 2, stage_scales=[1.0])


@pytest.mark.gpu
def test_works_on_cuda():
    dec = LaplacianDecomposition(2, 2)
    x = torch.randn(1, 4, 16, 16, device="cuda", dtype=torch.bfloat16)
    assert dec.recompose(dec.decompose(x)).device.type == "cuda"


def test_bad_inputs_raise_with_expected_shapes():
    dec = LaplacianDecomposition(3, [2, 4])
    with pytest.raises(ValueError, match="divisible by 8"):
        dec.decompose(torch.randn(1, 1, 12, 16))
    with pytest.raises(ValueError, match="divisible by 8"):
        dec.stage_shapes(16, 20)
    bands = dec.decompose(torch.randn(1, 1, 16, 16))
    with pytest.raises(ValueError, match="expected 3 stage tensors"):
        dec.recompose(bands[:2])
    with pytest.raises(ValueError, match=r"expected \[\(1, 1, 2, 2\), \(1, 1, 4, 4\), \(1, 1, 16, 16\)\]"):
        dec.recompose([bands[0], bands[1], torch.randn(1, 1, 8, 8)])
    with pytest.raises(ValueError):
        dec.decompose(torch.randn(16, 16))
    with pytest.raises(ValueError, match="stage_factors"):
        LaplacianDecomposition(3, [2])
    with pytest.raises(ValueError, match="num_stages"):
        LaplacianDecomposition(0)
