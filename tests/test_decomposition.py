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


def test_stage_zero_is_downsampled_input_and_avgpool_at_factor_two():
    x = torch.randn(2, 4, 16, 16)
    bands = LaplacianDecomposition(2, 2).decompose(x)
    torch.testing.assert_close(bands[0], F.avg_pool2d(x, 2), rtol=0, atol=1e-6)
    bands3 = LaplacianDecomposition(3, [2, 4]).decompose(x)
    ref = F.interpolate(F.interpolate(x, size=(4, 4), mode="bilinear", align_corners=False), size=(2, 2), mode="bilinear", align_corners=False)
    torch.testing.assert_close(bands3[0], ref, rtol=0, atol=1e-6)
    aa = LaplacianDecomposition(2, 4, antialias=True).decompose(x)
    ref_aa = F.interpolate(x, size=(4, 4), mode="bilinear", align_corners=False, antialias=True)
    torch.testing.assert_close(aa[0], ref_aa)


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
