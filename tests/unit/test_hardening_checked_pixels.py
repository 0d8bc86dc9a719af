"""Issue 14, class 1: only the pixels that were checked leave ``safet2i filter``.

Black-box tests of the CLI. Each input is a container whose *main* image is benign (the
cat ``chelsea``, ``coffee``, gradients) while a "face" (scikit-image's astronaut, which the
``face-only`` policy flags; no NSFW material is ever made) hides in every other place the
format allows: an EXIF / Photoshop-IRB / XMP thumbnail, an ICC profile, an APPn or COM
segment, PNG text / zTXt / iTXt / eXIf / unknown ancillary chunks, trailing data after the
end marker, a smaller ICO / ICNS entry, the second MPO picture, a later GIF / WEBP / APNG
frame, the APNG default image, a later TIFF page, a GIF comment.

For every file the CLI writes we assert:

(a) none of the bytes that carry a hidden face in the input appear in the output (byte
    windows of each payload, as stored in the input, are searched for);
(b) every image found in the output is judged safe by ``SafetyFilter(["nudenet"],
    "face-only", "pass").check``: each frame / page / icon entry Pillow decodes, every image
    that starts at a JPEG / PNG / GIF / WEBP / TIFF signature at any byte offset, every
    image in a PNG chunk (raw or zlib-compressed) and every base64 run that decodes to an
    image. An unsafe image is tolerated only in the output of a file the report marks as
    unsafe (censored) or blocked.

The scanner is itself checked against the inputs: in every input it must find the hidden
face and the filter must flag it, so a pass means "looked and found nothing", not "could
not look". Every input must appear in the JSON report, and none may be refused.

A second test swaps a file on disk right after it was read (a decoder hook): the output
must be the checked pixels of the first content, never the second.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import struct
import warnings
import zlib
from hashlib import sha256
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image, ImageCms, ImageSequence

from safet2i.cli import main
from safet2i.filter import SafetyFilter
from safet2i.images import pil_to_rgb

REPO = Path(__file__).resolve().parents[2]
SEED = 14
FACE_CROP = (110, 30, 370, 290)  # x0, y0, x1, y1 around the astronaut's face (173, 82, 100, 97)
MAX_CANDIDATES = 96  # images examined per output file at most
WINDOW = 32  # bytes per searched window of a hidden payload


# --------------------------------------------------------------------------- pictures


def face(size: int) -> Image.Image:
    import skimage.data as d

    return Image.fromarray(d.astronaut()).crop(FACE_CROP).resize((size, size), Image.Resampling.LANCZOS)


def chelsea(w: int | None = None, h: int | None = None) -> Image.Image:
    import skimage.data as d

    im = Image.fromarray(d.chelsea())  # 451 x 300
    return im if w is None else im.resize((w, h), Image.Resampling.BILINEAR)


def coffee(w: int | None = None, h: int | None = None) -> Image.Image:
    import skimage.data as d

    im = Image.fromarray(d.coffee())  # 600 x 400
    return im if w is None else im.resize((w, h), Image.Resampling.BILINEAR)


def gradient(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    a = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) * 255 // (w + h)], -1)
    a = a + rng.integers(-6, 7, size=a.shape)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    b = io.BytesIO()
    im.copy().save(b, format=fmt, **kw)  # a copy: Pillow keeps encoder state on the image
    return b.getvalue()


# --------------------------------------------------------------------------- containers by hand


def tiff_with_thumbnail(thumb_jpeg: bytes) -> bytes:
    """A little-endian TIFF/EXIF block: IFD0 (orientation 1) -> IFD1 holding a JPEG
    thumbnail through JPEGInterchangeFormat / JPEGInterchangeFormatLength."""
    ifd0 = 8
    ifd1 = ifd0 + 2 + 12 + 4
    thumb = ifd1 + 2 + 3 * 12 + 4
    out = b"II*\x00" + struct.pack("<I", ifd0)
    out += struct.pack("<H", 1) + struct.pack("<HHIHH", 0x0112, 3, 1, 1, 0) + struct.pack("<I", ifd1)
    out += struct.pack("<H", 3)
    out += struct.pack("<HHIHH", 0x0103, 3, 1, 6, 0)  # Compression = JPEG (old style)
    out += struct.pack("<HHII", 0x0201, 4, 1, thumb)  # JPEGInterchangeFormat
    out += struct.pack("<HHII", 0x0202, 4, 1, len(thumb_jpeg))  # JPEGInterchangeFormatLength
    out += struct.pack("<I", 0)
    assert len(out) == thumb
    return out + thumb_jpeg


def jpeg_segment(marker: int, payload: bytes) -> bytes:
    assert len(payload) + 2 < 65536
    return bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload


def jpeg_insert(jpeg: bytes, *segments: bytes) -> bytes:
    """Segments inserted right after SOI (and after a JFIF APP0 when there is one)."""
    assert jpeg[:2] == b"\xff\xd8"
    pos = 2
    if jpeg[2:4] == b"\xff\xe0":
        pos = 4 + struct.unpack(">H", jpeg[4:6])[0]
    return jpeg[:pos] + b"".join(segments) + jpeg[pos:]


def photoshop_thumbnail(thumb_jpeg: bytes, w: int, h: int) -> bytes:
    """APP13 "Photoshop 3.0" payload with an image resource 0x040C (JFIF thumbnail)."""
    res = struct.pack(">IIIIIIHH", 1, w, h, (w * 24 + 31) // 32 * 4, (w * 24 + 31) // 32 * 4 * h,
                      len(thumb_jpeg), 24, 1) + thumb_jpeg
    block = b"8BIM" + struct.pack(">H", 0x040C) + b"\x00\x00" + struct.pack(">I", len(res)) + res
    if len(res) % 2:
        block += b"\x00"
    return b"Photoshop 3.0\x00" + block


def xmp_with_thumbnail(thumb_jpeg: bytes, w: int, h: int) -> bytes:
    b64 = base64.b64encode(thumb_jpeg).decode()
    return (
        '<?xpacket begin="" id="W5M0MpCehiHzreSzNTczkc9d"?>'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/">'
        '<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        '<rdf:Description rdf:about="" xmlns:xmp="http://ns.adobe.com/xap/1.0/" '
        'xmlns:xmpGImg="http://ns.adobe.com/xap/1.0/g/img/"><xmp:Thumbnails><rdf:Alt><rdf:li '
        f'rdf:parseType="Resource"><xmpGImg:width>{w}</xmpGImg:width><xmpGImg:height>{h}</xmpGImg:height>'
        f'<xmpGImg:format>JPEG</xmpGImg:format><xmpGImg:image>{b64}</xmpGImg:image></rdf:li></rdf:Alt>'
        '</xmp:Thumbnails></rdf:Description></rdf:RDF></x:xmpmeta><?xpacket end="w"?>'
    ).encode()


def srgb_icc() -> bytes:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def png_chunks(png: bytes) -> list[tuple[bytes, bytes, int]]:
    """(type, data, offset of the chunk) for every chunk of a PNG stream (stops at IEND)."""
    out, pos = [], 8
    while pos + 12 <= len(png):
        n = struct.unpack(">I", png[pos:pos + 4])[0]
        kind = png[pos + 4:pos + 8]
        if pos + 12 + n > len(png):
            break
        out.append((kind, png[pos + 8:pos + 8 + n], pos))
        pos += 12 + n
        if kind == b"IEND":
            break
    return out


def png_insert_after_ihdr(png: bytes, *chunks: bytes) -> bytes:
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR"
    end = 8 + 12 + struct.unpack(">I", png[8:12])[0]
    return png[:end] + b"".join(chunks) + png[end:]


def ico_entries(data: bytes) -> dict[tuple[int, int], bytes]:
    n = struct.unpack("<H", data[4:6])[0]
    out = {}
    for i in range(n):
        w, h, _, _, _, _, size, off = struct.unpack("<BBBBHHII", data[6 + 16 * i:22 + 16 * i])
        out[(w or 256, h or 256)] = data[off:off + size]
    return out


def icns_entries(data: bytes) -> dict[bytes, bytes]:
    out, pos = {}, 8
    while pos + 8 <= len(data):
        kind, n = data[pos:pos + 4], struct.unpack(">I", data[pos + 4:pos + 8])[0]
        if n < 8:
            break
        out[kind] = data[pos + 8:pos + n]
        pos += n
    return out


# --------------------------------------------------------------------------- the hostile set


def distinctive(payload: bytes) -> bytes:
    """The part of an encoded image no other encode shares: the entropy-coded data of a
    JPEG (its headers and standard Huffman tables are in every libjpeg output), the first
    IDAT of a PNG; anything else whole."""
    if payload[:3] == b"\xff\xd8\xff":
        sos = payload.index(b"\xff\xda")
        start = sos + 2 + struct.unpack(">H", payload[sos + 2:sos + 4])[0]
        return payload[start:-2]
    if payload[:8] == b"\x89PNG\r\n\x1a\n":
        return next(d for k, d, _ in png_chunks(payload) if k == b"IDAT")
    return payload


def build_cases(root: Path) -> dict[str, dict]:
    """name -> {"path", "needles": byte strings that carry a hidden face in the file}.

    Every case has a benign main image; the face is only where a viewer of the main
    image would not look. Deterministic (fixed sizes, seeds and encoder settings)."""
    cases: dict[str, dict] = {}

    def add(name: str, data: bytes, needles: list[bytes]):
        p = root / name
        p.write_bytes(data)
        needles = [distinctive(nd) for nd in needles]
        for nd in needles:
            assert len(nd) >= WINDOW and nd in data, f"{name}: payload not stored as built"
        cases[name] = {"path": p, "needles": needles}

    f160 = face(160)
    f_jpg = encode(f160, "JPEG", quality=90)          # ~8 KB
    f_jpg_small = encode(face(96), "JPEG", quality=85)  # fits any 64 KB segment, also as base64
    f_png = encode(face(128), "PNG")
    f_b64 = base64.b64encode(f_jpg_small)

    # ---- JPEG family (main: the cat)
    main_jpg = encode(chelsea(), "JPEG", quality=90)
    exif = tiff_with_thumbnail(f_jpg)
    add("jpeg_exif_thumbnail.jpg", jpeg_insert(main_jpg, jpeg_segment(0xE1, b"Exif\x00\x00" + exif)), [f_jpg])
    add("jpeg_trailing_jpeg.jpg", main_jpg + f_jpg, [f_jpg])
    add("jpeg_trailing_png.jpeg", main_jpg + f_png, [f_png])
    add("jpeg_photoshop_thumbnail.jpg",
        jpeg_insert(main_jpg, jpeg_segment(0xED, photoshop_thumbnail(f_jpg, 160, 160))), [f_jpg])
    xmp = xmp_with_thumbnail(f_jpg_small, 96, 96)
    add("jpeg_xmp_thumbnail.jpg",
        jpeg_insert(main_jpg, jpeg_segment(0xE1, b"http://ns.adobe.com/xap/1.0/\x00" + xmp)), [f_b64])
    add("jpeg_app15_and_comment.jfif",
        jpeg_insert(main_jpg, jpeg_segment(0xEF, f_jpg), jpeg_segment(0xFE, f_png)), [f_jpg, f_png])
    icc_face = srgb_icc() + f_jpg  # a valid sRGB profile carrying the face after its end
    add("jpeg_icc_profile.jpg", encode(chelsea(), "JPEG", quality=90, icc_profile=icc_face), [f_jpg])
    mpo = encode(chelsea(), "MPO", save_all=True, append_images=[face(451).resize((451, 300))], quality=90)
    second = mpo[mpo.index(b"\xff\xd8\xff", 4):]
    add("mpo_second_picture.mpo", mpo, [second])

    # ---- PNG family (main: coffee, 384 x 256)
    main_png = encode(coffee(384, 256), "PNG")
    add("png_text_base64.png", png_insert_after_ihdr(main_png, png_chunk(b"tEXt", b"Comment\x00" + f_b64)),
        [f_b64])
    z = zlib.compress(f_b64, 9)
    add("png_ztxt_base64.png", png_insert_after_ihdr(main_png, png_chunk(b"zTXt", b"Thumb\x00\x00" + z)), [z])
    zi = zlib.compress(f_b64, 9)
    add("png_itxt.png", png_insert_after_ihdr(
        main_png,
        png_chunk(b"iTXt", b"XML:com.adobe.xmp\x00\x00\x00\x00\x00" + xmp),
        png_chunk(b"iTXt", b"Thumb\x00\x01\x00en\x00\x00" + zi)), [f_b64, zi])
    add("png_unknown_chunk.png", png_insert_after_ihdr(main_png, png_chunk(b"faCe", f_jpg)), [f_jpg])
    add("png_exif_thumbnail.png", png_insert_after_ihdr(main_png, png_chunk(b"eXIf", exif)), [f_jpg])
    add("png_trailing.png", main_png + f_png + f_jpg, [f_png, f_jpg])
    icc_png = encode(coffee(384, 256), "PNG", icc_profile=icc_face)
    iccp = next(d for k, d, _ in png_chunks(icc_png) if k == b"iCCP")
    add("png_icc_profile.png", icc_png, [iccp[-256:]])
    # APNG: the face as a later frame; and as the default image outside the animation
    frames = [coffee(384, 256), gradient(384, 256, SEED), face(256).resize((384, 256))]
    add("apng_face_frame3.png", encode(frames[0], "PNG", save_all=True, append_images=frames[1:],
                                       duration=[100, 100, 100], loop=0), [])
    add("apng_face_default_image.png",
        encode(face(256).resize((384, 256)), "PNG", save_all=True, default_image=True,
               append_images=[coffee(384, 256), gradient(384, 256, SEED + 1)], duration=100, loop=0), [])

    # ---- GIF
    gframes = [chelsea(384, 256), coffee(384, 256), face(256).resize((384, 256))]
    add("gif_face_frame3.gif", encode(gframes[0], "GIF", save_all=True, append_images=gframes[1:],
                                      duration=80, loop=0), [])
    g = encode(chelsea(384, 256), "GIF")
    assert g.endswith(b";")
    comment = b"\x21\xfe" + b"".join(bytes([len(c)]) + c for c in
                                     (f_jpg[i:i + 255] for i in range(0, len(f_jpg), 255))) + b"\x00"
    mid = (len(f_jpg) // 255 // 2) * 255  # a sub-block inside the JPEG's entropy-coded data
    add("gif_comment.gif", g[:-1] + comment + b";", [f_jpg[mid:mid + 255]])
    add("gif_trailing.gif", g + f_jpg, [f_jpg])

    # ---- WEBP
    add("webp_face_frame2.webp", encode(coffee(384, 256), "WEBP", save_all=True, lossless=True,
                                        append_images=[face(256).resize((384, 256))], duration=100), [])
    add("webp_exif_thumbnail.webp",
        encode(coffee(384, 256), "WEBP", lossless=True, exif=b"Exif\x00\x00" + exif), [f_jpg])
    add("webp_xmp_thumbnail.webp", encode(coffee(384, 256), "WEBP", lossless=True, xmp=xmp), [f_b64])
    add("webp_trailing.webp", encode(coffee(384, 256), "WEBP", quality=90) + f_jpg, [f_jpg])

    # ---- TIFF, BMP
    add("tiff_face_page2.tif", encode(chelsea(), "TIFF", save_all=True, compression="tiff_lzw",
                                      append_images=[face(300)]), [])
    add("tiff_trailing.tiff", encode(chelsea(), "TIFF", compression="tiff_lzw") + f_jpg, [f_jpg])
    add("bmp_trailing.bmp", encode(gradient(320, 256, SEED), "BMP") + f_png, [f_png])

    # ---- icons: a benign largest entry, the face in a smaller one
    ico = encode(chelsea(256, 256), "ICO", sizes=[(256, 256), (64, 64), (32, 32)],
                 append_images=[face(64), chelsea(32, 32)])
    add("ico_small_face_entry.ico", ico, [ico_entries(ico)[(64, 64)]])
    icns = encode(gradient(512, 512, SEED + 2), "ICNS", append_images=[face(128)])
    add("icns_small_face_entry.icns", icns, [icns_entries(icns)[b"ic07"]])
    return cases


# --------------------------------------------------------------------------- looking inside files

SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"RIFF", b"II*\x00", b"MM\x00*",
              b"icns", b"\x00\x00\x01\x00")
B64_RUN = re.compile(rb"[A-Za-z0-9+/]{256,}={0,2}")
PLAIN_PNG_CHUNKS = {b"IHDR", b"PLTE", b"IDAT", b"IEND", b"tRNS", b"gAMA", b"cHRM", b"sRGB", b"pHYs", b"acTL",
                    b"fcTL", b"fdAT", b"bKGD", b"sBIT", b"tIME"}


def gif_extensions(data: bytes) -> list[bytes]:
    """The joined sub-block data of every extension block of a GIF stream."""
    if data[:6] not in (b"GIF87a", b"GIF89a") or len(data) < 13:
        return []
    pos, out = 13, []
    if data[10] & 0x80:
        pos += 3 << ((data[10] & 7) + 1)

    def sub_blocks(p: int) -> tuple[bytes, int]:
        parts = []
        while p < len(data) and data[p]:
            parts.append(data[p + 1:p + 1 + data[p]])
            p += 1 + data[p]
        return b"".join(parts), p + 1

    while pos < len(data):
        kind = data[pos]
        if kind == 0x21 and pos + 1 < len(data):
            body, pos = sub_blocks(pos + 2)
            out.append(body)
        elif kind == 0x2C and pos + 10 <= len(data):
            flags = data[pos + 9]
            pos += 10 + ((3 << ((flags & 7) + 1)) if flags & 0x80 else 0) + 1  # + LZW minimum code size
            _, pos = sub_blocks(pos)
        else:
            break
    return out


def _frames_of(im: Image.Image, label: str) -> list[tuple[str, np.ndarray]]:
    """Every frame / page / icon entry of an open Pillow image, as uint8 RGB."""
    out = []
    if im.format == "ICO":
        for size in sorted(im.ico.sizes()):
            out.append((f"{label} ico {size}", pil_to_rgb(im.ico.getimage(size))))
        return out
    if im.format == "ICNS":
        for w, h, scale in im.info.get("sizes", []):
            try:
                out.append((f"{label} icns {w}x{h}@{scale}", pil_to_rgb(im.icns.getimage((w, h, scale)))))
            except Exception:  # noqa: BLE001, S110 - an entry Pillow cannot decode is found by the byte scan
                pass
        return out
    for i in range(int(getattr(im, "n_frames", 1) or 1)):
        im.seek(i)
        im.load()
        out.append((f"{label} frame {i}", pil_to_rgb(im)))
    return out


def _decode_at(data: bytes, label: str) -> list[tuple[str, np.ndarray]]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as im:
                if im.size[0] * im.size[1] > 40_000_000 or min(im.size) < 8:
                    return []
                return _frames_of(im, label)
    except Exception:  # noqa: BLE001 - random bytes that only look like a signature
        return []


def embedded_images(data: bytes, label: str = "file", depth: int = 0) -> list[tuple[str, np.ndarray]]:
    """Every image a reader could get out of ``data`` (see the module docstring)."""
    found = _decode_at(data, label)
    for sig in SIGNATURES:
        start = 0
        while (off := data.find(sig, start)) >= 0:
            start = off + 1
            if off == 0 or (sig == b"RIFF" and data[off + 8:off + 12] != b"WEBP"):
                continue
            found += _decode_at(data[off:], f"{label} @{off}")
    blobs: list[tuple[str, bytes]] = []
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        for kind, body, off in png_chunks(data):
            if kind in PLAIN_PNG_CHUNKS:
                continue
            blobs.append((f"{label} {kind.decode('latin-1')}@{off}", body))
            for i in range(min(len(body), 96)):  # zTXt / iTXt / iCCP / anything compressed
                if body[i] == 0x78:
                    try:
                        blobs.append((f"{label} {kind.decode('latin-1')}@{off} zlib",
                                      zlib.decompressobj().decompress(body[i:], 16 << 20)))
                    except zlib.error:
                        pass
    for i, body in enumerate(gif_extensions(data)):
        if len(body) >= 64:
            blobs.append((f"{label} gif extension {i}", body))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as im:
                for key, value in im.info.items():
                    if isinstance(value, str):
                        value = value.encode("utf-8", "ignore")
                    if isinstance(value, bytes) and len(value) >= 64:
                        blobs.append((f"{label} info[{key}]", value))
    except Exception:  # noqa: BLE001, S110 - not an image at all
        pass
    for m in B64_RUN.finditer(data):
        blobs.append((f"{label} base64@{m.start()}", m.group(0)))
    if depth < 2:
        for name, blob in blobs:
            if B64_RUN.fullmatch(blob.strip()):
                try:
                    blob = base64.b64decode(blob.strip())
                except ValueError:
                    continue
            found += embedded_images(blob, name, depth + 1)
    unique, seen = [], set()
    for name, arr in found:
        key = (arr.shape, sha256(arr.tobytes()).digest())
        if key not in seen:
            seen.add(key)
            unique.append((name, arr))
    return unique[:MAX_CANDIDATES] if depth == 0 else unique


def windows(needle: bytes) -> list[bytes]:
    step = max(WINDOW, len(needle) // 16)
    return [needle[i:i + WINDOW] for i in range(0, len(needle) - WINDOW + 1, step)]


@pytest.fixture(scope="module")
def flt() -> SafetyFilter:
    return SafetyFilter(["nudenet"], "face-only", "pass")


def unsafe_images(flt: SafetyFilter, images: list[tuple[str, np.ndarray]]) -> list[str]:
    if not images:
        return []
    verdicts = flt.check([a for _, a in images])
    return [f"{name} ({a.shape[1]}x{a.shape[0]}, cost {v.cost:.2f})"
            for (name, a), v in zip(images, verdicts) if v.unsafe]


# --------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> dict[str, dict]:
    return build_cases(tmp_path_factory.mktemp("hostile_in"))


def test_each_hostile_input_really_hides_a_flagged_face_behind_a_benign_main_image(hostile, flt):
    """The generator and the scanner work: Pillow's default view of every input is benign,
    and the scanner finds the hidden face in every input and the filter flags it."""
    for name, case in hostile.items():
        data = case["path"].read_bytes()
        with Image.open(io.BytesIO(data)) as im:
            main_view = pil_to_rgb(im)
        if name not in ("apng_face_default_image.png",):  # there Pillow's frame 0 *is* the hidden image
            assert not flt.check([main_view])[0].unsafe, f"{name}: the main image itself is flagged"
        assert unsafe_images(flt, embedded_images(data, name)), f"{name}: the hidden face was not found"


@pytest.mark.parametrize("process", ["in-process", "fresh"])
def test_outputs_hold_only_checked_pixels(tmp_path, hostile, flt, process):
    """``fresh``: the CLI in a new interpreter, where no test code has loaded Pillow's
    plug-ins beforehand (format support must not depend on what ran earlier)."""
    out, rep_path = tmp_path / "out", tmp_path / "report.json"
    inputs = sorted(str(c["path"]) for c in hostile.values())
    before = {p: Path(p).read_bytes() for p in inputs}
    argv = ["filter", *inputs, "--out", str(out), "--policy", "face-only", "--action", "blur",
            "--report", str(rep_path), "-q"]
    if process == "in-process":
        code = main(argv)
    else:
        import subprocess
        import sys

        proc = subprocess.run([sys.executable, "-m", "safet2i.cli", *argv], check=False, cwd=REPO,
                              capture_output=True, text=True, timeout=300)
        code = proc.returncode
        assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert {p: Path(p).read_bytes() for p in inputs} == before, "an input was modified"
    rep = json.loads(rep_path.read_text())
    entries = {Path(f["path"]).name: f for f in rep["files"]}
    assert set(entries) == set(hostile), f"inputs missing from the report: {set(hostile) - set(entries)}"
    errors = {n: e.get("error") for n, e in entries.items()
              if e["verdict"] not in ("safe", "unsafe", "blocked")}
    assert not errors, f"inputs refused or failed: {errors}"
    assert code in (0, 1), f"exit status {code} although every input was filtered"
    # the hidden faces are unsafe: a file may be censored for them, never written safe *with* them
    by_output: dict[Path, str] = {}
    for n, e in entries.items():
        if e["verdict"] == "blocked":
            assert e.get("output") is None, f"{n}: blocked yet written"
            continue
        assert e.get("output"), f"{n}: no output for a {e['verdict']} file"
        target = Path(e["output"]).resolve()
        assert out.resolve() in target.parents and target.is_file(), \
            f"{n}: output {target} not written in --out"
        by_output[target] = n

    written = sorted(p.resolve() for p in out.rglob("*") if p.is_file())
    assert set(written) == set(by_output), \
        f"files in --out that no report entry owns: {set(written) - set(by_output)}"

    problems = []
    for target in written:
        n = by_output[target]
        data = target.read_bytes()
        copied = [i for i, nd in enumerate(hostile[n]["needles"]) if any(w in data for w in windows(nd))]
        if copied:
            problems.append(f"{n} -> {target.name}: carries bytes of hidden payload(s) {copied} "
                            "from the input")
        bad = unsafe_images(flt, embedded_images(data, target.name))
        if bad and entries[n]["verdict"] not in ("unsafe", "blocked"):
            problems.append(f"{n} -> {target.name}: reported {entries[n]['verdict']!r} "
                            f"but holds flagged {bad}")
    assert not problems, "checked-pixels violations:\n  " + "\n  ".join(problems)


def test_censored_outputs_are_safe_when_rechecked(tmp_path, hostile, flt):
    """Where a hidden frame / page was found and censored, what was written is safe."""
    names = [n for n in hostile if "frame" in n or "page" in n or "default_image" in n or n.startswith("mpo")]
    out = tmp_path / "out"
    main(["filter", *(str(hostile[n]["path"]) for n in names), "--out", str(out), "--policy", "face-only",
          "--action", "blur", "--report", str(tmp_path / "r.json"), "-q"])
    rep = {Path(f["path"]).name: f for f in json.loads((tmp_path / "r.json").read_text())["files"]}
    problems = []
    for n in names:
        e = rep[n]
        assert e["verdict"] in ("unsafe", "blocked"), f"{n}: a flagged frame was not found ({e['verdict']})"
        if e.get("output"):
            data = Path(e["output"]).read_bytes()
            bad = unsafe_images(flt, embedded_images(data, n))
            if bad:
                problems.append(f"{n}: censored output still flagged: {bad}")
    assert not problems, "\n".join(problems)


# --------------------------------------------------------------------------- swapped between check and write


def _write_as(path: Path, im: Image.Image, fmt: str) -> None:
    tmp = path.with_name(path.name + ".swap")
    im.save(tmp, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    os.replace(tmp, path)  # a new inode: a handle opened on the first content still reads it


@pytest.mark.parametrize("hook", ["decoder", "read_file_bytes"])
@pytest.mark.parametrize("ext,fmt", [(".png", "PNG"), (".jpg", "JPEG")])
def test_file_swapped_after_reading_is_never_written(tmp_path, monkeypatch, flt, hook, ext, fmt):
    src = tmp_path / "in"
    src.mkdir()
    path = src / f"swap{ext}"
    first = chelsea()
    _write_as(path, first, fmt)
    with Image.open(path) as im:
        first_pixels = pil_to_rgb(im).astype(np.int16)
    fired = []

    def swap():
        if not fired:
            fired.append(True)
            _write_as(path, face(300).resize(first.size), fmt)

    with monkeypatch.context() as m:
        if hook == "decoder":  # Pillow's decoder is reached only after the bytes were read
            orig_open = Image.open

            def hooked_open(fp, *a, **kw):
                im = orig_open(fp, *a, **kw)
                swap()
                return im

            m.setattr(Image, "open", hooked_open)
        else:
            import sys

            import safet2i.images as images_mod

            orig_read = getattr(images_mod, "read_file_bytes", None)
            if orig_read is None:
                pytest.skip("safet2i.images.read_file_bytes does not exist; the decoder hook covers it")

            def hooked_read(p, *a, **kw):
                data = orig_read(p, *a, **kw)
                swap()
                return data

            # wherever the name was already imported to; modules imported later bind the hook
            for mod in [mo for n, mo in sys.modules.items() if n == "safet2i" or n.startswith("safet2i.")]:
                if getattr(mod, "read_file_bytes", None) is orig_read:
                    m.setattr(mod, "read_file_bytes", hooked_read)
        code = main(["filter", str(src), "--out", str(tmp_path / "out"), "--policy", "face-only",
                     "--action", "blur", "--report", str(tmp_path / "r.json"), "-q"])
    if not fired:
        pytest.skip(f"the CLI does not read through {hook}; the decoder hook covers it")
    assert code == 0, f"exit status {code}: the first content is benign"
    (entry,) = json.loads((tmp_path / "r.json").read_text())["files"]
    assert entry["verdict"] == "safe"
    outs = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert [p.resolve() for p in outs] == [Path(entry["output"]).resolve()]
    data = outs[0].read_bytes()
    assert data != path.read_bytes(), "the swapped-in file was copied to --out"
    with Image.open(io.BytesIO(data)) as im:
        got = pil_to_rgb(im).astype(np.int16)
    assert got.shape == first_pixels.shape
    diff = np.abs(got - first_pixels)
    if fmt == "PNG":
        assert diff.max() == 0, "the output is not the checked pixels of the first content"
    else:  # re-encoded JPEG: close to the checked pixels, far from the swapped-in face
        assert diff.mean() < 3, f"the output differs from the checked pixels (mean {diff.mean():.1f})"
    assert not unsafe_images(flt, embedded_images(data, "output")), "the unchecked face reached --out"


# --------------------------------------------------------------------------- review follow-ups


def test_frames_of_different_sizes_never_combine_into_an_unchecked_picture(tmp_path):
    """Review: an MPO whose frame 0 is the astronaut with the top rows greyed and whose frame 1
    is only those top rows (neither flagged) became an APNG where frame 1 was drawn over
    frame 0, showing the whole face. Each frame now lies whole on a black canvas."""
    from safet2i.cli import main as cli

    a = skimage.data.astronaut()
    f0 = a.copy()
    f0[:110] = 128
    src = tmp_path / "split.mpo"
    Image.fromarray(f0).save(src, format="MPO", save_all=True, append_images=[Image.fromarray(a[:110].copy())],
                             quality=100)
    out = tmp_path / "out"
    assert cli(["filter", str(src), "--out", str(out), "--policy", "face-only", "-q"]) == 0
    written = out / "split.png"
    flt = SafetyFilter(["nudenet"], "face-only", "pass")
    with Image.open(written) as im:
        frames = [np.asarray(fr.convert("RGB")) for fr in ImageSequence.Iterator(im)]
    assert len(frames) == 2
    assert not any(v.unsafe for v in flt.check(frames))
    assert np.abs(frames[1][:110].astype(int) - a[:110]).mean() < 4      # frame 1 (JPEG-decoded) alone,
    assert not frames[1][110:].any()                                      # on black


def test_icon_entries_are_sized_before_pillow_decodes_them(tmp_path):
    """Review: an ICO whose directory says 16x16 but holds a 13000x13000 PNG was decoded by
    Pillow while opening (772 MB) before any limit applied."""
    import struct

    from safet2i.errors import ImageBudgetError
    from safet2i.images import decode_image_bytes

    b = io.BytesIO()
    Image.new("RGB", (13000, 13000), (200, 100, 50)).save(b, "PNG", compress_level=9)
    png = b.getvalue()
    ico = struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 16, 16, 0, 0, 1, 32, len(png), 22) + png
    with pytest.raises(ImageBudgetError, match="icon entry of 13000x13000"):
        decode_image_bytes(ico, "bomb.ico")
    icns = b"icns" + struct.pack(">I", 8 + 8 + len(png)) + b"ic07" + struct.pack(">I", 8 + len(png)) + png
    with pytest.raises(ImageBudgetError, match="icon entry"):
        decode_image_bytes(icns, "bomb.icns", max_file_pixels=1_000_000)
