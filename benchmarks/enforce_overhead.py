"""Operator enforcement's cost in ComfyUI (issue 19): the same 4-image batch saved by a server with
enforcement off and by one with ``SAFET2I_ENFORCE`` on, measured in the same run; prints the
ratios, never asserts.

Workflow: LoadImage → RepeatImageBatch (4) → SaveImage, queued over the API; the time is the
server's own, from its ``execution_start`` to its ``execution_success`` message (millisecond
timestamps in ``/history``), so the client's polling does not count. LoadImage's output is cached
after the first run; each run uses a new ``filename_prefix`` so SaveImage, the output node, runs
every time.
Two pictures: a benign face (skimage's astronaut), which the ``face-only`` policy censors, and a
cat (chelsea), where nothing is censored (the filter still runs). Enforcement: ``face-only``,
action blur, NudeNet ``320n.onnx`` on CPU.

    COMFYUI_PATH=/path/to/ComfyUI COMFYUI_PYTHON=/path/to/comfy/python \\
        .venv/bin/python benchmarks/enforce_overhead.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _graph(image: str, prefix: str) -> dict:
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": image}},
        "2": {"class_type": "RepeatImageBatch", "inputs": {"image": ["1", 0], "amount": 4}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": prefix}},
    }


def _timed_runs(server, image: str, repeats: int, tag: str) -> float:
    server.run(_graph(image, f"{tag}_warm"))        # warm-up: model load, LoadImage cached
    times = []
    for i in range(repeats):
        entry = server.run(_graph(image, f"{tag}_{i}"))
        if entry["status"]["status_str"] != "success":
            raise SystemExit(f"{tag}: the prompt failed: {entry['status']}")
        stamps = {name: data.get("timestamp") for name, data in entry["status"]["messages"]}
        times.append((stamps["execution_success"] - stamps["execution_start"]) / 1000.0)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(REPO))
    import skimage.data
    from PIL import Image

    from tests.integration.conftest import start_server

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode, env in (("off", {}), ("on", {"SAFET2I_ENFORCE": "face-only", "SAFET2I_ENFORCE_ACTION": "blur"})):
            with start_server(Path(tmp) / mode, env) as server:
                Image.fromarray(skimage.data.astronaut()).save(server.input_dir / "astronaut.png")
                Image.fromarray(skimage.data.chelsea()).save(server.input_dir / "chelsea.png")
                for image in ("astronaut.png", "chelsea.png"):
                    results[(mode, image)] = _timed_runs(server, image, args.repeats, f"{mode}_{image[:-4]}")
    print(f"LoadImage -> RepeatImageBatch(4) -> SaveImage, ComfyUI server per mode, median of {args.repeats}")
    print(f"{'picture':<28} {'off s':>7} {'on s':>7} {'ratio':>6}")
    for image, label in (("astronaut.png", "astronaut 512x512 (censored)"), ("chelsea.png", "chelsea 451x300 (safe)")):
        off, on = results[("off", image)], results[("on", image)]
        print(f"{label:<28} {off:7.3f} {on:7.3f} {on / off:6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
