"""Random-resized crop + flip on the device (torchvision's ImageNet recipe) and the choice of recipe by image size."""

from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F

from oodtune.data.augment import (
    RATIO,
    SCALE,
    apply_resized_crop_flip,
    augmentation_for,
    draw_resized_crop_flip,
)


def _torchvision_area(rng: random.Random, height: int, width: int) -> float:
    """Area fraction of one box drawn as torchvision's ``RandomResizedCrop.get_params`` does (scalar loop)."""
    area = height * width
    for _ in range(10):
        target = area * rng.uniform(*SCALE)
        r = math.exp(rng.uniform(math.log(RATIO[0]), math.log(RATIO[1])))
        w, h = round(math.sqrt(target * r)), round(math.sqrt(target / r))
        if 0 < w <= width and 0 < h <= height:
            return h * w / area
    return 1.0  # square image: the fallback is the whole image


def test_recipe_by_size() -> None:
    assert augmentation_for(32).name == "pad-crop+flip"
    assert augmentation_for(224).name == "random-resized-crop+flip"


def test_drawn_boxes_follow_torchvision_ranges() -> None:
    gen = torch.Generator().manual_seed(0)
    boxes, flip = draw_resized_crop_flip(4000, (224, 224), gen)
    top, left, h, w = boxes.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 224).all() and (left + w <= 224).all()
    area = h * w / 224**2
    assert area.min() >= SCALE[0] * 0.95 and area.max() <= 1.0
    ratio = w / h
    assert ratio.min() >= RATIO[0] * 0.97 and ratio.max() <= RATIO[1] * 1.03  # up to rounding to whole pixels
    reference = [_torchvision_area(random.Random(i), 224, 224) for i in range(4000)]  # noqa: S311 - not crypto
    assert abs(area.mean().item() - sum(reference) / len(reference)) < 0.015
    assert abs(flip.float().mean().item() - 0.5) < 0.03
    assert math.isclose(torch.log(ratio).mean().item(), 0.0, abs_tol=0.02)  # log-uniform around 1
    again, _ = draw_resized_crop_flip(4000, (224, 224), torch.Generator().manual_seed(0))
    assert torch.equal(boxes, again)


def test_whole_box_is_the_identity_and_flag_flips() -> None:
    x = torch.randint(0, 256, (2, 3, 20, 20), dtype=torch.uint8)
    whole = torch.tensor([[0.0, 0.0, 20.0, 20.0]] * 2)
    out = apply_resized_crop_flip(x, (whole, torch.tensor([False, True])))
    assert torch.allclose(out[0], x[0].float(), atol=1e-3)
    assert torch.allclose(out[1], x[1].float().flip(2), atol=1e-3)


def test_a_box_is_resized_like_bilinear_interpolation_of_the_crop() -> None:
    """Independent computation: crop with slicing, upsample with F.interpolate (align_corners=False). Pixels whose
    bilinear footprint reaches past the box's far edge differ by construction (the crop cannot see them)."""
    x = torch.rand(1, 3, 24, 24) * 255
    box = torch.tensor([[4.0, 8.0, 12.0, 12.0]])  # top 4, left 8, 12 x 12 -> upscaled 2x
    out = apply_resized_crop_flip(x, (box, torch.tensor([False])))
    ref = F.interpolate(x[:, :, 4:16, 8:20], size=(24, 24), mode="bilinear", align_corners=False)
    assert torch.allclose(out[..., 1:-1, 1:-1], ref[..., 1:-1, 1:-1], atol=1e-3)
