"""Frames/second of the SafeT2I video filter against the plain per-image filter loop, same clip, same run.

The clip is benign: a slow pan across the astronaut picture (her face moves through the
frames) alternating with a pan across the coffee picture, ``--frames`` frames of
``--size`` x ``--size`` pixels, uint8. Under the default ``face-only`` policy the face stands
in for "unsafe", so censoring, re-checks and (for the video filter) propagation are part of
what is timed; ``--policy strict-5`` times checking alone (nothing is flagged).

Measured, each with the same loaded NudeNet model and policy:
  * ``per-image loop`` (the named peer): ``SafetyFilter.run([frame])`` once per frame, as a
    host calling the image filter frame by frame does;
  * ``image filter, batched``: ``SafetyFilter.run`` on chunks of ``--batch`` frames (the
    Image Filter node's way), no temporal propagation;
  * ``filter_frames``: :func:`safet2i.filter.filter_frames` with ``--window`` (default 2).

Prints frames/s and the ratios; never asserts.

    python benchmarks/filter_video_throughput.py [--frames 48] [--size 512] [--window 2] [--batch 16]
                                                 [--repeats 3] [--policy face-only] [--action blur]
                                                 [--providers auto]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from filter_throughput import best_rate  # noqa: E402 - the image benchmark's timing, shared

from safet2i.filter import SafetyFilter, filter_frames, load_model  # noqa: E402


def benign_clip(n: int, size: int) -> np.ndarray:
    """uint8 [n, size, size, 3]: pans across two benign pictures (astronaut frames first in each pair)."""
    import skimage.data as d
    from PIL import Image

    def fit(im, side):
        return np.asarray(Image.fromarray(im).resize((side, side)))

    big = int(size * 1.25)
    sources = [fit(d.astronaut(), big), fit(d.coffee(), big)]
    span = big - size
    frames = []
    for t in range(n):
        src = sources[(t // 8) % 2]                 # 8 frames of one picture, then 8 of the other
        off = (t * 3) % (span + 1)
        frames.append(src[off // 2: off // 2 + size, off: off + size])
    return np.ascontiguousarray(np.stack(frames))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=48)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--window", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--policy", default="face-only")
    ap.add_argument("--action", default="blur")
    ap.add_argument("--providers", default="auto")
    args = ap.parse_args(argv)

    clip = benign_clip(args.frames, args.size)
    model = load_model("nudenet", providers=args.providers, batch_size=args.batch)
    flt = SafetyFilter([model], args.policy, args.action)

    def per_image():
        return [flt.run(clip[t:t + 1]) for t in range(len(clip))]

    def batched():
        return [flt.run(clip[s:s + args.batch]) for s in range(0, len(clip), args.batch)]

    def video():
        return filter_frames(clip, flt, window=args.window, chunk_size=args.batch)

    res = video()
    n_unsafe, n_censored = len(res.clip["unsafe_frames"]), len(res.clip["censored_frames"])
    r_peer = best_rate(per_image, len(clip), args.repeats)
    r_batch = best_rate(batched, len(clip), args.repeats)
    r_video = best_rate(video, len(clip), args.repeats)

    print(f"providers: {', '.join(model.providers)}; {len(clip)} frames {args.size}x{args.size} uint8, "
          f"batch {args.batch}, policy {args.policy}, action {args.action}, window {args.window}")
    print(f"frames flagged: {n_unsafe}; frames censored by filter_frames: {n_censored}")
    print(f"{'per-image loop SafetyFilter.run([f])':40s} {r_peer:8.1f} frames/s")
    print(f"{'image filter, batched SafetyFilter.run':40s} {r_batch:8.1f} frames/s")
    print(f"{'safet2i filter_frames (window)':40s} {r_video:8.1f} frames/s")
    print(f"ratio filter_frames / per-image loop = {r_video / r_peer:5.2f}x")
    print(f"ratio filter_frames / batched run    = {r_video / r_batch:5.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
