"""Issue 14, class 4: the memory of ``safet2i filter`` is bounded by its documented budget.

Runs the measurement of ``benchmarks/filter_memory.py`` (same code, same inputs): the CLI in
its own process, peak RSS from ``getrusage`` in a fresh helper process.

* a 100-frame 3000 x 3000 GIF (900 Mpx decoded, over the 300 Mpx per-file budget): a
  per-file budget error naming the file, exit status 2, no traceback, no ``MemoryError``;
* 16 PNG files of 12000 x 12000 (144 Mpx each): all safe and written, exit status 0;

each with peak RSS under 2.5 GB (models ~0.6 GB + 2 x 900 MB of decoded pixels, with
headroom). A run past 4 GB is killed by the harness so a regression cannot exhaust the
machine. Inputs are benign (flat colour, a small gradient square) and compress to well
under 1 MB each; together the tests take about 1-1.5 minutes on two cores.
"""

from __future__ import annotations

import importlib.util
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
KILL_ABOVE_GB = 4.0


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("filter_memory", REPO / "benchmarks" / "filter_memory.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


fm = _load_benchmark()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    wd = tmp_path_factory.mktemp("filter_memory")
    if shutil.disk_usage(wd).free < 1 * fm.GB:
        pytest.skip("less than 1 GB of free disk for the memory benchmark")
    try:
        import psutil

        if psutil.virtual_memory().available < 2 * KILL_ABOVE_GB * fm.GB:
            pytest.skip("not enough free memory on this machine to measure the filter's peak safely")
    except ImportError:
        pass
    return wd


def _explain(res: dict) -> str:
    files = "\n".join(f"    {Path(f['path']).name}: {f['verdict']} {f['error'] or ''}" for f in res["files"])
    return (f"{res['scenario']}: exit {res['code']}, peak RSS {res['peak_rss'] / fm.GB:.2f} GB, "
            f"{res['wall']:.1f} s\n{files}\n  stderr tail: {res['stderr'][-1500:]}")


# --------------------------------------------------------------------------- the inputs are what they claim


def test_generated_inputs_are_the_documented_shapes(tmp_path):
    gif = fm.make_gif(tmp_path / "a.gif")
    with Image.open(gif) as im:
        assert im.format == "GIF" and im.size == (fm.GIF_SIZE, fm.GIF_SIZE) and im.n_frames == fm.GIF_FRAMES
    assert gif.stat().st_size < 2_000_000

    small = fm.make_png(tmp_path / "s.png", size=600, seed=3)
    with Image.open(small) as im:
        a = np.asarray(im.convert("RGB"))
    assert a.shape == (600, 600, 3)
    ys, xs = np.nonzero((a != a[0, 0]).any(axis=2))
    assert ys.max() - ys.min() + 1 == 256 and xs.max() - xs.min() + 1 == 256  # flat + one 256 x 256 square

    big = fm.make_png(tmp_path / "b.png", seed=1)
    assert big.stat().st_size < 2_000_000
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(big) as im:  # header only: nothing is decoded here
            assert im.size == (fm.PNG_SIZE, fm.PNG_SIZE) and im.mode == "RGB"


def test_measurement_excludes_the_parent_process_size(tmp_path):
    """The helper reports the child's own peak, not this (larger) process's size."""
    ballast = np.ones(300 * 1024 * 1024, np.uint8)  # this process: > 300 MB resident
    import sys

    res = fm.measure([sys.executable, "-c", "import numpy as np; a = np.ones(200 * 2**20, np.uint8)"])
    del ballast
    assert res["code"] == 0 and not res["killed"]
    assert 150 * 2**20 < res["peak_rss"] < 280 * 2**20, res["peak_rss"]


# --------------------------------------------------------------------------- the budget


def test_100_frame_3000px_gif_is_a_clean_per_file_budget_error(workdir):
    res = fm.run_scenario("gif-100x3000", workdir, KILL_ABOVE_GB)
    problems = fm.check(res)
    assert not problems, "\n".join(problems) + "\n" + _explain(res)


def test_16_files_of_12000px_stay_under_the_memory_budget(workdir):
    res = fm.run_scenario("png-16x12000", workdir, KILL_ABOVE_GB)
    problems = fm.check(res)
    assert not problems, "\n".join(problems) + "\n" + _explain(res)


def test_16_bit_and_float_frames_are_converted_in_bands(monkeypatch):
    """Review: a 12000x12000 float32 TIFF (1 MB on disk) peaked at 6.3 GB through int64 /
    float32 whole-image temporaries. Conversion now goes in row bands: no temporary is
    larger than a band, and the result equals the whole-image formula."""
    import numpy as np
    from PIL import Image

    import safet2i.images as images

    monkeypatch.setattr(images, "_BAND_PIXELS", 1000)      # many bands on a small image
    rng = np.random.default_rng(3)
    a16 = (rng.random((97, 60)) * 65535).astype(np.uint16)
    got = images.pil_to_rgb(Image.fromarray(a16))
    ref = ((a16.astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8)
    assert got.shape == (97, 60, 3) and all(np.array_equal(got[:, :, c], ref) for c in range(3))
    f = (rng.random((97, 60)) * 3).astype(np.float32)
    got = images.pil_to_rgb(Image.fromarray(f))
    ref = np.clip(np.rint(f / f.max() * 255.0), 0, 255).astype(np.uint8)
    assert np.array_equal(got[:, :, 0], ref)
    seen = []
    real = images._bands

    def spy(im):
        for y0, band in real(im):
            seen.append(band.size)
            yield y0, band

    monkeypatch.setattr(images, "_bands", spy)
    images.pil_to_rgb(Image.fromarray(f))
    assert seen and max(seen) <= 1000
