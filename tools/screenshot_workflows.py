"""Screenshot SafeT2I's example workflows as the real ComfyUI frontend renders them.

    COMFYUI_PATH=/path/to/ComfyUI COMFYUI_PYTHON=/path/to/comfy/venv/bin/python \\
        PYTHON_WITH_PLAYWRIGHT tools/screenshot_workflows.py [--only NAME ...] [--keep-temp]
        [--check-templates /tmp/templates.png]

Writes
  * ``docs/images/full_stack_workflow.png``: the ``safet2i_full_stack_txt2img`` workflow, zoomed
    so that node titles and widget values are legible (README picture, kept under 1 MB);
  * ``example_workflows/<name>.jpg`` for every ``example_workflows/<name>.json``: the thumbnail
    the template browser shows. The bundled frontend (comfyui_frontend_package 1.27) builds a
    custom-node template's thumbnail URL as ``/api/workflow_templates/<pack>/<name>.jpg``
    (``mediaSubtype: "jpg"``) and ComfyUI serves it from the folder that holds ``<name>.json``.
    Shown with ``object-contain`` in a card at most 256 px high, so thumbnails are 512x384
    (4:3) and kept under 200 KB.

How: the script never installs ComfyUI. It takes ``COMFYUI_PATH`` (a ComfyUI checkout) and
``COMFYUI_PYTHON`` (an interpreter with ComfyUI's and this pack's dependencies) from the
environment, like the integration tests, and starts ``main.py --cpu`` on a free loopback port
in a temporary folder (deleted afterwards unless ``--keep-temp``) holding this pack (symlinked
into ``custom_nodes``) and the files the workflows name: a tiny random SD1.x checkpoint symlinked as
``v1-5-pruned-emaonly-fp16.safetensors`` (``SAFET2I_TINY_CKPT``, default
``/tmp/tiny_sd15.safetensors``; generated with ``tests/integration/make_tiny_sd15.py`` when
missing), a placeholder ``duo_nudity_beta500.safetensors`` LoRA (one zero tensor: the workflows
are only rendered, never run) and ``example.png``. Settings are pre-seeded so that no first-run
dialog, minimap or version toast appears. Headless Chromium (``CHROMIUM``, default
``/usr/bin/chromium``) is driven through the ``playwright`` Python package, which must be
importable by the interpreter running this script (e.g. ``python -m venv /tmp/pw &&
/tmp/pw/bin/pip install playwright``; ``playwright install`` is not needed, the system Chromium
is used). Each workflow is loaded with ``app.loadGraphData``; the view is then fitted to the
graph by setting ``app.canvas.ds`` (scale and offset) from the nodes' bounding box. The server
and the browser are always stopped at the end.

``--check-templates PNG`` then also opens the template browser (Templates -> Custom Nodes ->
safet2i), logs the HTTP status of every thumbnail request and saves a screenshot of it.

Needs no network. Takes about 20 s (most of it ComfyUI start-up; plus ~10 s when the tiny
checkpoint has to be generated). ComfyUI 0.3.64 + frontend 1.27.10 log one frontend page error
at start-up (a setting's onChange); it is reported, not fatal.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACK_NAME = "safet2i"
WORKFLOWS = REPO / "example_workflows"
README_IMAGE = REPO / "docs" / "images" / "full_stack_workflow.png"
README_WORKFLOW = "safet2i_full_stack_txt2img"
CKPT_NAME = "v1-5-pruned-emaonly-fp16.safetensors"
LORA_NAME = "duo_nudity_beta500.safetensors"
THUMB_EXT = "jpg"  # what the bundled frontend requests for custom-node templates (see docstring)
THUMB_SIZE = (512, 384)
THUMB_MAX_BYTES = 200_000
README_MAX_BYTES = 1_000_000

CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]

# Written to user/default/comfy.settings.json before the server starts.
SETTINGS = {
    "Comfy.TutorialCompleted": True,          # else the template browser opens on first visit
    "Comfy.Minimap.Visible": False,
    "Comfy.Notification.ShowVersionUpdates": False,
    "Comfy.Workflow.ShowMissingModelsWarning": False,
    "Comfy.Workflow.ShowMissingNodesWarning": False,
    "Comfy.Workflow.Persist": False,
    "Comfy.Toast.DisableReconnectingToast": True,
    "Comfy.Canvas.SelectionToolbox": False,
    "Comfy.Graph.CanvasInfo": False,
    "LiteGraph.Canvas.MinFontSizeForLOD": 0,  # draw titles/widgets at every zoom (thumbnails)
}


def log(msg: str) -> None:
    print(f"[screenshot] {msg}", flush=True)


# --------------------------------------------------------------------------- placeholder files
def write_placeholder_lora(path: Path) -> None:
    """A valid, tiny safetensors file (one float32 zero tensor) in pure Python."""
    header = {"__metadata__": {"safet2i": "screenshot placeholder, not a real LoRA"},
              "placeholder.alpha": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + struct.pack("<f", 0.0))


def write_png(path: Path, w: int = 64, h: int = 64) -> None:
    """A small grey-gradient RGB PNG, pure Python."""
    rows = b"".join(b"\x00" + bytes(80 + (x + y) % 96 for x in range(w) for _ in range(3)) for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def tiny_checkpoint(comfy_path: str, python: str, scratch: Path) -> Path:
    ckpt = Path(os.environ.get("SAFET2I_TINY_CKPT", "/tmp/tiny_sd15.safetensors"))
    if ckpt.is_file():
        return ckpt
    ckpt = scratch / "tiny_sd15.safetensors"
    log(f"generating a tiny SD1.x checkpoint at {ckpt}")
    subprocess.run([python, str(REPO / "tests" / "integration" / "make_tiny_sd15.py"), str(ckpt)],
                   cwd=comfy_path, check=True)
    return ckpt


# --------------------------------------------------------------------------- ComfyUI server
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def comfy_server(base: Path, comfy_path: str, python: str):
    for d in ("custom_nodes", "checkpoints", "loras", "input", "output", "user/default", "models",
              "safety_models"):
        (base / d).mkdir(parents=True, exist_ok=True)
    (base / "custom_nodes" / PACK_NAME).symlink_to(REPO, target_is_directory=True)
    ckpt = tiny_checkpoint(comfy_path, python, base)
    (base / "checkpoints" / CKPT_NAME).symlink_to(ckpt.resolve())  # only listed, never loaded
    write_placeholder_lora(base / "loras" / LORA_NAME)
    write_png(base / "input" / "example.png")
    (base / "user" / "default" / "comfy.settings.json").write_text(json.dumps(SETTINGS, indent=1))
    (base / "extra_model_paths.yaml").write_text(
        "safet2i_screenshot:\n"
        f"  base_path: {base}\n"
        f"  checkpoints: {base / 'checkpoints'}\n"
        f"  loras: {base / 'loras'}\n"
        f"  safet2i_filters: {base / 'models'}\n"
        f"  safety_models: {base / 'safety_models'}\n"
        f"  custom_nodes: {base / 'custom_nodes'}\n"
    )
    port = _free_port()
    logf = base / "server.log"
    cmd = [python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
           "--extra-model-paths-config", str(base / "extra_model_paths.yaml"),
           "--output-directory", str(base / "output"), "--input-directory", str(base / "input"),
           "--user-directory", str(base / "user"), "--database-url", f"sqlite:///{base / 'db.sqlite'}",
           "--disable-auto-launch"]
    env = dict(os.environ, SAFET2I_SKIP_INSTALL="1", PYTHONUNBUFFERED="1")
    fh = open(logf, "w")  # noqa: SIM115 - closed in the finally below
    proc = subprocess.Popen(cmd, cwd=comfy_path, stdout=fh, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"

    def tail(n: int = 40) -> str:
        return "\n".join(logf.read_text(errors="replace").splitlines()[-n:])

    try:
        deadline = time.time() + 180
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {proc.returncode}:\n{tail()}")
            try:
                with urllib.request.urlopen(url + "/object_info/SafeT2ISLD", timeout=10) as r:
                    if "SafeT2ISLD" not in json.loads(r.read()):
                        raise RuntimeError(f"SafeT2I nodes are not registered:\n{tail()}")
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                if time.time() > deadline:
                    raise RuntimeError(f"ComfyUI did not start in 180 s:\n{tail()}")
                time.sleep(0.5)
        log(f"ComfyUI up at {url}")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        fh.close()
        log("ComfyUI stopped")


# --------------------------------------------------------------------------- browser side
JS_READY = ("() => !!(window.app && app.graph && app.canvas && app.canvas.ds"
            " && document.querySelector('canvas'))")

JS_LOAD = """async ([wf, name]) => {
  await app.loadGraphData(wf, true, true, name);
  return app.graph._nodes.length;
}"""

# Bounding box of all nodes (incl. title bars) and groups, in graph coordinates.
JS_BOUNDS = """() => {
  const T = (window.LiteGraph && LiteGraph.NODE_TITLE_HEIGHT) || 30;
  let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
  for (const n of app.graph._nodes) {
    x0 = Math.min(x0, n.pos[0]); y0 = Math.min(y0, n.pos[1] - T);
    x1 = Math.max(x1, n.pos[0] + n.size[0]); y1 = Math.max(y1, n.pos[1] + n.size[1]);
  }
  for (const g of (app.graph._groups || app.graph.groups || [])) {
    const [gx, gy, gw, gh] = g._bounding || g.bounding || [g.pos[0], g.pos[1], g.size[0], g.size[1]];
    x0 = Math.min(x0, gx); y0 = Math.min(y0, gy); x1 = Math.max(x1, gx + gw); y1 = Math.max(y1, gy + gh);
  }
  return [x0, y0, x1 - x0, y1 - y0];
}"""

# Place graph rect [x, y, w, h] at `scale` with its top-left at canvas pixel (px, py).
JS_PLACE = """([x, y, scale, px, py]) => {
  const ds = app.canvas.ds;
  ds.scale = scale;
  ds.offset[0] = px / scale - x;
  ds.offset[1] = py / scale - y;
  app.canvas.deselectAll?.();
  app.canvas.setDirty(true, true);
  app.canvas.draw(true, true);
  return [ds.scale, ds.offset[0], ds.offset[1]];
}"""

JS_CANVAS_RECT = """() => {
  const c = app.canvas.canvas; const r = c.getBoundingClientRect();
  return [r.left, r.top, r.width, r.height];
}"""

# Downscale a PNG (data URL) to w x h in the page and return JPEG bytes (base64) at `q`.
JS_TO_JPEG = """async ([src, w, h, q]) => {
  const img = new Image(); img.src = src; await img.decode();
  // Halve repeatedly for a smooth downscale, then draw at the final size.
  let cur = img, cw = img.width, ch = img.height;
  while (cw / 2 >= w && ch / 2 >= h) {
    const c = document.createElement('canvas'); c.width = Math.round(cw / 2); c.height = Math.round(ch / 2);
    const x = c.getContext('2d'); x.imageSmoothingQuality = 'high'; x.drawImage(cur, 0, 0, c.width, c.height);
    cur = c; cw = c.width; ch = c.height;
  }
  const out = document.createElement('canvas'); out.width = w; out.height = h;
  const ctx = out.getContext('2d'); ctx.imageSmoothingQuality = 'high'; ctx.drawImage(cur, 0, 0, w, h);
  return out.toDataURL('image/jpeg', q).split(',')[1];
}"""

DISMISS_JS = """() => {
  let n = 0;
  for (const sel of ['.p-dialog-close-button', '.p-dialog-header-close', '.p-toast-close-button',
                     '[aria-label="Close"]', '.p-dialog .p-button[aria-label="Close"]']) {
    for (const b of document.querySelectorAll(sel)) { b.click(); n++; }
  }
  return n;
}"""


def dismiss_popups(page) -> None:
    for _ in range(3):
        clicked = page.evaluate(DISMISS_JS)
        page.keyboard.press("Escape")
        page.wait_for_timeout(300)
        visible = page.evaluate("() => [...document.querySelectorAll('.p-dialog, .p-toast-message')]"
                                ".filter(e => e.offsetParent !== null).length")
        if not clicked and not visible:
            return
    if visible:
        log(f"warning: {visible} dialog(s)/toast(s) still visible")


def settle(page, ms: int = 400) -> None:
    page.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
    page.wait_for_timeout(ms)


def load_workflow(page, path: Path) -> None:
    wf = json.loads(path.read_text())
    n = page.evaluate(JS_LOAD, [wf, path.stem])
    if n != len(wf["nodes"]):
        raise RuntimeError(f"{path.name}: {n} nodes on the canvas, {len(wf['nodes'])} in the file")
    dismiss_popups(page)
    missing = page.evaluate("() => app.graph._nodes.filter(n => n.has_errors"
                            " || !LiteGraph.registered_node_types[n.type]).map(n => n.type)")
    if missing:
        raise RuntimeError(f"{path.name}: nodes not registered in the frontend: {missing}")


def capture(page, rect_graph, out_w: int, out_h: int, margin: int, scale: float | None = None):
    """Fit graph rect into an (out_w x out_h) area of the canvas; return the PNG bytes of that area."""
    gx, gy, gw, gh = rect_graph
    if scale is None:
        scale = min((out_w - 2 * margin) / gw, (out_h - 2 * margin) / gh)
    cx, cy, cw, ch = page.evaluate(JS_CANVAS_RECT)
    # centre the graph in the output area, which itself is centred in the canvas
    ax, ay = (cw - out_w) / 2, (ch - out_h) / 2
    px = ax + (out_w - gw * scale) / 2
    py = ay + (out_h - gh * scale) / 2
    page.evaluate(JS_PLACE, [gx, gy, scale, px, py])
    settle(page)
    clip = {"x": cx + ax, "y": cy + ay, "width": out_w, "height": out_h}
    return page.screenshot(clip=clip, type="png"), scale


def to_jpeg(page, png: bytes, size, max_bytes: int) -> bytes:
    src = "data:image/png;base64," + base64.b64encode(png).decode()
    for q in (0.88, 0.8, 0.7, 0.6, 0.5):
        data = base64.b64decode(page.evaluate(JS_TO_JPEG, [src, size[0], size[1], q]))
        if len(data) <= max_bytes:
            return data
    raise RuntimeError(f"thumbnail stays above {max_bytes} bytes")


def check_template_browser(page, out: Path) -> None:
    """Open Templates -> Custom Nodes -> safet2i and screenshot it (to see the thumbnails in place)."""
    thumbs: dict[str, int] = {}
    page.on("response", lambda r: thumbs.__setitem__(r.url.rsplit("/", 1)[-1], r.status)
            if f"/workflow_templates/{PACK_NAME}/" in r.url else None)
    page.set_viewport_size({"width": 1600, "height": 900})
    page.evaluate("() => app.extensionManager.command.execute('Comfy.BrowseTemplates')")
    page.get_by_text(PACK_NAME, exact=True).first.click(timeout=30_000)
    # The cards fetch the thumbnails and show them as blob: URLs.
    try:
        page.wait_for_function("() => [...document.querySelectorAll('.p-dialog img')]"
                               ".some(i => i.src.startsWith('blob:') && i.naturalWidth > 0)", timeout=30_000)
    except Exception as e:  # noqa: BLE001 - still save what is on screen
        log(f"warning: no template thumbnail showed up ({type(e).__name__})")
    settle(page, 1500)  # the cards fade in
    out.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(out))
    log(f"template browser: {out}; thumbnail requests: {thumbs}")
    page.keyboard.press("Escape")


def shoot(url: str, names: list[str], chromium: str,
          template_check: Path | None = None) -> list[tuple[Path, int]]:
    from playwright.sync_api import sync_playwright

    written = []
    with sync_playwright() as pw, tempfile.TemporaryDirectory(prefix="safet2i-chromium-") as profile:
        ctx = pw.chromium.launch_persistent_context(
            profile, executable_path=chromium, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1600, "height": 900}, device_scale_factor=1)
        try:
            page = ctx.pages[0] if ctx.pages else ctx.new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url, wait_until="networkidle", timeout=120_000)
            page.wait_for_function(JS_READY, timeout=120_000)
            settle(page, 1500)
            dismiss_popups(page)
            # Focus mode hides the menus, side bar and floating canvas toolbar (they would cover the graph).
            page.evaluate("() => app.extensionManager?.command?.execute?.('Workspace.ToggleFocusMode')")
            settle(page, 800)

            for name in names:
                path = WORKFLOWS / f"{name}.json"
                load_workflow(page, path)
                bounds = page.evaluate(JS_BOUNDS)

                if name == README_WORKFLOW:
                    # Big viewport so the graph fits at a legible zoom (~0.8: 11 px node titles).
                    margin, scale = 24, 0.8
                    w = int(bounds[2] * scale + 2 * margin)
                    h = int(bounds[3] * scale + 2 * margin)
                    page.set_viewport_size({"width": max(w, 1600), "height": max(h, 900)})
                    settle(page, 800)
                    png, _ = capture(page, bounds, w, h, margin, scale)
                    README_IMAGE.parent.mkdir(parents=True, exist_ok=True)
                    README_IMAGE.write_bytes(png)
                    if len(png) > README_MAX_BYTES:
                        raise RuntimeError(f"{README_IMAGE} is {len(png)} bytes (> {README_MAX_BYTES})")
                    written.append((README_IMAGE, len(png)))
                    log(f"{README_IMAGE.relative_to(REPO)}: {w}x{h}, {len(png)} bytes")

                # Thumbnail: render at 2x the thumbnail size, then downscale smoothly.
                tw, th = THUMB_SIZE[0] * 2, THUMB_SIZE[1] * 2
                page.set_viewport_size({"width": 1600, "height": 900})
                settle(page, 800)
                png, used = capture(page, bounds, tw, th, 24)
                jpg = to_jpeg(page, png, THUMB_SIZE, THUMB_MAX_BYTES)
                out = WORKFLOWS / f"{name}.{THUMB_EXT}"
                out.write_bytes(jpg)
                written.append((out, len(jpg)))
                log(f"{out.relative_to(REPO)}: {THUMB_SIZE[0]}x{THUMB_SIZE[1]}, {len(jpg)} bytes"
                    f" (rendered at zoom {used:.2f}, then halved)")
            if template_check:
                check_template_browser(page, template_check)
            if errors:  # 1.27.10 throws one at start-up itself (a setting's onChange); only reported
                log("frontend page errors: " + " | ".join(errors[:5]))
        finally:
            ctx.close()
    return written


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="*", help="workflow names (without .json); default: all")
    ap.add_argument("--keep-temp", action="store_true", help="keep the temporary server folder")
    ap.add_argument("--check-templates", type=Path, metavar="PNG",
                    help="afterwards, also screenshot the template browser's safet2i page to PNG")
    a = ap.parse_args()
    comfy_path, python = os.environ.get("COMFYUI_PATH"), os.environ.get("COMFYUI_PYTHON")
    if not comfy_path or not python or not (Path(comfy_path) / "main.py").is_file():
        print("set COMFYUI_PATH (a ComfyUI checkout with main.py) and COMFYUI_PYTHON (its interpreter)",
              file=sys.stderr)
        return 2
    chromium = os.environ.get("CHROMIUM", "/usr/bin/chromium")
    try:
        import playwright  # noqa: F401
    except ImportError:
        print("the 'playwright' package is needed (pip install playwright; no 'playwright install')",
              file=sys.stderr)
        return 2
    names = a.only or sorted(p.stem for p in WORKFLOWS.glob("*.json"))
    base = Path(tempfile.mkdtemp(prefix="safet2i-screenshot-"))
    try:
        with comfy_server(base, comfy_path, python) as url:
            written = shoot(url, names, chromium, a.check_templates)
    finally:
        if a.keep_temp:
            log(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    for p, n in written:
        print(f"{p.relative_to(REPO)}\t{n} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
