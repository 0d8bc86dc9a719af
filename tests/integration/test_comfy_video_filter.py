"""The Video Filter node in a real ComfyUI server (issue 18, video): IMAGE frames and VIDEO in,
regions carried to neighbouring frames, block stops the clip, frame rate and audio kept.

The clip is benign: four frames of the chelsea cat and one of the astronaut; under
``face-only`` her face (FACE_FEMALE ~0.81) stands in for "unsafe".
"""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest

pytestmark = pytest.mark.integration

LOADER, VIDEO = "SafeT2IFilterModelLoader", "SafeT2IVideoFilter"
INPUTS = ["filter_models", "policy", "action", "window", "thresholds", "expand", "mask_shape", "feather",
          "strength", "fps", "images", "video"]
OUTPUTS = ["IMAGE", "MASK", "FLOAT", "BOOLEAN", "STRING", "VIDEO"]
FACE = (slice(105, 160), slice(195, 250))      # inside the astronaut's face box (173, 82, 100, 97)
N_FRAMES, FPS = 5, 8


@pytest.fixture(scope="module")
def clip_inputs(comfy):
    """``(cat frame, face frame)`` uint8 arrays, saved as PNGs in ComfyUI's input."""
    import skimage.data
    from PIL import Image

    cat = np.asarray(Image.fromarray(skimage.data.chelsea()).resize((512, 512)))
    face = skimage.data.astronaut()
    Image.fromarray(cat).save(comfy.input_dir / "sv_cat.png")
    Image.fromarray(face).save(comfy.input_dir / "sv_face.png")
    return cat, face


WRITE_MP4 = """
import sys, numpy as np, av
from PIL import Image
out, fps, *pngs = sys.argv[1:]
frames = [np.asarray(Image.open(p).convert("RGB")) for p in pngs]
rate = 16000
with av.open(out, mode="w", format="mp4") as c:
    v = c.add_stream("h264", rate=int(fps))
    v.width, v.height, v.pix_fmt = frames[0].shape[1], frames[0].shape[0], "yuv420p"
    a = c.add_stream("aac", rate=rate)
    for f in frames:
        c.mux(v.encode(av.VideoFrame.from_ndarray(f, format="rgb24").reformat(format="yuv420p")))
    c.mux(v.encode(None))
    n = int(rate * len(frames) / int(fps))
    tone = (0.25 * np.sin(2 * np.pi * 440 * np.arange(n) / rate)).astype(np.float32)[None]
    af = av.AudioFrame.from_ndarray(tone, format="flt", layout="mono")
    af.sample_rate, af.pts = rate, 0
    c.mux(a.encode(af))
    c.mux(a.encode(None))
"""


def clip_nodes() -> dict:
    """Nodes 1..5 build the IMAGE clip [cat, cat, face, cat, cat] (node "5")."""
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": "sv_cat.png"}},
        "2": {"class_type": "LoadImage", "inputs": {"image": "sv_face.png"}},
        "3": {"class_type": "ImageBatch", "inputs": {"image1": ["1", 0], "image2": ["1", 0]}},
        "4": {"class_type": "ImageBatch", "inputs": {"image1": ["3", 0], "image2": ["2", 0]}},
        "5": {"class_type": "ImageBatch", "inputs": {"image1": ["4", 0], "image2": ["3", 0]}},
        "10": {"class_type": LOADER, "inputs": {"model": "nudenet", "providers": "auto"}},
    }


def video_filter(action: str, window: int, policy: str = "face-only", **clip) -> dict:
    return {"class_type": VIDEO, "inputs": {
        "filter_models": ["10", 0], "policy": policy, "action": action, "window": window, "thresholds": "",
        "expand": 0.1, "mask_shape": "rect", "feather": 0.0, "strength": 0.0, "fps": 24.0, **clip}}


def saved_pngs(comfy, entry: dict, node: str) -> list[np.ndarray]:
    from PIL import Image

    return [np.asarray(Image.open(comfy.output_dir / im["subfolder"] / im["filename"]).convert("RGB"))
            for im in entry["outputs"].get(node, {}).get("images", [])
            if im.get("type") == "output" and im["filename"].endswith(".png")]


def text_of(entry: dict, node: str = "20") -> str:
    return "\n".join(entry["outputs"].get(node, {}).get("text", []))


def probe(path) -> dict:
    """Frame rate, frame count and audio streams of a video, read with ComfyUI's own PyAV."""
    code = ("import av, json, sys\n"
            "c = av.open(sys.argv[1]); v = c.streams.video[0]\n"
            "n = sum(1 for _ in c.decode(video=0))\n"
            "print(json.dumps({'rate': float(v.average_rate), 'frames': n, 'audio': len(c.streams.audio),"
            " 'size': [v.width, v.height]}))")
    out = subprocess.run([os.environ["COMFYUI_PYTHON"], "-c", code, str(path)], capture_output=True, text=True,
                         timeout=120, check=True)
    return json.loads(out.stdout)


def changed(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(a.astype(int) - b.astype(int)).max(axis=2) > 8


def test_video_filter_is_registered_with_its_schema(comfy):
    info = comfy.get("/object_info")
    assert VIDEO in info, f"{VIDEO} missing; log:\n{comfy.log_tail()}"
    spec = info[VIDEO]
    order = spec["input_order"]
    assert order["required"] + order.get("optional", []) == INPUTS
    assert order["optional"] == ["images", "video"]
    assert spec["output"] == OUTPUTS
    assert spec["output_is_list"] == [False, False, True, False, False, False]
    assert spec["category"] == "SafeT2I/filter"
    assert spec["input"]["required"]["window"][1]["default"] == 2


@pytest.mark.parametrize("window, censored", [(1, [1, 2, 3]), (0, [2])])
def test_the_face_is_censored_in_the_frames_within_the_window(comfy, clip_inputs, window, censored):
    cat, face = clip_inputs
    g = clip_nodes()
    g["20"] = video_filter("pixelate", window, images=["5", 0])
    g["30"] = {"class_type": "SaveImage", "inputs": {"images": ["20", 0], "filename_prefix": f"sv_w{window}"}}
    entry = comfy.run(g)
    assert entry["status"]["status_str"] == "success", entry["status"]
    text = text_of(entry)
    assert f"{N_FRAMES} frame(s) from images" in text and "1 unsafe" in text and f"{len(censored)} censored" in text
    assert "frame 2: UNSAFE" in text and "FACE_FEMALE" in text
    if window:
        assert "frame 1: safe (cost" in text and "censored for frame(s) [2]" in text
    frames = saved_pngs(comfy, entry, "30")
    assert len(frames) == N_FRAMES
    originals = [cat, cat, face, cat, cat]
    regions = {}
    for t, (got, orig) in enumerate(zip(frames, originals)):
        diff = changed(got, orig)
        if t not in censored:
            assert np.abs(got.astype(int) - orig.astype(int)).max() <= 1, t     # untouched
            continue
        ys, xs = np.nonzero(diff)
        assert diff.sum() > 2000, t
        assert 140 < xs.min() and xs.max() < 310 and 50 < ys.min() and ys.max() < 220, t   # the face's place
        regions[t] = (xs.min(), xs.max(), ys.min(), ys.max())
    if window:   # the cat frames are censored where the face is in frame 2
        assert abs(regions[1][0] - regions[2][0]) <= 12 and abs(regions[3][3] - regions[2][3]) <= 12


def test_a_video_keeps_its_frame_rate_and_audio_and_leaves_filtered(comfy, clip_inputs):
    cat, _ = clip_inputs
    # An unfiltered H.264 + AAC file of the clip at 8 fps, written with ComfyUI's own PyAV.
    pngs = [str(comfy.input_dir / f"sv_{n}.png") for n in ("cat", "cat", "face", "cat", "cat")]
    subprocess.run([os.environ["COMFYUI_PYTHON"], "-c", WRITE_MP4, str(comfy.input_dir / "sv_clip.mp4"), str(FPS),
                    *pngs], check=True, timeout=120, capture_output=True)

    g = {"10": clip_nodes()["10"],
         "11": {"class_type": "LoadVideo", "inputs": {"file": "sv_clip.mp4"}},
         "20": video_filter("fill", 1, video=["11", 0]),
         "21": {"class_type": "SaveVideo", "inputs": {"video": ["20", 5], "filename_prefix": "sv_filtered",
                                                      "format": "mp4", "codec": "h264"}},
         "22": {"class_type": "GetVideoComponents", "inputs": {"video": ["20", 5]}},
         "23": {"class_type": "SaveImage", "inputs": {"images": ["22", 0], "filename_prefix": "sv_vframes"}},
         "24": {"class_type": "SaveImage", "inputs": {"images": ["20", 0], "filename_prefix": "sv_iframes"}}}
    entry = comfy.run(g)
    assert entry["status"]["status_str"] == "success", entry["status"]
    text = text_of(entry)
    assert f"{N_FRAMES} frame(s) from video at {FPS:.3f} fps with audio" in text, text
    assert "1 unsafe, 3 censored (window 1, action fill)" in text, text
    (out,) = sorted(comfy.output_dir.glob("sv_filtered*.mp4"))
    meta = probe(out)
    assert meta["rate"] == pytest.approx(FPS) and meta["frames"] == N_FRAMES and meta["audio"] == 1, meta
    assert meta["size"] == [512, 512]
    vframes, iframes = saved_pngs(comfy, entry, "23"), saved_pngs(comfy, entry, "24")
    assert len(vframes) == len(iframes) == N_FRAMES
    for t in range(N_FRAMES):
        np.testing.assert_array_equal(vframes[t], iframes[t])        # the VIDEO is the filtered frames
        patch = vframes[t][FACE]
        if t in (1, 2, 3):
            assert patch.max() == 0, t                                  # filled black where the face is
        else:
            assert patch.mean() > 40, t
            assert np.abs(vframes[t].astype(int) - cat.astype(int)).mean() < 6, t   # the cat, through h264


def test_block_on_one_frame_stops_the_workflow_and_saves_nothing(comfy, clip_inputs):
    g = clip_nodes()
    g["20"] = video_filter("block", 0, images=["5", 0])
    g["30"] = {"class_type": "SaveImage", "inputs": {"images": ["20", 0], "filename_prefix": "sv_block"}}
    entry = comfy.run(g)
    assert entry["status"]["status_str"] == "error"
    msgs = json.dumps(entry["status"].get("messages", []))
    assert "UnsafeClipError" in msgs and "blocked the whole clip of 5 frame(s)" in msgs and "[2]" in msgs
    assert not list(comfy.output_dir.glob("sv_block*"))


def test_a_benign_clip_passes_unchanged_under_the_default_policy(comfy, clip_inputs):
    cat, face = clip_inputs
    g = clip_nodes()
    g["20"] = video_filter("black", 2, policy="strict-5", images=["5", 0])
    g["30"] = {"class_type": "SaveImage", "inputs": {"images": ["20", 0], "filename_prefix": "sv_benign"}}
    entry = comfy.run(g)
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert "0 unsafe, 0 censored" in text_of(entry)
    for got, orig in zip(saved_pngs(comfy, entry, "30"), [cat, cat, face, cat, cat]):
        assert np.abs(got.astype(int) - orig.astype(int)).max() <= 1


@pytest.mark.parametrize("clip, why", [({}, "got neither"), ({"images": ["5", 0], "video": ["7", 0]}, "got both")])
def test_neither_or_both_clips_is_a_clear_error(comfy, clip_inputs, clip, why):
    g = clip_nodes()
    g["7"] = {"class_type": "CreateVideo", "inputs": {"images": ["5", 0], "fps": 8.0}}
    g["20"] = video_filter("blur", 1, **clip)
    g["30"] = {"class_type": "SaveImage", "inputs": {"images": ["20", 0], "filename_prefix": "sv_none"}}
    entry = comfy.run(g)
    assert entry["status"]["status_str"] == "error"
    msgs = json.dumps(entry["status"].get("messages", []))
    assert "exactly one clip" in msgs and why in msgs
    assert not list(comfy.output_dir.glob("sv_none*"))
