"""Issue 18 (video): clips are checked frame by frame in chunks, regions propagate over a
window of frames, "block" on any frame blocks the clip, per-frame verdicts are reported.

The temporal logic is tested with a fake detector whose findings per frame are known (the
frame number is written into pixel (0, 0)); expectations are computed here from that plan,
not by the library. The real NudeNet model runs on benign pictures that the other filter
tests use: under ``face-only`` a face stands in for "unsafe" (no NSFW material).
"""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from safet2i.errors import ImageInputError, ModelRunError, UnsafeContentError
from safet2i.filter import (
    DEFAULT_WINDOW, Detection, ModelSpec, OnnxModel, Policy, SafetyFilter, UnsafeClipError, filter_frames,
)
from safet2i.filter import video as video_mod

H, W = 48, 64
COLOUR = (0.2, 0.4, 0.6)
COLOUR_U8 = np.array([51, 102, 153], np.uint8)             # rint(COLOUR * 255)
POLICY = Policy("test", {"X": 0.5, "Y": 0.5}, expand=0.0)   # exact boxes: masks are the boxes


class PlanModel(OnnxModel):
    """A detector without ONNX. ``plan[t]`` lists ``(label, score, (x, y, w, h))`` for frame
    ``t`` (read from pixels (0, 0) and (0, 1)); a box is reported only while its region is
    still textured (a channel's std > 20 of 255), so a blurred, pixelated or filled region passes the
    re-check, as it would for a real detector."""

    def __init__(self, plan: dict[int, list]):
        self.spec = ModelSpec(name="plan", kind="detector", path=Path("plan.onnx"), sidecar=Path("plan.json"),
                              sha256="0" * 64, labels=["X", "Y"], input={}, output={}, thresholds={})
        self.mode, self.batch_size, self.name, self.colour, self.pinned = "rgb", 16, "plan", "RGB", True
        self.plan = plan
        self.calls: list[int] = []

    def detect(self, images):
        self.calls.append(len(images))
        out = []
        for img in images:
            t = int(img[0, 0, 0]) + (256 * int(img[0, 1, 0]) if img.shape[1] > 1 else 0)
            dets = []
            for label, score, (x, y, w, h) in self.plan.get(t, []):
                if img[y:y + h, x:x + w].reshape(-1, 3).astype(np.float32).std(axis=0).max() > 20:
                    dets.append(Detection(label, score, (x, y, w, h), "plan"))
            out.append(dets)
        return out

    def describe(self):
        return {"name": "plan", "kind": "detector", "pinned": True, "sha256": self.spec.sha256}


def make_clip(n: int, h: int = H, w: int = W, seed: int = 0) -> np.ndarray:
    """``uint8 [n, h, w, 3]`` noise, frame number in pixels (0, 0) and (0, 1)."""
    clip = np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    for t in range(n):
        clip[t, 0, 0], clip[t, 0, 1] = t % 256, t // 256
    return clip


def plan_filter(plan, action="fill", policy=POLICY, **kw):
    model = PlanModel(plan)
    return SafetyFilter([model], policy, action, colour=COLOUR, **kw), model


def expected_mask(plan, t: int, window: int, n: int, h: int = H, w: int = W) -> np.ndarray:
    """The union of the flagged boxes of frames t-window..t+window (threshold 0.5, no expand)."""
    m = np.zeros((h, w), np.float32)
    for u in range(max(0, t - window), min(n, t + window + 1)):
        for _, score, (x, y, bw, bh) in plan.get(u, []):
            if score >= 0.5:
                m[y:y + bh, x:x + bw] = 1.0
    return m


PLAN = {
    2: [("X", 0.9, (10, 8, 12, 10))],
    3: [("Y", 0.3, (40, 20, 10, 10))],                 # below its threshold: not flagged
    6: [("Y", 0.8, (30, 25, 20, 15)), ("X", 0.7, (5, 30, 8, 8))],
    7: [("X", 0.95, (33, 5, 14, 12))],
}
N = 12


# ------------------------------------------------------------------ temporal propagation


@pytest.mark.parametrize("window", [0, 1, 2, 5])
def test_a_region_is_censored_in_the_frames_within_the_window(window):
    clip = make_clip(N)
    flt, _ = plan_filter(PLAN)
    out = filter_frames(clip, flt, window=window, chunk_size=4)
    assert out.images.dtype == np.uint8 and out.images.shape == clip.shape
    flagged = [2, 6, 7]
    for t in range(N):
        exp = expected_mask(PLAN, t, window, N)
        np.testing.assert_array_equal(out.masks[t], exp, err_msg=f"frame {t}")
        inside = exp == 1
        np.testing.assert_array_equal(out.images[t][~inside], clip[t][~inside])
        assert (out.images[t][inside] == COLOUR_U8).all()
        entry = out.frames[t]
        assert entry["frame"] == t and entry["index"] == t
        assert entry["propagated_from"] == [u for u in flagged if u != t and abs(u - t) <= window]
        assert entry["censored"] == bool(inside.any())
    exp_censored = sorted({t for u in flagged for t in range(max(0, u - window), min(N, u + window + 1))})
    assert out.clip["censored_frames"] == exp_censored
    assert out.clip["unsafe_frames"] == flagged
    assert out.clip["window"] == window


def test_default_window_is_two_frames():
    assert DEFAULT_WINDOW == 2
    clip = make_clip(N)
    out = filter_frames(clip, plan_filter(PLAN)[0])
    assert out.clip["window"] == 2 and out.clip["censored_frames"] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]


def test_a_window_beyond_the_clip_censors_every_frame_with_every_region():
    clip = make_clip(5)
    plan = {0: [("X", 0.9, (2, 2, 6, 6))], 4: [("Y", 0.9, (50, 30, 6, 6))]}
    out = filter_frames(clip, plan_filter(plan)[0], window=100)
    for t in range(5):
        np.testing.assert_array_equal(out.masks[t], expected_mask(plan, t, 100, 5))
        assert out.masks[t][2:8, 2:8].min() == 1 and out.masks[t][30:36, 50:56].min() == 1


def test_a_whole_frame_flag_covers_the_neighbouring_frames_whole():
    class Classifier(PlanModel):
        def detect(self, images):
            self.calls.append(len(images))
            return [[Detection("X", 0.9, None, "plan")] if int(img[0, 0, 0]) == 4 and img.std() > 20 else []
                    for img in images]

    clip = make_clip(8)
    out = filter_frames(clip, SafetyFilter([Classifier({})], POLICY, "black"), window=1)
    assert out.clip["censored_frames"] == [3, 4, 5]
    for t in range(8):
        if t in (3, 4, 5):
            assert out.masks[t].min() == 1 and out.images[t].max() == 0
        else:
            assert out.masks[t].max() == 0
            np.testing.assert_array_equal(out.images[t], clip[t])


def test_window_zero_is_exactly_the_image_filter():
    clip = make_clip(N)
    for action in ("blur", "pixelate", "fill", "placeholder", "pass"):
        flt, _ = plan_filter(PLAN, action)
        out = filter_frames(clip, flt, window=0, chunk_size=5)
        ref = plan_filter(PLAN, action)[0].run(clip)
        for t in range(N):
            np.testing.assert_array_equal(out.images[t], np.rint(ref.images[t] * 255).astype(np.uint8))
            np.testing.assert_array_equal(out.masks[t], ref.masks[t])
            own = {k: v for k, v in out.frames[t].items()
                   if k not in ("frame", "labels", "censored", "propagated_from")}
            assert own == ref.verdicts[t].to_dict(), (action, t)
        assert out.is_safe is False and out.frame_is_safe == ref.is_safe


def test_a_propagated_region_is_re_checked_and_escalated_like_a_frame_of_its_own():
    # A detector that keeps flagging frames 0 and 1 whatever is done to the region: their blur
    # fails the re-check, then the fill does, so both end as the placeholder. Frame 2 is
    # censored only because of frame 1 (window 1); its re-check passes, so it stays blurred.
    class Stubborn(PlanModel):
        def detect(self, images):
            self.calls.append(len(images))
            return [[Detection("X", 0.9, (10, 10, 8, 8), "plan")] if int(img[0, 0, 0]) in (0, 1) else []
                    for img in images]

    clip = make_clip(3)
    model = Stubborn({})
    out = filter_frames(clip, SafetyFilter([model], POLICY, "blur"), window=1)
    # every censored frame (0, 1 own; 2 propagated) still "trips" when its id is 0/1: fill, then placeholder
    assert [v.escalated for v in out.verdicts] == ["placeholder", "placeholder", None]
    assert out.clip["escalated_frames"] == [0, 1]
    assert [f["escalated"] for f in out.frames] == ["placeholder", "placeholder", None]
    assert out.frames[2]["censored"] and out.frames[2]["propagated_from"] == [1]
    assert out.masks[2][10:18, 10:18].min() == 1 and out.masks[2].sum() == 64


# ------------------------------------------------------------------ block


def test_block_on_one_frame_blocks_the_whole_clip():
    clip = make_clip(10)
    plan = {7: [("X", 0.9, (10, 8, 12, 10))]}
    flt, model = plan_filter(plan, "block")
    with pytest.raises(UnsafeClipError) as e:
        filter_frames(clip, flt, window=0, chunk_size=3)
    err = e.value
    assert isinstance(err, UnsafeContentError)
    assert err.indices == [7]
    assert "whole clip of 10 frame(s)" in str(err) and "[7]" in str(err) and "X" in str(err)
    assert err.clip["verdict"] == "blocked" and err.clip["unsafe_frames"] == [7] and err.clip["frames"] == 10
    assert [f["verdict"] for f in err.frames] == ["safe"] * 7 + ["unsafe"] + ["safe"] * 2
    assert [r["index"] for r in err.report] == [7]
    assert sum(model.calls) == 10           # checked once; nothing censored or re-checked


def test_block_with_a_safe_clip_returns_it_unchanged():
    clip = make_clip(6)
    out = filter_frames(clip, plan_filter({2: [("X", 0.4, (1, 1, 5, 5))]}, "block")[0])
    np.testing.assert_array_equal(out.images, clip)
    assert out.is_safe and out.clip["verdict"] == "safe" and out.masks.max() == 0


def test_the_block_message_lists_long_runs_shortly():
    n = 40
    plan = {t: [("X", 0.9, (10, 8, 12, 10))] for t in range(n)}
    with pytest.raises(UnsafeClipError, match=r"40 unsafe frame\(s\) \[0, 1, .*19, \.\.\. 40 in all\]"):
        filter_frames(make_clip(n), plan_filter(plan, "block")[0])


# ------------------------------------------------------------------ chunking, memory


def test_chunking_gives_the_same_result_as_one_batch():
    n = 23
    plan = {t: [("X", 0.6 + 0.01 * t, (t, 5, 10, 9))] for t in range(0, n, 4)}
    clip = make_clip(n)
    whole_flt, whole_model = plan_filter(plan, "blur")
    whole = filter_frames(clip, whole_flt, window=3, chunk_size=n)
    assert whole_model.calls[0] == n                                 # one batch: the reference
    for chunk in (1, 2, 5, 16):
        flt, model = plan_filter(plan, "blur")
        out = filter_frames(clip, flt, window=3, chunk_size=chunk)
        np.testing.assert_array_equal(out.images, whole.images)
        np.testing.assert_array_equal(out.masks, whole.masks)
        assert out.frames == whole.frames and out.clip == whole.clip
        assert max(model.calls) <= chunk
        assert sum(model.calls[: -(-n // chunk)]) == n               # the check pass saw every frame once


def test_large_frames_make_smaller_chunks(monkeypatch):
    monkeypatch.setattr(video_mod, "CENSOR_CHUNK_PIXELS", 3 * H * W)
    flt, model = plan_filter({})
    filter_frames(make_clip(10), flt, chunk_size=16)
    assert model.calls == [3, 3, 3, 1]


def test_memory_beyond_input_and_output_is_one_chunk():
    n, h, w, chunk = 240, 64, 64, 8
    plan = {t: [("X", 0.9, (4, 4, 20, 20))] for t in range(0, n, 9)}
    clip = make_clip(n, h, w)
    flt, _ = plan_filter(plan, "blur")
    tracemalloc.start()
    try:
        out = filter_frames(clip, flt, window=2, chunk_size=chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    held = out.images.nbytes + out.masks.nbytes
    one_chunk_float = chunk * h * w * 3 * 4
    assert out.images.nbytes == clip.nbytes
    # Everything else (converted frames, censored copies, masks of one chunk, reports) stays
    # a few chunks' worth; converting the whole clip to float32 would take 4x the clip.
    assert peak - held < 8 * one_chunk_float, (peak, held, one_chunk_float)
    assert 8 * one_chunk_float < 4 * clip.nbytes


def test_progress_counts_every_frame_of_both_passes():
    seen = []
    filter_frames(make_clip(11), plan_filter(PLAN)[0], chunk_size=4, progress=seen.append)
    assert seen == [4, 4, 3, 4, 4, 3]


# ------------------------------------------------------------------ inputs


@pytest.mark.parametrize("kind", ["uint8", "float32", "torch-float32", "torch-half", "list-torch"])
def test_inputs_are_never_modified(kind):
    u8 = make_clip(7)
    if kind == "uint8":
        clip = u8
    elif kind == "float32":
        clip = u8.astype(np.float32) / 255
    elif kind == "torch-float32":
        clip = torch.from_numpy(u8.astype(np.float32) / 255)
    elif kind == "torch-half":
        clip = torch.from_numpy(u8.astype(np.float32) / 255).half()
    else:
        clip = [torch.from_numpy(f) for f in u8]
    if kind == "list-torch":
        before = [f.clone() for f in clip]
    else:
        before = clip.clone() if isinstance(clip, torch.Tensor) else clip.copy()
    out = filter_frames(clip, plan_filter(PLAN, "blur")[0], window=1, chunk_size=3)
    if kind == "list-torch":
        assert all(torch.equal(a, b) for a, b in zip(clip, before))
        assert out.images.dtype == np.uint8
    elif isinstance(clip, torch.Tensor):
        assert torch.equal(clip, before)
        assert out.images.dtype == np.float32
        assert not np.shares_memory(out.images, clip.numpy()) if clip.dtype == torch.float32 else True
    else:
        np.testing.assert_array_equal(clip, before)
        assert not np.shares_memory(out.images, clip)
    assert out.clip["censored_frames"] == [1, 2, 3, 5, 6]     # 7 frames: 2 and 6 flagged, window 1
    assert out.masks[1][8:18, 10:22].min() == 1


def test_float_output_is_the_clipped_pixels_judged():
    clip = make_clip(3).astype(np.float32) / 255
    clip[1, 30:40, 30:40] = 1.7                         # out of range: clipped, like SafetyFilter.run
    out = filter_frames(clip, plan_filter({})[0])
    assert out.images.dtype == np.float32
    np.testing.assert_array_equal(out.images, np.clip(clip, 0, 1))


def test_odd_sizes_grey_and_rgba_frames():
    clip = make_clip(4, 37, 53)
    plan = {1: [("X", 0.9, (30, 20, 23, 17))]}         # touching the bottom-right corner
    out = filter_frames(clip[..., :1].repeat(3, axis=3), plan_filter(plan)[0], window=1)
    assert out.images.shape == (4, 37, 53, 3)
    grey = filter_frames(clip[..., :1], plan_filter({})[0])
    np.testing.assert_array_equal(grey.images, np.repeat(clip[..., :1], 3, axis=3))
    rgba = np.concatenate([clip, np.full_like(clip[..., :1], 255)], axis=3)
    res = filter_frames(rgba, plan_filter(plan)[0], window=1)
    assert res.clip["censored_frames"] == [0, 1, 2]
    np.testing.assert_array_equal(res.masks[0], expected_mask(plan, 0, 1, 4, 37, 53))
    one = filter_frames(np.full((1, 1, 1, 3), 7, np.uint8), plan_filter({})[0])
    assert one.images.shape == (1, 1, 1, 3) and (one.images == 7).all()


@pytest.mark.parametrize("clip, match", [
    (np.zeros((0, 8, 8, 3), np.uint8), "empty"),
    ([], "empty"),
    (np.zeros((8, 8, 3), np.uint8), r"\[T, H, W, C\]"),
    (np.zeros((2, 3, 16, 16), np.float32), "channels first"),
    (np.zeros((2, 0, 5, 3), np.uint8), "empty"),
    (np.zeros((2, 4, 4, 3), np.int16), "int16"),
    ([np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 3), np.uint8), np.zeros((9, 8, 3), np.uint8)],
     r"Frame 2 is 8x9 but frame 0 is 8x8"),
])
def test_bad_clips_are_clear_errors(clip, match):
    with pytest.raises(ImageInputError, match=match):
        filter_frames(clip, plan_filter({})[0])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_pixels_name_the_frame(bad):
    clip = make_clip(9).astype(np.float32) / 255
    clip[6, 3, 3, 1] = bad
    flt, model = plan_filter(PLAN)
    with pytest.raises(ImageInputError, match=r"Frame 6: .*(NaN|infinite)"):
        filter_frames(clip, flt, chunk_size=4)
    assert model.calls == [4]                       # stopped at the chunk holding frame 6
    t = torch.from_numpy(clip)
    with pytest.raises(ImageInputError, match="Frame 6"):
        filter_frames(t, plan_filter(PLAN)[0], chunk_size=4)


@pytest.mark.parametrize("window", [-1, 1.5, True, "two", float("nan")])
def test_bad_windows_are_errors(window):
    with pytest.raises(ValueError, match="window"):
        filter_frames(make_clip(2), plan_filter({})[0], window=window)


@pytest.mark.parametrize("chunk", [0, -3, 2.5, True])
def test_bad_chunk_sizes_are_errors(chunk):
    with pytest.raises(ValueError, match="chunk_size"):
        filter_frames(make_clip(2), plan_filter({})[0], chunk_size=chunk)


def test_a_model_that_fails_lets_no_frame_out():
    class Broken(PlanModel):
        def detect(self, images):
            self.calls.append(len(images))
            if len(self.calls) == 2:
                raise ModelRunError("plan failed on a batch (simulated)")
            return [[] for _ in images]

    with pytest.raises(ModelRunError, match="simulated"):
        filter_frames(make_clip(9), SafetyFilter([Broken({})], POLICY, "blur"), chunk_size=4)


# ------------------------------------------------------------------ report


def test_per_frame_report_and_clip_verdict():
    clip = make_clip(N)
    out = filter_frames(clip, plan_filter(PLAN)[0], window=1)
    # independently: g(s, t) = 0.5 + 0.5 (s - t) / (1 - t) at or above t, 0.5 s / t below
    exp_cost = {2: 0.9, 3: 0.5 * 0.3 / 0.5, 6: 0.5 + 0.5 * (0.8 - 0.5) / 0.5, 7: 0.95}
    for t, entry in enumerate(out.frames):
        assert entry["cost"] == pytest.approx(exp_cost.get(t, 0.0), abs=1e-6)
        assert out.costs[t] == pytest.approx(exp_cost.get(t, 0.0), abs=1e-6)
        assert entry["verdict"] == ("unsafe" if t in (2, 6, 7) else "safe")
        assert entry["labels"] == {2: ["X"], 6: ["X", "Y"], 7: ["X"]}.get(t, [])
        assert (entry["width"], entry["height"]) == (W, H)
    assert out.frames[3]["detections"][0]["label"] == "Y" and not out.frames[3]["detections"][0]["flagged"]
    assert out.frames[3]["labels"] == [] and out.frames[3]["censored"] and out.frames[3]["propagated_from"] == [2]
    assert out.frames[6]["propagated_from"] == [7] and out.frames[7]["propagated_from"] == [6]
    assert out.clip == {
        "frames": N, "verdict": "unsafe", "cost": 0.95, "unsafe_frames": [2, 6, 7],
        "censored_frames": [1, 2, 3, 5, 6, 7, 8], "escalated_frames": [], "labels": ["X", "Y"],
        "window": 1, "action": "fill",
    }
    assert out.report() == {"clip": out.clip, "frames": out.frames}
    assert out.is_safe is False
    assert out.frame_is_safe == [t not in (2, 6, 7) for t in range(N)]


def test_pass_reports_and_masks_but_changes_no_pixel():
    clip = make_clip(N)
    out = filter_frames(clip, plan_filter(PLAN, "pass")[0], window=1)
    np.testing.assert_array_equal(out.images, clip)
    np.testing.assert_array_equal(out.masks[3], expected_mask(PLAN, 3, 1, N))
    assert out.clip["censored_frames"] == [] and out.clip["unsafe_frames"] == [2, 6, 7]


# ------------------------------------------------------------------ the real NudeNet model


@pytest.fixture(scope="module")
def face_clip(benign_set):
    """uint8 [6, 512, 512, 3]: chelsea, chelsea, astronaut (a face), chelsea x3."""
    from PIL import Image

    cat = np.asarray(Image.fromarray(benign_set["chelsea"]).resize((512, 512)))
    return np.stack([cat, cat, benign_set["astronaut"], cat, cat, cat])


@pytest.fixture(scope="module")
def nudenet_face_filter():
    return SafetyFilter(["nudenet"], "face-only", "blur")


def test_nudenet_face_is_censored_in_the_neighbouring_frames(face_clip, nudenet_face_filter, benign_set):
    before = face_clip.copy()
    out = filter_frames(face_clip, nudenet_face_filter, window=1, chunk_size=4)
    np.testing.assert_array_equal(face_clip, before)
    assert out.frame_is_safe == [True, True, False, True, True, True]
    assert out.frames[2]["labels"] == ["FACE_FEMALE"] and out.frames[2]["cost"] > 0.5
    assert out.clip["censored_frames"] == [1, 2, 3] and out.clip["verdict"] == "unsafe"
    # The face's mask, computed independently by the image filter on the astronaut alone:
    ref = SafetyFilter(["nudenet"], "face-only", "blur").run([benign_set["astronaut"]])
    for t in (1, 2, 3):
        np.testing.assert_array_equal(out.masks[t], ref.masks[0])
        changed = np.abs(out.images[t].astype(int) - face_clip[t].astype(int)).max(axis=2) > 0
        ys, xs = np.nonzero(changed)
        assert changed.sum() > 2000
        assert 140 < xs.min() and xs.max() < 310 and 50 < ys.min() and ys.max() < 220   # the face region only
    for t in (0, 4, 5):
        np.testing.assert_array_equal(out.images[t], face_clip[t])
        assert out.masks[t].max() == 0
    # The censored face frame no longer trips the model (judged independently).
    again = SafetyFilter(["nudenet"], "face-only", "pass").check([out.images[2]])[0]
    assert not again.unsafe


def test_nudenet_block_blocks_the_clip_and_strict_policy_passes_it(face_clip):
    with pytest.raises(UnsafeClipError, match=r"whole clip of 6 frame\(s\).*\[2\].*FACE_FEMALE") as e:
        filter_frames(face_clip, SafetyFilter(["nudenet"], "face-only", "block"))
    assert e.value.indices == [2] and e.value.clip["verdict"] == "blocked"
    out = filter_frames(torch.from_numpy(face_clip.astype(np.float32) / 255),
                        SafetyFilter(["nudenet"], "strict-5", "block"))
    assert out.is_safe and out.clip["censored_frames"] == []
    np.testing.assert_allclose(out.images, face_clip.astype(np.float32) / 255, atol=0)


def test_nudenet_chunks_and_one_batch_agree(face_clip, nudenet_face_filter):
    a = filter_frames(face_clip, nudenet_face_filter, window=2, chunk_size=1)
    b = filter_frames(face_clip, nudenet_face_filter, window=2, chunk_size=6)
    assert [f["labels"] for f in a.frames] == [f["labels"] for f in b.frames]
    assert a.clip["censored_frames"] == b.clip["censored_frames"] == [0, 1, 2, 3, 4]
    np.testing.assert_array_equal(a.masks, b.masks)
    for fa, fb in zip(a.frames, b.frames):
        assert fa["cost"] == pytest.approx(fb["cost"], abs=1e-4)
