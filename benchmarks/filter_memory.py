"""Peak memory (RSS) of ``safet2i filter`` on huge inputs (issue 14, class 4).

Scenarios (inputs generated once into a work folder, benign: flat colour with a small
pattern, so they compress to a few hundred KB each):

  * ``gif-100x3000``: one animated GIF, 100 frames of 3000 x 3000 = 900 Mpx decoded, over
    the per-file budget (``SAFET2I_MAX_FILE_PIXELS``, default 300 Mpx): expected outcome a
    per-file budget error, exit status 2, no traceback, no ``MemoryError`` text;
  * ``png-16x12000``: 16 PNG files of 12000 x 12000 (144 Mpx each, under the 150 Mpx frame
    limit): expected all safe, exit status 0.

Documented budget (docs/filter.md, "Guarantees and limits"): per file at most 300 Mpx
decoded (900 MB as RGB uint8), per frame 150 Mpx, and a CLI batch budget of pending decoded
pixels (same default), so the process should peak at about models and runtime (~0.6 GB)
+ 2 x 900 MB. :data:`RSS_LIMIT_GB` (2.5 GB) is that with headroom.

Each run is ``python -m safet2i.cli filter ...`` in its own process, started by a small
fresh helper process that reports ``getrusage(RUSAGE_CHILDREN).ru_maxrss`` (Linux keeps a
peak RSS across exec, so the helper keeps this benchmark's own size out of it). A run that goes past
``--kill-above`` GB (default 6) is killed so a regression cannot exhaust a shared machine;
its peak is then reported as at least that.

    python benchmarks/filter_memory.py [--scenario gif-100x3000] [--workdir DIR] [--kill-above 6]

Prints one row per scenario (peak RSS, wall time, exit status) and the outcome per file.
Exit status 0 when every scenario met its expectation and the limit, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RSS_LIMIT_GB = 2.5
GIF_SIZE, GIF_FRAMES = 3000, 100
PNG_SIZE, PNG_FILES = 12000, 16
GB = 1024 ** 3


# --------------------------------------------------------------------------- inputs


def make_gif(path: Path, size: int = GIF_SIZE, frames: int = GIF_FRAMES) -> Path:
    """An animated GIF: flat grey canvas with a small coloured square moving per frame
    (Pillow stores only the changed rectangle, decoders return full canvases)."""
    from PIL import Image

    palette = [118, 124, 131, 30, 90, 160, 200, 170, 60, 240, 240, 240] + [0] * (256 * 3 - 12)
    base = Image.new("P", (size, size), 0)
    base.putpalette(palette)

    def later():
        for i in range(1, frames):
            im = base.copy()
            x, y = (i * 29) % (size - 128), (i * 17) % (size - 128)
            im.paste(1 + i % 3, (x, y, x + 128, y + 128))
            yield im

    first = base.copy()
    first.paste(2, (10, 10, 138, 138))
    path.parent.mkdir(parents=True, exist_ok=True)
    first.save(path, format="GIF", save_all=True, append_images=later(), duration=40, loop=0,
               optimize=False, disposal=1)
    return path


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def _deflate(data: bytes) -> bytes:
    """Raw deflate of ``data`` ending in a full flush: byte-aligned and independent of
    anything before it, so such pieces can be concatenated (and reused)."""
    c = zlib.compressobj(6, zlib.DEFLATED, -15)
    return c.compress(data) + c.flush(zlib.Z_FULL_FLUSH)


def make_png(path: Path, size: int = PNG_SIZE, seed: int = 0) -> Path:
    """A size x size RGB PNG built from reusable deflate pieces (no full-size array is
    ever made, about a second per 12000 x 12000 file): flat colour with a 256 x 256
    gradient square whose place and colour depend on ``seed``."""
    import numpy as np

    rng = np.random.default_rng(seed)
    colour = np.array([110 + seed % 7 * 5, 120, 130 - seed % 5 * 4], np.uint8)
    flat = np.broadcast_to(colour, (size, 3)).copy()
    px, py = (int(v) for v in rng.integers(1, size - 257, 2))
    ramp = np.linspace(0, 255, 256).astype(np.uint8)
    same = b"\x02" + bytes(size * 3)  # filter "Up": identical to the row above
    block_rows = 512
    same_block = same * block_rows
    same_block_z = _deflate(same_block)
    pieces, adler = [], 1

    def raw(data: bytes, packed: bytes | None = None):
        nonlocal adler
        pieces.append(packed if packed is not None else _deflate(data))
        adler = zlib.adler32(data, adler)

    def repeat_rows(n: int):
        for _ in range(n // block_rows):
            raw(same_block, same_block_z)
        if n % block_rows:
            raw(same * (n % block_rows))

    rows = [b"\x00" + flat.tobytes()]  # row 0
    raw(rows[0])
    repeat_rows(py - 1)
    square = []
    for y in range(256):
        row = flat.copy()
        row[px:px + 256] = np.stack([ramp, ramp[::-1], np.full(256, y, np.uint8)], -1)
        square.append(b"\x00" + row.tobytes())
    raw(b"".join(square) + rows[0])  # the square, then a plain flat row
    repeat_rows(size - py - 257)
    pieces.append(zlib.compressobj(6, zlib.DEFLATED, -15).flush(zlib.Z_FINISH))  # final empty block
    idat = b"\x78\x9c" + b"".join(pieces) + struct.pack(">I", adler & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat)
                     + _png_chunk(b"IEND", b""))
    return path


def make_inputs(workdir: Path, scenario: str) -> list[Path]:
    """The scenario's input files under ``workdir`` (made once, reused when present)."""
    folder = workdir / f"in-{scenario}"
    done = folder / ".complete"
    if scenario == "gif-100x3000":
        files = [folder / "animation_100x3000.gif"]
    elif scenario == "png-16x12000":
        files = [folder / f"huge_{i:02d}.png" for i in range(PNG_FILES)]
    else:
        raise ValueError(f"unknown scenario {scenario!r}")
    if done.exists() and all(f.exists() for f in files):
        return files
    free = shutil.disk_usage(workdir).free
    if free < 1 * GB:
        raise SystemExit(f"only {free / GB:.1f} GB free under {workdir}; need about 1 GB")
    if scenario == "gif-100x3000":
        make_gif(files[0])
    else:
        for i, f in enumerate(files):
            make_png(f, seed=i)
    done.write_text("ok\n")
    return files


# --------------------------------------------------------------------------- measuring


#: Runs argv[2:] as its child and writes {"code", "maxrss"} (RUSAGE_CHILDREN) to argv[1].
#: Measuring through this small, fresh process matters: Linux keeps a process's peak RSS
#: across exec, so a child forked straight from a big parent (this benchmark, or pytest
#: after making the inputs) would report the parent's size as its own peak.
_HELPER = (
    "import json, resource, subprocess, sys\n"
    "code = subprocess.call(sys.argv[2:])\n"
    "ru = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
    "json.dump({'code': code, 'maxrss': ru.ru_maxrss}, open(sys.argv[1], 'w'))\n"
)


def measure(cmd: list[str], kill_above_gb: float = 6.0, timeout: float = 900.0, env=None) -> dict:
    """Run ``cmd`` (through a fresh helper process); return its exit status, peak RSS
    (the ``ru_maxrss`` of that very process, in bytes), wall time and stdout/stderr.
    Killed past ``kill_above_gb`` of RSS (polled) or ``timeout`` seconds."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
            tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "rusage.json"
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-c", _HELPER, str(result), *cmd], stdout=out, stderr=err,
                                env=env, cwd=REPO, start_new_session=True)
        killed: list[str] = []
        stop = threading.Event()

        def watch():
            try:
                import psutil
            except ImportError:  # pragma: no cover - no watchdog, measurement still works
                psutil = None
            p = psutil.Process(proc.pid) if psutil else None
            while not stop.wait(0.05):
                if time.perf_counter() - t0 > timeout:
                    killed.append(f"timeout after {timeout:.0f} s")
                elif p is not None:
                    try:
                        rss = sum(c.memory_info().rss for c in p.children(recursive=True))
                    except Exception:  # noqa: BLE001, S112 - a process just ended
                        continue
                    if rss > kill_above_gb * GB:
                        killed.append(f"killed at {rss / GB:.2f} GB RSS "
                                      f"(the harness limit is {kill_above_gb} GB)")
                if killed:
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)  # the helper and the CLI
                    except ProcessLookupError:
                        pass
                    return

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            proc.wait()
        finally:
            stop.set()
            watcher.join()
        wall = time.perf_counter() - t0
        info = json.loads(result.read_text()) if result.exists() else {"code": None, "maxrss": 0}
        out.seek(0)
        err.seek(0)
        peak = info["maxrss"] * 1024  # Linux: kilobytes
        if killed:
            peak = max(peak, int(kill_above_gb * GB))
        return {
            "code": info["code"] if info["code"] is not None else proc.returncode,
            "peak_rss": peak,
            "wall": wall,
            "stdout": out.read().decode("utf-8", "replace"),
            "stderr": err.read().decode("utf-8", "replace"),
            "killed": killed[0] if killed else None,
        }


CLI = [sys.executable, "-m", "safet2i.cli"]


def run_scenario(scenario: str, workdir: Path, kill_above_gb: float = 6.0, extra_args=(), cli=None) -> dict:
    """Generate (once) and filter one scenario; add the report's per-file outcomes.
    ``cli``: the command that starts the CLI (default ``python -m safet2i.cli``)."""
    inputs = make_inputs(workdir, scenario)
    run_dir = Path(tempfile.mkdtemp(prefix=f"run-{scenario}-", dir=workdir))
    out, report = run_dir / "out", run_dir / "report.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAFET2I_")}  # documented defaults
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [*(cli or CLI), "filter", *map(str, inputs), "--out", str(out),
           "--report", str(report), *extra_args]
    res = measure(cmd, kill_above_gb)
    res.update(scenario=scenario, inputs=[str(p) for p in inputs], out=str(out), report=None, files=[])
    if report.exists():
        res["report"] = json.loads(report.read_text())
        res["files"] = [{"path": f["path"], "verdict": f["verdict"], "error": f.get("error"),
                         "output": f.get("output")} for f in res["report"]["files"]]
    res["outputs"] = sorted(str(p) for p in out.rglob("*") if p.is_file()) if out.exists() else []
    shutil.rmtree(run_dir, ignore_errors=True)
    return res


EXPECTED = {"gif-100x3000": 2, "png-16x12000": 0}


def check(res: dict, limit_gb: float = RSS_LIMIT_GB) -> list[str]:
    """What is wrong with a scenario's result (empty: as documented)."""
    bad = []
    if res["killed"]:
        bad.append(res["killed"])
    if res["peak_rss"] > limit_gb * GB:
        bad.append(f"peak RSS {res['peak_rss'] / GB:.2f} GB over {limit_gb} GB")
    want = EXPECTED[res["scenario"]]
    if res["code"] != want:
        bad.append(f"exit status {res['code']}, expected {want}")
    text = res["stdout"] + res["stderr"]
    for word in ("Traceback", "MemoryError", "DecompressionBombWarning", "RuntimeWarning"):
        if word in text:
            bad.append(f"{word!r} in the output")
    if res["report"] is None:
        bad.append("no JSON report written")
    else:
        names = {Path(f["path"]).name for f in res["files"]}
        missing = {Path(p).name for p in res["inputs"]} - names
        if missing:
            bad.append(f"inputs missing from the report: {sorted(missing)}")
        for f in res["files"]:
            name = Path(f["path"]).name
            if res["scenario"] == "gif-100x3000":
                err = f["error"] or ""
                budget_error = any(w in err for w in ("budget", "limit"))
                if f["verdict"] != "error" or name not in err or not budget_error:
                    bad.append(f"{name}: expected a per-file budget error naming the file, got "
                               f"{f['verdict']}: {err!r}")
                elif name not in res["stderr"]:
                    bad.append(f"{name}: the budget error is not printed on stderr")
            elif f["verdict"] != "safe" or not f["output"]:
                bad.append(f"{name}: expected safe and written, got {f['verdict']}: {f['error']!r}")
        if res["scenario"] == "png-16x12000" and len(res["outputs"]) != PNG_FILES:
            bad.append(f"{len(res['outputs'])} outputs written, expected {PNG_FILES}")
    return bad


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenario", action="append", choices=list(EXPECTED), help="default: all")
    ap.add_argument("--workdir", help="where inputs are generated (default: a temporary folder, removed)")
    ap.add_argument("--kill-above", type=float, default=6.0, help="kill a run past this many GB of RSS")
    ap.add_argument("--limit", type=float, default=RSS_LIMIT_GB, help="peak RSS budget in GB")
    args = ap.parse_args(argv)
    scenarios = args.scenario or list(EXPECTED)
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="safet2i-mem-"))
    workdir.mkdir(parents=True, exist_ok=True)
    failures = 0
    try:
        print(f"{'scenario':15s} {'peak RSS':>9s} {'wall':>8s} {'exit':>4s}  verdict")
        for sc in scenarios:
            t0 = time.perf_counter()
            make_inputs(workdir, sc)
            gen = time.perf_counter() - t0
            res = run_scenario(sc, workdir, args.kill_above)
            bad = check(res, args.limit)
            failures += bool(bad)
            print(f"{sc:15s} {res['peak_rss'] / GB:7.2f} GB {res['wall']:6.1f} s {res['code']:4d}  "
                  f"{'ok' if not bad else 'FAIL'} (inputs made in {gen:.1f} s)")
            for f in res["files"]:
                what = f["verdict"] + (f": {f['error']}" if f["error"] else "")
                print(f"    {Path(f['path']).name:26s} {what}")
            for b in bad:
                print(f"    ! {b}")
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"budget: peak RSS < {args.limit} GB "
          "(models ~0.6 GB + 2 x 900 MB of decoded pixels, with headroom)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
