"""Claims of Sec. IV-A.2 and Table VII about the no-reference underwater metrics: UCIQE [55] and UIQM [56]
from their published constants, worked out by hand on small synthetic images and checked against public
implementations (values in nr_metrics_reference.json, made outside this repository)."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from metrics import srgb_to_lab, uciqe, uciqe_terms, uicm, uiconm, uiqm, uism

REFERENCE = json.loads((Path(__file__).parent / "nr_metrics_reference.json").read_text())
PLIP = 1026.0                                                                  # γ = k = 1026


def flat(rgb, H=10, W=20):
    """A (3, H, W) image of one 8-bit colour."""
    return torch.tensor(rgb, dtype=torch.float64).view(3, 1, 1).expand(3, H, W) / 255


def grey_columns(levels, H=10):
    """A (3, H, len(levels)) grey image whose column x has the 8-bit level levels[x]."""
    return torch.tensor(levels, dtype=torch.float64).expand(3, H, len(levels)) / 255


def read_rgb(path):
    """8-bit RGB file → (3, H, W) float32 in [0, 1], read with PIL."""
    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).float() / 255


# ---------------------------------------------------------------------------------------------
# Colour space and UCIQE [55], by hand

def test_srgb_to_lab_gives_the_published_cielab_of_the_primaries_and_exact_neutral_greys():
    primaries = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1], [0.5, 0.5, 0.5]]).T.reshape(1, 3, 5, 1)
    lab = srgb_to_lab(primaries.double())[0, :, :, 0].T                                 # (5, 3)
    # Published CIELab (D65) of sRGB red, green, blue; they use the tabulated white (0.95047, 1, 1.08883),
    # we the XYZ of RGB white, 0.002 apart at most.
    published = torch.tensor([[53.2408, 80.0925, 67.2032], [87.7347, -86.1827, 83.1793], [32.2970, 79.1875, -107.8602]])
    assert torch.allclose(lab[:3], published.double(), atol=0.005)
    assert lab[3].tolist() == pytest.approx([100, 0, 0], abs=1e-9)                      # white: L* = 116 − 16
    assert lab[4, 1:].abs().max() < 1e-9                                                # grey has no chroma


def test_uciqe_of_a_uniform_grey_image_is_zero_in_cielab_units():
    # σ_c = 0 (every chroma is 0), con_l = 0 (top 1% = bottom 1%), μ_s = 0 (C/L = 0).
    assert uciqe(flat([128, 128, 128]), "lab") == pytest.approx([0.0], abs=1e-9)


def test_uciqe_lab_contrast_averages_the_top_and_bottom_one_percent_of_lightness():
    # 200 pixels, round(0.01·200) = 2 in each tail. Black has L = 116·4/29 − 16 = 0, white L = 100.
    one_white = torch.zeros(3, 10, 20, dtype=torch.float64)
    one_white[:, 0, 0] = 1                                                              # 199 black, 1 white
    half_white = torch.zeros(3, 10, 20, dtype=torch.float64)
    half_white[:, :5] = 1                                                               # 100 black, 100 white
    assert uciqe_terms(srgb_to_lab(one_white[None])[0], "lab") == pytest.approx((0, (100 + 0) / 2 - 0, 0), abs=1e-9)
    # con_l = 100 − 0; σ_c = μ_s = 0: UCIQE = 0.2745·100. A batch scores each image on its own.
    assert uciqe(torch.stack([half_white, one_white]), "lab") == pytest.approx([27.45, 0.2745 * 50], abs=1e-9)


def test_uciqe_matlab_convention_keeps_the_8bit_lab_offsets_and_stretchlims_flat_image_range():
    # UCIQE.m on uint8 white: Lab encoded as (255, 128, 128)/255, so "chroma" C = √2·128/255 everywhere,
    # σ_c = √mean|1 − (C/C)²| = 0, stretchlim falls back to [0, 1] (con_l = 1), saturation C/√(C² + 1²).
    chroma = math.sqrt(2) * 128 / 255
    expected = 0.4680 * 0 + 0.2745 * 1 + 0.2576 * chroma / math.sqrt(chroma ** 2 + 1)
    # (σ_c is 1e-8, not 0, in float64: the mean of equal C's is off by an ulp and the square root magnifies it.)
    assert uciqe(flat([255, 255, 255])) == pytest.approx([expected], abs=1e-7)
    assert expected == pytest.approx(0.42361, abs=1e-5)


def test_uciqe_matlab_convention_on_black_and_red_follows_uciqe_m_line_by_line():
    image = torch.zeros(3, 10, 20, dtype=torch.float64)
    image[0, 5:] = 1                                                                    # 100 black, then 100 red pixels
    # sRGB red is L*a*b* (53.24, 80.09, 67.20): 8-bit Lab (round(53.24·2.55), round(80.09 + 128), round(67.20 + 128))
    # = (136, 208, 195); black is (0, 128, 128).
    chroma_black, chroma_red = math.hypot(128, 128) / 255, math.hypot(208, 195) / 255   # Img_Chr
    lightness_red = 136 / 255
    mean_chroma = (chroma_black + chroma_red) / 2                                       # Aver_Chr
    sigma_c = math.sqrt((abs(1 - (mean_chroma / chroma_black) ** 2) + abs(1 - (mean_chroma / chroma_red) ** 2)) / 2)
    # stretchlim: sorted values at ⌊0.01·200⌋ + 1 = 3 (a black) and ⌈0.99·200⌉ = 198 (a red), 1-based.
    con_l = lightness_red - 0
    mu_s = (1 + chroma_red / math.hypot(chroma_red, lightness_red)) / 2                 # black: C/√(C² + 0) = 1
    assert uciqe_terms(srgb_to_lab(image[None])[0]) == pytest.approx((sigma_c, con_l, mu_s), abs=1e-12)
    assert uciqe(image) == pytest.approx([0.4680 * sigma_c + 0.2745 * con_l + 0.2576 * mu_s], abs=1e-12)


# ---------------------------------------------------------------------------------------------
# UIQM [56], by hand

def test_uicm_of_a_constant_colour_is_its_opponent_mean_term_alone():
    # (R, G, B) = (200, 100, 50): RG = 100, YB = 150 − 50 = 100 everywhere, no variance.
    expected = -0.0268 * math.sqrt(100 ** 2 + 100 ** 2)
    assert uicm(flat([200, 100, 50]) * 255) == pytest.approx(expected, abs=1e-12)
    # Flat: every Sobel edge map is 0 (UISM 0) and every block has I_max = I_min (m = 0, UIConM 0).
    assert uiqm(flat([200, 100, 50])) == pytest.approx([0.0282 * expected], abs=1e-12)


def test_uicm_trims_sorted_values_t_al_plus_1_to_k_minus_t_ar_and_takes_the_variance_over_all_pixels():
    # K = 100 pixels, G = B = 0, so RG = R and YB = R/2. T_αL = ⌈0.1·100⌉ = 10, T_αR = ⌊0.1·100⌋ = 10: the
    # trimmed mean keeps sorted values 11 ... 90 (1-based), a 20 and seventy-nine 50s.
    red = [0] * 10 + [20] + [50] * 79 + [255] * 10
    image = torch.zeros(3, 10, 10, dtype=torch.float64)
    image[0] = torch.tensor(red, dtype=torch.float64).view(10, 10)
    mean_rg = (20 + 79 * 50) / 80
    mean_yb = mean_rg / 2
    var_rg = sum((r - mean_rg) ** 2 for r in red) / 100                                # over all K pixels
    var_yb = sum((r / 2 - mean_yb) ** 2 for r in red) / 100
    expected = -0.0268 * math.hypot(mean_rg, mean_yb) + 0.1586 * math.sqrt(var_rg + var_yb)
    assert uicm(image) == pytest.approx(expected, abs=1e-12)


def test_uism_of_a_grey_ramp_is_the_eme_of_its_edge_map_by_hand():
    # f(x) = 10·(x + 1) on 20 columns, two 10×10 blocks. Sobel |∂f/∂x| = (1 + 2 + 1)·(f(x+1) − f(x−1)) = 80
    # inside and 40 at the replicated borders; edge map = f·|∇f|.
    # Block 1: min 10·40 (x = 0), max 100·80 (x = 9): log 20.  Block 2: min 200·40 (x = 19), max 190·80: log 1.9.
    eme = 2 / (1 * 2) * (math.log(20) + math.log(1.9))
    # Grey: R, G and B have the same EME, and 0.299 + 0.587 + 0.114 = 1.
    assert uism(grey_columns([10 * (x + 1) for x in range(20)]) * 255) == pytest.approx(eme, abs=1e-12)
    assert eme == pytest.approx(math.log(38), abs=1e-12)


def test_uiconm_is_the_plip_logamee_of_the_block_contrasts_by_hand():
    # Two 10×10 grey blocks: levels 50 ... 200 and 100 ... 120, min and max in each.
    levels = [50] * 5 + [200] * 5 + [100] * 5 + [120] * 5
    total = 0.0
    for low, high in ((50, 200), (100, 120)):
        difference = PLIP * (high - low) / (PLIP - low)                                 # I_max ⊖ I_min
        plip_sum = high + low - high * low / PLIP                                       # I_max ⊕ I_min
        m = difference / plip_sum
        total += m * math.log(m)
    expected = -(PLIP - PLIP * (1 - total / PLIP) ** (1 / 2))                            # −((1/(k1·k2)) ⊗ Σ)
    assert uiconm(grey_columns(levels) * 255) == pytest.approx(expected, abs=1e-12)
    assert uiconm(flat([90, 90, 90]) * 255) == 0                                        # I_max = I_min: m = 0


def test_no_reference_metrics_reject_8bit_tensors_wrong_shapes_and_out_of_range_values():
    good = flat([10, 20, 30])
    with pytest.raises(TypeError, match="x.float"):
        uciqe((good * 255).to(torch.uint8))
    with pytest.raises(ValueError, match="divide 8-bit images by 255"):
        uiqm(good * 255)
    with pytest.raises(ValueError, match="RGB"):
        uiqm(good[:1])
    with pytest.raises(ValueError, match="NaN"):
        uciqe(good.clone().fill_(float("nan")))
    with pytest.raises(ValueError, match="at least 10"):
        uiqm(good[:, :5, :5])
    with pytest.raises(ValueError, match="unknown UCIQE convention"):
        uciqe(good, "hsv")


# ---------------------------------------------------------------------------------------------
# Against public implementations, on real images (see nr_metrics_reference.json for how each was run)

@pytest.mark.parametrize("record", REFERENCE["images"], ids=lambda record: Path(record["image"]).stem)
def test_uciqe_matches_uciqe_m_in_octave_and_xueleichens_python(shared_dir, record):
    image = read_rgb(shared_dir / record["image"])
    matlab = uciqe(image)[0]
    # UCIQE.m given scikit-image's 8-bit Lab: skimage's rounded white point moves a and b by ≲ 0.005, which
    # flips the rounding of a + 128 in a few pixels (measured ≤ 6.3e-6 on these images).
    assert matlab == pytest.approx(record["uciqe_matlab"], abs=5e-5)
    # Given OpenCV's fixed-point 8-bit Lab instead (the Python ports' choice), 5-16% of the pixels are one level
    # off; one level of L at a stretchlim limit moves UCIQE by 0.2745/255 = 1.1e-3 (measured ≤ 1.2e-3).
    assert matlab == pytest.approx(record["uciqe_matlab_opencv_lab"], abs=2e-3)
    # CIELab units: the same white-point rounding moves UCIQE by ≤ 5.6e-5 relative (≤ 5e-6 absolute with
    # skimage's white point swapped in).
    assert uciqe(image, "lab")[0] == pytest.approx(record["uciqe_lab"], rel=1e-4)


@pytest.mark.parametrize("record", REFERENCE["images"], ids=lambda record: Path(record["image"]).stem)
def test_uiqm_and_its_terms_match_funie_gan_and_xueleichens_plip_logamee(shared_dir, record):
    image = read_rgb(shared_dir / record["image"])
    rgb = torch.round(image.double() * 255)                                             # the 8-bit values
    K = rgb[0].numel()
    # FUnIE-GAN's trimmed mean starts one sorted value late: its μ_α moves by ≤ 255/(K − T_αL − T_αR) and
    # UICM by at most (0.0268 + 0.1586)·2·255/(0.8·K) (≤ 7.7e-4 here; measured ≤ 1e-5).
    assert uicm(rgb) == pytest.approx(record["uicm"], abs=(0.0268 + 0.1586) * 2 * 255 / (0.8 * K))
    assert uism(rgb) == pytest.approx(record["uism"], abs=1e-9)                         # float64 both: ~1e-14
    assert uiconm(rgb) == pytest.approx(record["uiconm"], abs=1e-9)
    assert uiqm(image)[0] == pytest.approx(record["uiqm"], abs=1e-4)                     # 0.0282 × the UICM bound
