"""The output filter on every path an image leaves the webui by, with the real NudeNet model.

No NSFW picture is used: the face-only policy flags the face in skimage's astronaut photograph
(FACE_FEMALE ≈ 0.8) and passes the coffee cup; the toy model decodes the prompt "astronaut"
to that photograph (see ``fakewebui/_toy.py``), so generated images can be flagged.
"""

from __future__ import annotations

import base64
import io
import inspect
import sys

import numpy as np
import pytest
from pathlib import Path

from PIL import Image, ImageDraw, PngImagePlugin

from conftest import VARIANTS

FACE = {"filter_policy": "face-only", "filter_action": "blur"}


@pytest.fixture
def pictures(astronaut, coffee):
    def register(webui):
        webui.register("astronaut", astronaut)
        webui.register("coffee", coffee)
        return webui
    return register


def spy_filter(monkeypatch):
    """Every filter_image call: (image size, calling hook, returned image)."""
    import safet2i_a1111.script as script
    seen = []
    original = script.filter_image

    def spy(image, policy, action):
        o = original(image, policy, action)
        caller = inspect.stack()[1].function
        if caller == "_filter":
            caller = inspect.stack()[2].function          # the hook that called _filter
        seen.append((image.size, caller, o))
        return o

    for name in ("script", "callbacks", "route"):      # every module of ours that filters
        monkeypatch.setattr(sys.modules[f"safet2i_a1111.{name}"], "filter_image", spy)
    return seen


def decoded(picture, size):
    return np.asarray(Image.fromarray(picture).convert("RGB").resize(size, Image.LANCZOS)).astype(int)


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_image_of_a_batch_is_checked(start, pictures, coffee, astronaut, variant):
    webui = pictures(start(variant))
    p, processed = webui.txt2img(["coffee", "astronaut", "coffee"], batch_size=3, steps=2, width=256, height=256,
                                 args=webui.ui_args(**FACE))
    verdicts = [t.rsplit("SafeT2I verdict: ", 1)[1].strip('"') for t in processed.infotexts[1:]]
    assert verdicts[0] == "safe" and verdicts[2] == "safe"
    assert verdicts[1].startswith("censored (FACE_FEMALE")
    imgs = [np.asarray(im).astype(int) for im in processed.images[1:]]
    assert np.abs(imgs[0] - decoded(coffee, (256, 256))).max() <= 1          # untouched
    raw = decoded(astronaut, (256, 256))
    changed = np.abs(imgs[1] - raw).max(axis=2) > 8
    ys, xs = np.nonzero(changed)
    assert changed.mean() > 0.02 and 20 < xs.mean() < 150 and 10 < ys.mean() < 125   # the face, blurred
    assert not changed[200:, :].any()                                        # nothing else


@pytest.mark.parametrize("variant", VARIANTS)
def test_block_action_replaces_the_flagged_image_only(start, pictures, variant):
    webui = pictures(start(variant))
    p, processed = webui.txt2img(["astronaut", "coffee"], batch_size=2, steps=2, width=256, height=256,
                                 args=webui.ui_args(filter_policy="face-only", filter_action="block"))
    assert processed.infotexts[1].endswith("SafeT2I verdict: blocked")
    assert processed.infotexts[2].endswith("SafeT2I verdict: safe")
    assert np.asarray(processed.images[1]).std() < 20                          # the placeholder


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_filter_runs_after_the_composite_where_the_webui_allows(start, pictures, monkeypatch, variant):
    webui = pictures(start(variant))
    seen = spy_filter(monkeypatch)
    webui.txt2img("astronaut", steps=2, width=256, height=256, args=webui.ui_args(**FACE))
    hook = "postprocess_image" if variant == "a1111-1.7" else "postprocess_image_after_composite"
    assert [s[1] for s in seen] == [hook]


@pytest.mark.parametrize("variant", VARIANTS)
def test_inpaint_only_masked_is_judged_on_the_composite(start, pictures, coffee, monkeypatch, variant):
    """The generated crop is pasted into the original; the filter must see the whole picture
    (1.10 / Forge / reForge: postprocess_image_after_composite; 1.7: the crop first, then the
    composite in the final check)."""
    webui = pictures(start(variant))
    seen = spy_filter(monkeypatch)
    base = Image.fromarray(coffee).resize((512, 512))
    mask = Image.new("L", (512, 512), 0)
    ImageDraw.Draw(mask).rectangle((160, 96, 480, 416), fill=255)
    p, processed = webui.img2img(base, "astronaut", mask=mask, inpaint_full_res=True, width=256, height=256,
                                 denoising_strength=1.0, steps=3, args=webui.ui_args(img2img=True, **FACE))
    out = np.asarray(processed.images[0]).astype(int)
    assert processed.images[0].size == (512, 512)
    from safet2i_a1111.filtering import was_checked
    assert was_checked(processed.images[0])
    if variant == "a1111-1.7":     # the crop; then the composite as saved, and as returned
        assert [(s[0], s[1]) for s in seen] == [((256, 256), "postprocess_image"),
                                                ((512, 512), "_on_before_image_saved"), ((512, 512), "postprocess")]
    else:
        assert [(s[0], s[1]) for s in seen] == [((512, 512), "postprocess_image_after_composite")]
        assert "censored (FACE_FEMALE" in processed.infotexts[0]
    outside = np.ones((512, 512), bool)
    outside[96:417, 160:481] = False
    assert np.abs(out - np.asarray(base).astype(int))[outside].max() <= 1      # the original, untouched
    raw = seen[-1][2].image
    assert np.array_equal(out, np.asarray(raw).astype(int))


@pytest.mark.parametrize("variant", VARIANTS)
def test_live_previews_are_filtered_and_the_wrapper_removed(start, pictures, astronaut, variant):
    webui = pictures(start(variant))
    webui.shared.parallel_processing_allowed = False          # previews assigned during sampling
    shown = []
    state = webui.shared.state
    original = type(state).assign_current_image

    def record(self, image):
        shown.append(image)
        return original(self, image)

    type(state).assign_current_image = record
    try:
        webui.txt2img("astronaut", steps=3, width=256, height=256, args=webui.ui_args(**FACE))
    finally:
        type(state).assign_current_image = original
    from safet2i_a1111.filtering import was_checked
    assert len(shown) == 3 and all(was_checked(im) for im in shown)
    raw = decoded(astronaut, (256, 256))
    assert all(np.abs(np.asarray(im).astype(int) - raw).max() > 50 for im in shown)   # face blurred
    assert "assign_current_image" not in vars(state)


@pytest.mark.parametrize("variant", ["a1111-1.10", "forge"])
def test_previews_of_a_failed_job_and_hidden_previews_are_placeholders(start, pictures, variant):
    webui = pictures(start(variant))
    webui.shared.parallel_processing_allowed = False
    p, _ = webui.txt2img("astronaut AND coffee", steps=2, width=256, height=256,
                         args=webui.ui_args(guidance_enabled=True, **FACE))
    assert np.asarray(webui.shared.state.current_image).std() < 20
    webui.shared.opts.safet2i_previews = "hide"
    webui.txt2img("coffee", steps=2, width=256, height=256, args=webui.ui_args(**FACE))
    assert np.asarray(webui.shared.state.current_image).std() < 20


def spy_saves(webui, monkeypatch):
    import modules.images as images
    saved = []
    original = images.save_image

    def spy(image, path, basename, *args, **kwargs):
        fn, txt = original(image, path, basename, *args, **kwargs)
        saved.append((image, kwargs.get("suffix", ""), fn))
        return fn, txt

    monkeypatch.setattr(images, "save_image", spy)
    import modules.processing as processing
    monkeypatch.setattr(processing.images, "save_image", spy)
    return saved


def assert_saved_as_filtered(saved, suffix, n=1):
    from safet2i_a1111.filtering import filter_image
    hits = [s for s in saved if s[1] == suffix]
    assert len(hits) == n, [s[1] for s in saved]
    for raw, _, fn in hits:
        want = np.asarray(filter_image(raw, "face-only", "blur").image.convert("RGB"))
        got = np.asarray(Image.open(fn).convert("RGB"))
        assert np.array_equal(got, want)
        assert not np.array_equal(got, np.asarray(raw.convert("RGB")))       # the face was blurred


@pytest.mark.parametrize("variant", VARIANTS)
def test_intermediate_saves_are_filtered(start, pictures, monkeypatch, variant):
    webui = pictures(start(variant))
    opts = webui.shared.opts
    opts.save_images_before_highres_fix = True
    opts.save_images_before_face_restoration = True
    saved = spy_saves(webui, monkeypatch)
    kw = {"hr_cfg": 7.0} if variant in ("forge", "reforge") else {}
    p, processed = webui.txt2img("astronaut", steps=2, width=256, height=256, enable_hr=True, hr_scale=2.0,
                                 restore_faces=True, args=webui.ui_args(**FACE), **kw)
    assert_saved_as_filtered(saved, "-before-highres-fix")
    assert_saved_as_filtered(saved, "-before-face-restoration")
    final = [s for s in saved if s[1] == ""]
    assert len(final) == 1
    from safet2i_a1111.filtering import was_checked
    assert was_checked(final[0][0])                 # the sample itself was filtered in the hook


@pytest.mark.parametrize("variant", VARIANTS)
def test_save_before_color_correction_is_filtered(start, pictures, astronaut, monkeypatch, variant):
    webui = pictures(start(variant))
    webui.shared.opts.save_images_before_color_correction = True
    webui.shared.opts.img2img_color_correction = True
    saved = spy_saves(webui, monkeypatch)
    init = Image.fromarray(astronaut).resize((256, 256))
    webui.img2img(init, "astronaut", steps=2, denoising_strength=1.0, args=webui.ui_args(img2img=True, **FACE))
    if variant == "a1111-1.7":    # 1.7 filters in postprocess_image, before this copy is taken
        from safet2i_a1111.filtering import was_checked
        hits = [s for s in saved if s[1] == "-before-color-correction"]
        assert len(hits) == 1 and was_checked(hits[0][0])
    else:
        assert_saved_as_filtered(saved, "-before-color-correction")


@pytest.mark.parametrize("variant", VARIANTS)
def test_grids_are_checked_saved_and_returned(start, pictures, monkeypatch, variant):
    webui = pictures(start(variant))
    saved = spy_saves(webui, monkeypatch)
    seen = spy_filter(monkeypatch)
    p, processed = webui.txt2img(["astronaut", "coffee"], batch_size=2, steps=2, width=256, height=256,
                                 args=webui.ui_args(**FACE))
    grid_saves = [s for s in saved if Path(s[2]).name.startswith("grid-")]
    assert len(grid_saves) == 1
    raw_grid, _, fn = grid_saves[0]
    from safet2i_a1111.filtering import filter_image, was_checked
    assert np.array_equal(np.asarray(Image.open(fn).convert("RGB")),
                          np.asarray(filter_image(raw_grid, "face-only", "blur").image.convert("RGB")))
    assert any(s[0] == (512, 256) and s[1] == "_on_before_image_saved" for s in seen)
    assert processed.index_of_first_image == 1 and was_checked(processed.images[0])


@pytest.mark.parametrize("variant", VARIANTS)
def test_extras_tab(start, pictures, astronaut, variant):
    webui = pictures(start(variant))
    image = Image.fromarray(astronaut)
    outputs, info, _ = webui.extras(image, enabled=True, policy="face-only", action="blur")
    assert len(outputs) == 1 and not np.array_equal(np.asarray(outputs[0]), astronaut)
    files = webui.saved()
    assert len(files) == 1 and np.array_equal(np.asarray(Image.open(files[0]).convert("RGB")),
                                              np.asarray(outputs[0].convert("RGB")))
    assert "SafeT2I verdict: censored" in info
    outputs, _, _ = webui.extras(image, save_output=False, enabled=False)
    assert np.array_equal(np.asarray(outputs[0]), astronaut)           # switched off (not enforced)


def test_a_png_text_chunk_cannot_pose_as_a_checked_image(tmp_path, astronaut):
    import sys
    from kit import REPO
    sys.path.insert(0, str(REPO / "extension"))
    from safet2i_a1111.filtering import MARK, filter_image, was_checked
    info = PngImagePlugin.PngInfo()
    info.add_text(MARK, "safe")
    Image.fromarray(astronaut).save(tmp_path / "x.png", pnginfo=info)
    forged = Image.open(tmp_path / "x.png")
    assert forged.info.get(MARK) == "safe" and not was_checked(forged)
    assert was_checked(filter_image(forged, "face-only", "blur").image)


@pytest.mark.parametrize("variant", VARIANTS)
def test_api_filter_route(start, astronaut, variant):
    webui = start(variant, argv=("--api",))
    buf = io.BytesIO()
    Image.fromarray(astronaut).save(buf, "PNG")
    b64 = base64.b64encode(buf.getvalue()).decode()
    r = webui.app.post("/safet2i/filter", {"image": "data:image/png;base64," + b64, "policy": "face-only",
                                          "action": "blur"})
    assert r["verdict"] == "censored" and r["labels"] == ["FACE_FEMALE"] and 0.5 < r["cost"] <= 1
    out = np.asarray(Image.open(io.BytesIO(base64.b64decode(r["image"]))).convert("RGB"))
    assert out.shape == astronaut.shape and not np.array_equal(out, astronaut)
    r = webui.app.post("/safet2i/filter", {"image": b64})
    assert r["policy"] == "strict-5" and r["verdict"] == "safe"
    assert "error" in webui.app.post("/safet2i/filter", {"image": "bm90IGFuIGltYWdl"})
    assert "error" in webui.app.post("/safet2i/filter", {"image": b64, "policy": "lenient"})


# --api-auth, --api, body limits and error statuses of the route: test_filter_route.py
