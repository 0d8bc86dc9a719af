"""Images/second of the SafeT2I NudeNet filter against two peers, same images, same run.

Peers:
  * ``nudenet loop``: the ``nudenet`` package's own ``NudeDetector.detect`` called per image
    (what peers' nodes do);
  * ``bare session.run``: onnxruntime alone on already preprocessed batches (no pre- or
    post-processing at all): the ceiling.

Targets (issue #2), at batch 16: CPU >= 1.4x the nudenet loop and within 10% of bare
session.run; GPU >= 10x the nudenet loop. Prints ratios; never asserts.

    python benchmarks/filter_throughput.py [--images 64] [--batch 16] [--repeats 3] [--providers auto]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from safet2i.filter import SafetyFilter, load_model  # noqa: E402
from safet2i.filter.detectors import _normalise, _pad_square_resize  # noqa: E402
from safet2i.runtime import resolve_providers  # noqa: E402


def benign_images(n: int) -> list[np.ndarray]:
    import skimage.data as d
    from PIL import Image

    base = [d.astronaut(), d.coffee(), d.chelsea(), np.repeat(d.camera()[:, :, None], 3, 2), d.rocket()]
    out = []
    for i in range(n):
        im = base[i % len(base)]
        if i % 2:  # vary sizes a little, as real outputs do
            im = np.asarray(Image.fromarray(im).resize((512, 768)))
        out.append(np.ascontiguousarray(im))
    return out


def best_rate(fn, n_images: int, repeats: int) -> float:
    fn()  # warm-up (session initialisation, allocator)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return n_images / statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--providers", default="auto")
    args = ap.parse_args(argv)

    from nudenet import NudeDetector

    imgs = benign_images(args.images)
    providers = resolve_providers(args.providers)
    model = load_model("nudenet", providers=args.providers, batch_size=args.batch)
    flt = SafetyFilter([model], "strict-5", "pass")
    peer = NudeDetector(providers=providers)
    sess, name = model.loaded.session, model.loaded.input_name

    # Preprocessing done once, outside the timing, for the bare-session ceiling.
    blobs = []
    for s in range(0, len(imgs), args.batch):
        chunk = imgs[s:s + args.batch]
        u8 = np.stack([_pad_square_resize(im, 320)[0] for im in chunk])
        blobs.append(_normalise(u8, model.spec.input, "RGB"))

    r_peer = best_rate(lambda: [peer.detect(im) for im in imgs], len(imgs), args.repeats)
    r_bare = best_rate(lambda: [sess.run(None, {name: b}) for b in blobs], len(imgs), args.repeats)
    r_ours = best_rate(lambda: flt.check_uint8(imgs), len(imgs), args.repeats)

    print(f"providers: {', '.join(model.providers)}; {len(imgs)} images, batch {args.batch}")
    print(f"{'nudenet NudeDetector.detect loop':36s} {r_peer:8.1f} img/s")
    print(f"{'bare session.run (preprocessed)':36s} {r_bare:8.1f} img/s")
    print(f"{'safet2i SafetyFilter.check':36s} {r_ours:8.1f} img/s")
    print(f"ratio safet2i / nudenet loop   = {r_ours / r_peer:5.2f}x  (target >= 1.4x on CPU, >= 10x on GPU)")
    print(f"ratio safet2i / bare session   = {r_ours / r_bare:5.2f}   (target >= 0.90)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
