"""Issue 14, class 4: memory is bounded by documented budgets, whatever the file.

"Unsafe" is the ``face-only`` policy on scikit-image's astronaut; the cat has no detection.
"""

from __future__ import annotations


import numpy as np
from PIL import Image

from filter_cli_kit import by_name, folder, report, run, sha, tree  # noqa: F401  (folder: fixture)


def test_frame_budget_is_checked_before_each_frame_is_decoded(tmp_path, benign_set, monkeypatch):
    """A 40-frame GIF over the per-file budget: decoding stops at the first frame that would
    pass the budget (frames after it are never decoded), a per-file error names the budget,
    and the next file is still processed."""
    import safet2i.images as images

    src = tmp_path / "in"
    src.mkdir()
    frames = [Image.fromarray(np.roll(benign_set["chelsea"][:200, :200], 7 * i, axis=1)) for i in range(40)]
    frames[0].save(src / "anim.gif", save_all=True, append_images=frames[1:], duration=50)
    Image.fromarray(benign_set["chelsea"]).save(src / "z_cat.png")
    loads = []
    real_load = Image.Image.load

    def counting_load(self):
        if getattr(self, "format", None) == "GIF":
            loads.append(self.tell())
        return real_load(self)

    monkeypatch.setattr(Image.Image, "load", counting_load)
    monkeypatch.setenv(images.ENV_MAX_FILE_PIXELS, str(200 * 200 * 10 + 5))
    code = run("filter", src, "--out", tmp_path / "out", "--report", tmp_path / "r.json", "-q")
    assert code == 2
    files = by_name(report(tmp_path / "r.json"))
    err = files["anim.gif"]["error"]
    assert "frame 10" in err and "budget" in err and "SAFET2I_MAX_FILE_PIXELS" in err
    assert files["z_cat.png"]["verdict"] == "safe"
    assert not (tmp_path / "out" / "anim.gif").exists()
    # only the 10 frames within budget (0..9) were ever decoded from the GIF
    assert loads and max(loads) == 9


def test_over_budget_file_never_reports_memoryerror_or_traceback(tmp_path, capsys, monkeypatch):
    src = tmp_path / "in"
    src.mkdir()
    Image.new("RGB", (3000, 2000), (30, 60, 90)).save(src / "big.png")
    monkeypatch.setenv("SAFET2I_MAX_FILE_PIXELS", "1000000")
    code = run("filter", src, "--out", tmp_path / "out")
    err = capsys.readouterr().err
    assert code == 2
    assert "big.png" in err and "budget" in err
    assert "MemoryError" not in err and "Traceback" not in err


def test_bytes_budget_is_checked_before_reading(tmp_path, monkeypatch, benign_set):
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(benign_set["chelsea"]).save(src / "cat.png")
    monkeypatch.setenv("SAFET2I_MAX_FILE_BYTES", "1000")
    code = run("filter", src, "--out", tmp_path / "out", "--report", tmp_path / "r.json", "-q")
    assert code == 2
    assert "byte limit" in report(tmp_path / "r.json")["files"][0]["error"]


def test_extreme_aspect_ratio_is_checked_without_a_padded_square(tmp_path, monkeypatch):
    """100000 x 1 would pad to a 30 GB square; it is resized on its own instead."""
    from safet2i.filter import detectors

    src = tmp_path / "in"
    src.mkdir()
    Image.new("RGB", (100000, 1), (200, 100, 50)).save(src / "line.png")
    Image.new("RGB", (2, 60000), (20, 100, 50)).save(src / "column.png")
    biggest = []
    real_zeros = np.zeros

    def spy_zeros(shape, *a, **k):
        biggest.append(int(np.prod(shape)))
        return real_zeros(shape, *a, **k)

    monkeypatch.setattr(detectors.np, "zeros", spy_zeros)
    code = run("filter", src, "--out", tmp_path / "out", "--report", tmp_path / "r.json", "-q")
    monkeypatch.undo()
    assert code == 0
    files = by_name(report(tmp_path / "r.json"))
    assert files["line.png"]["verdict"] == "safe" and files["column.png"]["verdict"] == "safe"
    assert max(biggest) <= 320 * 320 * 3
    assert np.asarray(Image.open(tmp_path / "out" / "line.png")).shape == (1, 100000, 3)


def test_pad_square_resize_is_exact_for_ordinary_shapes():
    """The shortcut never applies to ordinary aspect ratios (parity with the nudenet package)."""
    import cv2

    from safet2i.filter.detectors import _pad_square_resize

    img = np.random.default_rng(1).integers(0, 255, (300, 1300, 3), dtype=np.uint8)
    sq = np.zeros((1300, 1300, 3), np.uint8)
    sq[:300] = img
    got, side = _pad_square_resize(img, 320)
    assert side == 1300 and np.array_equal(got, cv2.resize(sq, (320, 320), interpolation=cv2.INTER_LINEAR))


def test_pending_frames_stay_within_the_batch_budget(tmp_path, benign_set, monkeypatch):
    """Frames waiting for a network batch never exceed SAFET2I_MAX_BATCH_PIXELS (one file
    may be over it alone: it is then checked by itself)."""
    from safet2i.filter.pipeline import SafetyFilter

    src = tmp_path / "in"
    src.mkdir()
    for i in range(6):
        Image.fromarray(np.roll(benign_set["chelsea"], 11 * i, axis=0)).save(src / f"c{i}.png")  # 300x451
    seen = []
    real = SafetyFilter.check_uint8

    def spy(self, frames):
        seen.append(sum(f.shape[0] * f.shape[1] for f in frames))
        return real(self, frames)

    monkeypatch.setattr(SafetyFilter, "check_uint8", spy)
    monkeypatch.setenv("SAFET2I_MAX_BATCH_PIXELS", str(300 * 451 * 2))
    code = run("filter", src, "--out", tmp_path / "out", "--batch-size", "16", "-q")
    assert code == 0
    assert seen and max(seen) <= 300 * 451 * 2 and sum(seen) == 6 * 300 * 451
