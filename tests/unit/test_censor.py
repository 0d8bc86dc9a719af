"""Masks and censoring actions on synthetic images, and the pipeline on real batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from safet2i.errors import ImageInputError, UnsafeContentError
from safet2i.filter import Detection, SafetyFilter, get_policy
from safet2i.filter.censor import censor, placeholder, unsafe_mask
from safet2i.filter.cost import judge

H, W = 90, 120
BOX = (30, 20, 40, 30)  # x, y, w, h


def verdict(box=BOX, label="FACE_FEMALE", score=0.9):
    return judge(0, (H, W, 3), [Detection(label, score, box, "nudenet")], get_policy("face-only"), {})


@pytest.fixture
def noise():
    return np.random.default_rng(0).random((H, W, 3), dtype=np.float32)


def test_rect_mask_is_the_expanded_box():
    pol = get_policy("face-only", expand=0.25)
    m = unsafe_mask(verdict(), pol)
    ys, xs = np.nonzero(m)
    assert (xs.min(), xs.max() + 1, ys.min(), ys.max() + 1) == (20, 80, 12, 58)  # 30-10 .. 70+10, floor(20-7.5) .. ceil(50+7.5)
    assert set(np.unique(m)) == {0.0, 1.0}


def test_ellipse_mask_covers_the_box_but_not_its_bounding_frame():
    pol = get_policy("face-only", expand=0.0, shape="ellipse")
    m = unsafe_mask(verdict(), pol)
    x, y, w, h = BOX
    assert m[y:y + h, x:x + w].min() == 1.0           # the whole box is covered
    assert m.sum() > w * h                             # ...by a larger ellipse
    rect = unsafe_mask(verdict(box=(0, 0, 40, 30)), get_policy("face-only", expand=1.0, shape="ellipse"))
    assert rect[0, 0] == 1.0                           # clipped at the image edge, still covered


def test_feathering_only_grows_outwards():
    pol = get_policy("face-only", expand=0.0)
    hard = unsafe_mask(verdict(), pol)
    soft = unsafe_mask(verdict(), pol, feather=4)
    assert (soft >= hard).all() and soft[hard == 1].min() == 1.0
    assert 0 < soft[hard == 0].max() < 1.0
    x, y, w, h = BOX
    row = soft[y + h // 2, x + w: x + w + 16]           # moving away from the right edge
    assert all(b <= a + 1e-6 for a, b in zip(row, row[1:]))


def test_whole_image_classifier_flag_masks_everything():
    v = judge(0, (H, W, 3), [Detection("nsfw", 0.95, None, "opennsfw")], get_policy("strict-5"),
              {"opennsfw": {"nsfw": 0.8}})
    assert unsafe_mask(v, get_policy("strict-5")).min() == 1.0


@pytest.mark.parametrize("action", ["blur", "pixelate", "fill"])
def test_region_actions_change_inside_only_and_never_touch_the_input(action, noise):
    m = unsafe_mask(verdict(), get_policy("face-only", expand=0.0))
    before = noise.copy()
    out = censor(noise, m, action, colour=(0.2, 0.4, 0.6))
    np.testing.assert_array_equal(noise, before)
    inside, outside = m == 1, m == 0
    np.testing.assert_array_equal(out[outside], noise[outside])
    assert np.abs(out[inside] - noise[inside]).mean() > 0.1
    if action == "fill":
        np.testing.assert_allclose(out[inside], np.tile([0.2, 0.4, 0.6], (inside.sum(), 1)), atol=1e-6)
    else:  # detail destroyed: far less variance than the noise had
        assert out[inside].std() < 0.5 * noise[inside].std()


def test_pixelate_makes_blocks(noise):
    m = np.ones((H, W), np.float32)
    out = censor(noise, m, "pixelate", strength=10)
    assert np.allclose(out[0:9, 0:10], out[0, 0])


def test_whole_image_actions(noise):
    m = unsafe_mask(verdict(), get_policy("face-only"))
    assert censor(noise, m, "black").max() == 0.0
    card = censor(noise, m, "placeholder")
    assert card.shape == noise.shape and 0.4 < card.mean() < 0.7
    np.testing.assert_array_equal(card, placeholder(H, W))
    np.testing.assert_array_equal(censor(noise, m, "pass"), noise)
    with pytest.raises(ValueError):
        censor(noise, m, "explode")


# ------------------------------------------------------------------ pipeline on real batches


@pytest.fixture(scope="module")
def comfy_batch(benign_set):
    """A ComfyUI IMAGE: float32 [B, 512, 512, 3] with the unsafe (face-only) picture LAST."""
    from PIL import Image

    def fit(a):
        return np.asarray(Image.fromarray(a).resize((512, 512)))

    arr = np.stack([fit(benign_set["chelsea"]), fit(benign_set["rocket"]), benign_set["astronaut"]])
    return torch.from_numpy(arr.astype(np.float32) / 255.0)


def test_every_image_of_the_batch_is_checked(comfy_batch):
    before = comfy_batch.clone()
    out = SafetyFilter(["nudenet"], "face-only", "blur").run(comfy_batch)
    assert torch.equal(comfy_batch, before)                      # input tensor untouched
    assert out.is_safe == [True, True, False]                    # not only image[0]
    assert out.costs[2] > 0.5 > max(out.costs[:2])
    np.testing.assert_array_equal(out.images[0], comfy_batch[0].numpy())
    assert out.masks[0].max() == 0 and out.masks[2].max() == 1
    changed = np.abs(out.images[2] - comfy_batch[2].numpy()).max(axis=2) > 1e-6
    ys, xs = np.nonzero(changed)
    assert 140 < xs.min() and xs.max() < 310 and 50 < ys.min() and ys.max() < 220  # around the face only


def test_block_raises_naming_the_images(comfy_batch):
    with pytest.raises(UnsafeContentError, match=r"position\(s\) \[2\].*FACE_FEMALE") as e:
        SafetyFilter(["nudenet"], "face-only", "block").run(comfy_batch)
    assert e.value.indices == [2]
    assert SafetyFilter(["nudenet"], "strict-5", "block").run(comfy_batch).is_safe == [True] * 3


def test_odd_batches(comfy_batch):
    flt = SafetyFilter(["nudenet"], "face-only", "blur")
    assert flt.run(comfy_batch[:0]).verdicts == []
    rgba = torch.cat([comfy_batch, torch.ones_like(comfy_batch[..., :1])], dim=-1)
    assert flt.run(rgba).is_safe == [True, True, False]
    grey = comfy_batch[..., :1]
    assert len(flt.run(grey).verdicts) == 3
    bad = comfy_batch.clone()
    bad[1, 5, 5, 0] = float("nan")
    with pytest.raises(ImageInputError, match="NaN"):
        flt.run(bad)
    with pytest.raises(ImageInputError):
        flt.run(torch.zeros(2, 3))
    fp16 = flt.run(comfy_batch.half())
    assert fp16.is_safe == [True, True, False]


def test_large_batch_is_processed_in_chunks(benign_set):
    flt = SafetyFilter(["nudenet"], "face-only", "pass", batch_size=4)
    batch = np.stack([benign_set["astronaut"]] * 9)
    out = flt.run(batch)
    assert out.is_safe == [False] * 9
    np.testing.assert_allclose(out.costs, out.costs[0], atol=1e-5)
