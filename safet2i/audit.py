"""``safet2i audit``: the output filter over large image collections, resumable, in-process
or on a Ray cluster (``docs/scale.md``).

One code path checks images in both modes: :class:`Auditor` (a batch of work items in, a
batch of verdict rows out) runs in this process without ``--ray``, and as the class-based
UDF of a Ray Data ``map_batches`` (model-holding actors, one model load per actor) with it.
Reading, checking, censoring and writing an image is :class:`~safet2i.filter.files.FileFilter`'s
work, the same as ``safet2i filter``; the summary is :mod:`safet2i.filter.report`'s.

Exactly-once bookkeeping (the driver's, in both modes):

* the key of an input is ``sha256(path, sha256 of its bytes, config)``, where ``config`` is a
  hash of the filter's description (models with their sha256, policy, action) and the
  censoring options; a row without an error is *done*, and a re-run skips done keys (the
  driver hands each input the hash it was done with, if any; the worker that reads the bytes
  skips it when they still have that hash, so no set of keys is shipped to the workers);
* one audit writes a table at a time (``TABLE.lock``, an ``flock`` the OS releases when the
  process ends);
* verdict rows are appended as Parquet *parts* (``TABLE.parts/part-*.parquet``, each written
  to a temporary file and renamed) and merged into ``TABLE`` at the end (one row per key,
  written atomically), after which the parts are removed; an interruption loses at most the
  rows not yet in a part, and those inputs are simply checked again; the merge reads record
  batches (the driver keeps a few dozen bytes a row, not the rows);
* a censored copy is published without ever replacing a file
  (:func:`~safet2i.fileio.publish_new`): the copy written before an interruption, or by a
  worker Ray retried, has exactly the bytes the retry writes and counts as written; a file
  with other content is a per-file error, never overwritten.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import tarfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from .errors import ImageInputError, MissingDependencyError, SafeT2IError
from .filter.files import EXIT_BROKEN, EXIT_REPORT, EXIT_UNSAFE, IMAGE_EXTS, atomic_write, collect
from .images import read_file_bytes

#: Columns of the verdict table, in order.
COLUMNS = ("path", "sha256", "cost", "labels", "boxes", "action", "error",
           "verdict", "output", "images", "key", "config")
#: Rows kept in memory before they are written as a part.
PART_ROWS = 256
LIST_EXTS = {".txt", ".lst", ".list"}
TAR_EXTS = (".tar",)
COMPRESSED_TAR_EXTS = (".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".tar.zst")
PARQUET_EXTS = (".parquet", ".pq")


def _pyarrow():
    try:
        import pyarrow  # noqa: PLC0415
        import pyarrow.parquet  # noqa: F401, PLC0415
    except ImportError as exc:
        raise MissingDependencyError(
            "pyarrow", "safet2i audit (its Parquet verdict table)",
            "Install it with: python -m pip install pyarrow  (or: python -m pip install 'safet2i[ray]')") from exc
    return pyarrow


# --------------------------------------------------------------------------- the work list


def _item(path: str, rel: str, kind: str = "file", src: str = "", a: int = -1, b: int = -1) -> dict:
    """A work item: what to read (``kind``/``src``/``a``/``b``), how it is named (``path``, in the
    table and reports) and where its copy goes (``rel`` under ``--out``). Small: never bytes."""
    return {"path": path, "rel": rel, "kind": kind, "src": src or path, "a": int(a), "b": int(b)}


def _digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8", "surrogateescape"), digest_size=16).digest()


def iter_items(inputs: list[str], exclude: list[Path] = (), skipped: list | None = None) -> Iterator[dict]:
    """Inputs -> work items, one at a time (a Parquet table or tar shard is read by row group or
    member, a file list line by line). A folder is searched as ``safet2i filter`` does;
    ``*.txt|.lst|.list``: one path per line (relative ones from the list's folder); ``*.parquet``:
    a table with a ``path`` and/or ``bytes`` column; ``*.tar``: a WebDataset shard (its image
    members; a compressed shard, ``*.tar.gz``/``*.tgz``..., is a fatal error); anything else: one
    image file. The same path twice is one item. Entries not taken are appended to ``skipped``."""
    skipped = [] if skipped is None else skipped
    seen: set[bytes] = set()
    for raw in inputs:
        p = Path(raw)
        low = p.name.lower()
        if p.is_dir():
            found, sk = collect([raw], exclude=exclude)
            skipped += sk
            its = (_item(os.fsdecode(f), os.fsdecode(r)) for f, r in found)
        elif p.is_file() and p.suffix.lower() in LIST_EXTS:
            its = _plan_list(p)
        elif p.is_file() and low.endswith(PARQUET_EXTS):
            its = _plan_parquet(p)
        elif low.endswith(COMPRESSED_TAR_EXTS) and not p.is_dir():
            raise SafeT2IError(f"{p}: compressed tar shards are not supported (members are read by offset); "
                               f"decompress it first (e.g. gunzip -k / xz -dk) and pass the .tar")
        elif p.is_file() and low.endswith(TAR_EXTS):
            its = _plan_tar(p, skipped)
        else:
            its = iter([_item(os.fsdecode(p), p.name)])
        for it in its:
            d = _digest(it["path"])
            if d not in seen:
                seen.add(d)
                yield it


def plan(inputs: list[str], exclude: list[Path] = ()) -> tuple[list[dict], list[dict]]:
    """:func:`iter_items` as a list: ``(work items, skipped entries)``."""
    skipped: list[dict] = []
    return list(iter_items(inputs, exclude, skipped)), skipped


def _plan_list(p: Path) -> Iterator[dict]:
    try:
        fh = open(p, encoding="utf-8", errors="surrogateescape")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise SafeT2IError(f"file list {p} cannot be read: {exc.strerror}") from exc
    with fh:
        try:
            for line in fh:
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                q = Path(line) if os.path.isabs(line) else p.parent / line
                yield _item(os.fsdecode(q), q.name)
        except OSError as exc:
            raise SafeT2IError(f"file list {p} cannot be read: {exc.strerror}") from exc


def _plan_parquet(p: Path) -> Iterator[dict]:
    pa = _pyarrow()
    try:
        pf = pa.parquet.ParquetFile(p)
    except Exception as exc:  # noqa: BLE001 - a broken table is a clear fatal error
        raise SafeT2IError(f"{p}: not a readable Parquet table ({exc})") from exc
    names = pf.schema_arrow.names
    if "path" not in names and "bytes" not in names:
        raise SafeT2IError(f"{p}: a Parquet input needs a 'path' and/or a 'bytes' column; it has {names}")
    for g in range(pf.num_row_groups):
        paths = pf.read_row_group(g, columns=["path"]).column(0).to_pylist() if "path" in names else None
        n = pf.metadata.row_group(g).num_rows
        for i in range(n):
            given = paths[i] if paths is not None else None
            if "bytes" in names:
                name = f"{p}#{given or f'row-{g}-{i}'}"
                rel = Path(p.stem) / Path(given or f"row-{g}-{i}").name
                yield _item(name, os.fsdecode(rel), "parquet", os.fsdecode(p), g, i)
            elif given:
                q = Path(given) if os.path.isabs(given) else p.parent / given
                yield _item(os.fsdecode(q), q.name)


def _plan_tar(p: Path, skipped: list[dict]) -> Iterator[dict]:
    try:
        with tarfile.open(p, "r:") as tf:   # uncompressed only: members are read by offset
            while True:
                m = tf.next()
                if m is None:
                    break
                tf.members.clear()   # the member index is not kept: memory stays bounded on huge shards
                name = f"{p}/{m.name}"
                if not m.isfile():
                    if not m.isdir():
                        skipped.append({"path": name, "reason": "not a regular file in the shard"})
                    continue
                if Path(m.name).suffix.lower() not in IMAGE_EXTS:
                    skipped.append({"path": name, "reason": "not an image file extension"})
                    continue
                rel = Path(p.name[:-len(".tar")]) / m.name
                if ".." in Path(m.name).parts or Path(m.name).is_absolute():
                    skipped.append({"path": name, "reason": "member name leaves the shard's folder"})
                    continue
                yield _item(name, os.fsdecode(rel), "tar", os.fsdecode(p), m.offset_data, m.size)
    except (tarfile.TarError, OSError) as exc:
        raise SafeT2IError(f"{p}: not a readable uncompressed tar shard ({exc})") from exc


#: Columns of the work list (path, rel and src as bytes: file names need not be UTF-8).
PLAN_CHUNK = 65536


def _plan_schema():
    pa = _pyarrow()
    return pa.schema([("path", pa.binary()), ("rel", pa.binary()), ("kind", pa.string()), ("src", pa.binary()),
                      ("a", pa.int64()), ("b", pa.int64()), ("done", pa.string())])


def _enc(s: str) -> bytes:
    return s.encode("utf-8", "surrogateescape")


def _dec(v) -> str:
    return v.decode("utf-8", "surrogateescape") if isinstance(v, (bytes, bytearray)) else str(v)


def plan_tables(items, done: dict, chunk: int = PLAN_CHUNK):
    """Work items -> Arrow tables of up to ``chunk`` rows (about 140 bytes an item, measured in
    benchmarks/audit_scale.py, instead of a Python dict's ~600); ``done``: the sha256 a path was audited with under this configuration
    (:meth:`Table.done_map`), carried in the ``done`` column (a worker skips the item when the
    bytes it reads still have that hash)."""
    pa = _pyarrow()
    cols: dict[str, list] = {c: [] for c in _plan_schema().names}

    def table():
        t = pa.Table.from_pydict(cols, schema=_plan_schema())
        for v in cols.values():
            v.clear()
        return t

    for it in items:
        cols["path"].append(_enc(it["path"]))
        cols["rel"].append(_enc(it["rel"]))
        cols["kind"].append(it["kind"])
        cols["src"].append(_enc(it["src"]))
        cols["a"].append(it["a"])
        cols["b"].append(it["b"])
        d = done.get(_digest(_text(it["path"])))
        cols["done"].append(d)
        if len(cols["path"]) >= chunk:
            yield table()
    if cols["path"]:
        yield table()


class _Reader:
    """Reads an item's bytes (in the worker that checks it). Keeps one Parquet row group."""

    def __init__(self):
        self._rg = (None, None, None)

    def read(self, it: dict) -> bytes:
        kind = it["kind"]
        if kind == "file":
            return read_file_bytes(it["src"])
        if kind == "tar":
            try:
                with open(it["src"], "rb") as fh:
                    fh.seek(it["a"])
                    data = fh.read(it["b"])
            except OSError as exc:
                raise ImageInputError(f"{it['path']}: cannot be read ({exc.strerror or exc}).") from exc
            if len(data) != it["b"]:
                raise ImageInputError(f"{it['path']}: the shard is shorter than its index says.")
            return data
        if kind == "parquet":
            src, g = it["src"], it["a"]
            if self._rg[:2] != (src, g):
                pa = _pyarrow()
                col = pa.parquet.ParquetFile(src).read_row_group(g, columns=["bytes"]).column(0)
                self._rg = (src, g, col)
            v = self._rg[2][it["b"]].as_py()
            if v is None:
                raise ImageInputError(f"{it['path']}: no bytes in this row.")
            return bytes(v)
        raise ImageInputError(f"{it['path']}: unknown input kind {kind!r}")


# --------------------------------------------------------------------------- checking


def make_filter(cfg: dict):
    from .filter.files import build_filter  # noqa: PLC0415

    return build_filter(cfg)


def config_id(description: dict, cfg: dict) -> str:
    """What makes two runs' verdicts and copies the same: the filter (models and their sha256,
    policy, action) and the options that shape the copies."""
    ident = {"filter": description, "out": os.path.realpath(cfg["out"]),
             "censor": {k: cfg.get(k) for k in ("strength", "colour")}}
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]


def item_key(path: str, sha256: str | None, config: str) -> str:
    return hashlib.sha256(f"{path}\0{sha256}\0{config}".encode("utf-8", "surrogateescape")).hexdigest()


def _row(entry: dict, action: str, config: str) -> dict:
    images = entry.get("images") or []
    labels, boxes = [], []
    for im in images:
        for d in im.get("detections", []):
            if d.get("flagged"):
                if d["label"] not in labels:
                    labels.append(d["label"])
                boxes.append({"frame": im.get("index", 0), "label": d["label"], "box": d.get("box"),
                              "score": d.get("score")})
    verdict = entry.get("verdict")
    taken = action if verdict in ("unsafe", "blocked") else ("none" if verdict == "safe" else None)
    path, sha = _text(entry["path"]), entry.get("sha256")
    return {"path": path, "sha256": sha, "cost": entry.get("cost"), "labels": labels,
            "boxes": json.dumps(boxes), "action": taken, "error": _text(entry["error"]) if entry.get("error") else None,
            "verdict": verdict, "output": _text(entry["output"]) if entry.get("output") else None,
            "images": json.dumps(images), "key": item_key(path, sha, config), "config": config}


def _text(s: str) -> str:
    return s.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


#: Fault-injection hook of the tests: the first Ray actor to take a batch while this names a file
#: that does not exist yet creates it and kills its own process (os._exit), mid-run.
ENV_DIE_ONCE = "SAFET2I_AUDIT_TEST_DIE_ONCE"


class Auditor:
    """Work items in, verdict rows out (a dict of columns each way: Ray Data's ``numpy``/dict
    batch format, and what the local mode feeds it). Holds one :class:`SafetyFilter` for its
    life: constructed once per Ray actor. An item whose ``done`` hash equals the hash of the
    bytes it reads now gives a row with ``verdict = "done"`` (the driver drops it)."""

    def __init__(self, cfg: dict, config: str, *, flt=None, arrow: bool = False):
        from .filter.files import FileFilter  # noqa: PLC0415

        self.cfg, self.config = cfg, config
        if arrow:           # a Ray actor: its own CPUs only
            from .raycluster import actor_cpu_threads  # noqa: PLC0415

            actor_cpu_threads()
        self.flt = flt if flt is not None else make_filter(cfg)   # one model load per auditor (actor)
        self.arrow = arrow
        self.out = Path(cfg["out"])
        self._FileFilter = FileFilter
        self.reader = _Reader()

    def __call__(self, batch: dict) -> dict:
        if self.arrow:
            from .raycluster import fault_injection  # noqa: PLC0415

            fault_injection(ENV_DIE_ONCE)
        # publish="new": no copy ever replaces a file, so no input can be overwritten either
        run = self._FileFilter(self.flt, self.out, batch_size=self.cfg.get("batch_size") or 16, publish="new")
        rows = []
        for vals in zip(*batch.values()):
            it = {k: (v.item() if hasattr(v, "item") and not isinstance(v, (bytes, str)) else v)
                  for k, v in zip(batch, vals)}
            for k in ("path", "rel", "src"):
                it[k] = _dec(it[k])
            try:
                data = self.reader.read(it)
            except (ImageInputError, OSError) as exc:
                rows.append(_row({"path": it["path"], "output": None, "verdict": "error", "cost": None,
                                  "error": str(exc)}, self.flt.action, self.config))
                continue
            if it.get("done") and hashlib.sha256(data).hexdigest() == it["done"]:
                rows.append({c: None for c in COLUMNS} | {"path": _text(it["path"]), "verdict": "done",
                                                          "labels": [], "key": "", "config": self.config})
                continue
            run.add(Path(it["path"]), Path(it["rel"]), data=data)
            del data
        run.drain()
        rows += [_row(e, self.flt.action, self.config) for e in run.files]
        cols = {c: [r[c] for r in rows] for c in COLUMNS}
        return _pyarrow().Table.from_pydict(cols, schema=Table.schema()) if self.arrow else cols


# --------------------------------------------------------------------------- the table


class Table:
    """The verdict table and its parts (see the module's docstring). Every pass over it reads
    record batches, so the driver's memory is a few dozen bytes per row, not the rows."""

    BATCH = 65536

    def __init__(self, path: Path):
        self.pa = _pyarrow()
        self.path = Path(os.path.abspath(path))
        self.parts = self.path.with_name(self.path.name + ".parts")
        self.buffer: list[dict] = []

    @staticmethod
    def schema():
        pa = _pyarrow()
        return pa.schema([("path", pa.string()), ("sha256", pa.string()), ("cost", pa.float64()),
                          ("labels", pa.list_(pa.string())), ("boxes", pa.string()), ("action", pa.string()),
                          ("error", pa.string()), ("verdict", pa.string()), ("output", pa.string()),
                          ("images", pa.string()), ("key", pa.string()), ("config", pa.string())])

    def sources(self) -> list[Path]:
        """The table, then its parts oldest first (their names start with the time they were written)."""
        out = [self.path] if self.path.exists() else []
        if self.parts.is_dir():
            out += sorted(self.parts.glob("part-*.parquet"))
        return out

    def batches(self, columns: list[str] | None = None):
        """Record batches of the table and its parts, in order (older rows first)."""
        for src in self.sources():
            try:
                pf = self.pa.parquet.ParquetFile(src)
                missing = [c for c in COLUMNS if c not in pf.schema_arrow.names]
                if missing:
                    raise SafeT2IError(f"{src}: not a safet2i audit table (no {', '.join(missing)} column)")
                for b in pf.iter_batches(batch_size=self.BATCH, columns=list(columns or COLUMNS)):
                    yield b
            except SafeT2IError:
                raise
            except Exception as exc:  # noqa: BLE001 - pyarrow's many error types: a clear fatal error
                raise SafeT2IError(f"{src}: the verdict table cannot be read ({exc}); move it away to start a "
                                   "new table") from exc

    def done_map(self, config: str) -> dict[bytes, str]:
        """``{digest of path: sha256}`` of the inputs audited without an error under ``config``."""
        done: dict[bytes, str] = {}
        for b in self.batches(["path", "sha256", "error", "config"]):
            for path, sha, err, cfg in zip(*(b.column(i).to_pylist() for i in range(4))):
                if err is None and cfg == config and sha:
                    done[_digest(path)] = sha
        return done

    def add(self, rows: list[dict]) -> None:
        self.buffer += [r for r in rows if r["verdict"] != "done"]
        if len(self.buffer) >= PART_ROWS:
            self.flush()

    def flush(self) -> None:
        if not self.buffer:
            return
        self.parts.mkdir(exist_ok=True)
        t = self.pa.Table.from_pylist(self.buffer, schema=self.schema())
        target = self.parts / f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet"
        atomic_write(target, lambda fh: self.pa.parquet.write_table(t, fh))
        self.buffer = []

    def merge(self, config: str, keep_entries: bool = False) -> tuple[dict, list[dict]]:
        """Table + parts -> one row per key (a row without an error wins, then the newest),
        written atomically in record batches; then the parts go. Returns this configuration's
        counts (``files``, ``images``, ``safe``, ``unsafe``, ``errors``) and, with ``keep_entries``,
        its rows as report entries."""
        import numpy as np  # noqa: PLC0415

        self.flush()
        chosen: dict[bytes, tuple[int, bool]] = {}
        n = 0
        for b in self.batches(["key", "error"]):
            for k, e in zip(b.column(0).to_pylist(), b.column(1).to_pylist()):
                kk = bytes.fromhex(k)[:16] if k else n.to_bytes(16, "big")
                prev = chosen.get(kk)
                if prev is None or e is None or not prev[1]:
                    chosen[kk] = (n, e is None)
                n += 1
        keep = np.zeros(n, dtype=bool)
        for i, _ in chosen.values():
            keep[i] = True
        del chosen
        counts = {"files": 0, "images": 0, "safe": 0, "unsafe": 0, "errors": 0}
        entries: list[dict] = []

        def write(fh):
            counts.update(dict.fromkeys(counts, 0))
            entries.clear()
            start = 0
            with self.pa.parquet.ParquetWriter(fh, self.schema()) as w:
                for b in self.batches():
                    sel = keep[start:start + b.num_rows]
                    start += b.num_rows
                    t = self.pa.Table.from_batches([b]).cast(self.schema()).filter(self.pa.array(sel))
                    if t.num_rows:
                        w.write_table(t)
                    mine = [r for r in t.select(["verdict", "error", "config", "images"]).to_pylist()
                            if r["config"] == config]
                    counts["files"] += len(mine)
                    counts["images"] += sum(len(json.loads(r["images"] or "[]")) for r in mine)
                    counts["safe"] += sum(r["verdict"] == "safe" for r in mine)
                    counts["unsafe"] += sum(r["verdict"] in ("unsafe", "blocked") for r in mine)
                    counts["errors"] += sum(bool(r["error"]) for r in mine)
                    if keep_entries:
                        idx = [i for i, c in enumerate(t.column("config").to_pylist()) if c == config]
                        entries.extend(_entries(t.take(self.pa.array(idx, type=self.pa.int64()))))

        atomic_write(self.path, write)
        if self.parts.is_dir():
            for p in self.parts.glob("part-*.parquet"):
                p.unlink()
            try:
                self.parts.rmdir()
            except OSError:
                pass
        return counts, entries


# --------------------------------------------------------------------------- the run


def _entries(table) -> list[dict]:
    out = []
    for r in table.to_pylist():
        e = {"path": r["path"], "output": r["output"], "verdict": r["verdict"], "cost": r["cost"],
             "error": r["error"], "sha256": r["sha256"]}
        if r["verdict"] != "error" or r["images"] not in (None, "[]"):
            e["images"] = json.loads(r["images"] or "[]")
        out.append(e)
    return out


def _thumbs(entries: list[dict], action: str) -> dict[str, str]:
    """Thumbnails of the written copies (never of an unsafe original: none under ``pass``)."""
    import numpy as np  # noqa: PLC0415
    from PIL import Image  # noqa: PLC0415

    from .filter.report import thumbnail_data_uri  # noqa: PLC0415

    out = {}
    for e in entries:
        if not e.get("output") or (e["verdict"] == "unsafe" and action == "pass"):
            continue
        try:
            with Image.open(e["output"]) as im:
                im.draft("RGB", (384, 384))
                out[e["path"]] = thumbnail_data_uri(np.asarray(im.convert("RGB")))
        except Exception:  # noqa: BLE001 - a missing thumbnail is shown as "not shown"
            pass
    return out


def _remove_stale_temp_files(out: Path) -> int:
    """Temp files (``.<name>.<random>.safet2i-tmp``) a killed worker left in ``out`` while
    publishing a copy. Called by the driver once every worker of this run has finished, so none
    is being written; the copy itself was either published (a hard link, then the temp is only a
    leftover) or is missing and its row has no output, and a re-run writes it. Returns the count."""
    from .fileio import TMP_SUFFIX  # noqa: PLC0415

    removed = 0
    if out.is_dir():
        for tmp in out.rglob("." + "*" + TMP_SUFFIX):
            if tmp.is_file() and not tmp.is_symlink():
                tmp.unlink(missing_ok=True)
                removed += 1
    return removed


@contextlib.contextmanager
def _lock(table_path: Path):
    """One audit writes a table at a time: ``TABLE.lock`` is held (``flock``, released by the OS
    when the process ends, a killed one too) for the run."""
    try:
        import fcntl  # noqa: PLC0415
    except ImportError:  # pragma: no cover - Windows: no lock
        yield
        return
    lock = table_path.with_name(table_path.name + ".lock")
    fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise SafeT2IError(f"--table {table_path}: another safet2i audit is writing this table now "
                               f"(it holds {lock}); wait for it, or use another --table") from None
        yield
    finally:
        os.close(fd)


def _identity(path: Path):
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _checked(items, reserved: dict[tuple, tuple[str, Path]]) -> Iterator[dict]:
    """Items, refusing (fatal) one that is a file this run writes (the table, a report). Only
    an input with the same file name as one of those, or any input when one of them has other
    hard links, is looked up (a ``stat``), so a resumed run does not stat every input."""
    names = {p.name for _, p in reserved.values()}
    linked = any(os.stat(p).st_nlink > 1 for _, p in reserved.values() if p.exists())
    for it in items:
        if reserved and it["kind"] == "file" and (linked or Path(it["src"]).name in names):
            ident = _identity(Path(it["src"]))
            if ident in reserved:
                what = reserved[ident][0]
                raise SafeT2IError(f"{what} {it['src']} is one of the inputs; choose another path")
        yield it


def run_audit(args, *, _stop_after: int | None = None) -> int:
    """``safet2i audit``. ``_stop_after``: a test hook that interrupts the local run (like a
    kill: rows not yet in a part are lost) after that many items."""
    from .filter.files import guard_destination  # noqa: PLC0415
    from .filter.report import build_report, write_html, write_json  # noqa: PLC0415

    _pyarrow()
    if getattr(args, "ray", None):        # fail fast, before anything is read or written
        from .raycluster import import_ray  # noqa: PLC0415

        import_ray("safet2i audit --ray", data=True)
    out_dir = Path(args.out)
    if out_dir.exists() and not out_dir.is_dir():
        raise SafeT2IError(f"--out {out_dir} exists and is not a folder")
    table_path = Path(os.path.abspath(args.table))
    if table_path.is_dir():
        raise SafeT2IError(f"--table {table_path} is a folder")
    if not table_path.parent.is_dir():
        raise SafeT2IError(f"--table {table_path}: the folder {table_path.parent} does not exist.")
    reports, reserved = {}, {}
    for opt in ("report", "html"):
        if getattr(args, opt, None):
            reports[opt] = guard_destination(Path(getattr(args, opt)), args.overwrite, set(), f"--{opt}")
    for what, p in [("--table", table_path)] + [(f"--{o}", p) for o, p in reports.items()]:
        ident = _identity(p)
        if ident is not None:
            reserved[ident] = (what, p)
    cfg = {k: getattr(args, k, None) for k in ("model", "policy", "threshold", "action", "expand", "shape",
                                                "feather", "strength", "colour", "providers", "batch_size")}
    cfg["out"] = os.path.realpath(out_dir)
    flt = make_filter(cfg)          # fails fast (missing model, bad policy) before any cluster starts
    description = flt.describe()
    config = config_id(description, cfg)

    with _lock(table_path):
        table = Table(table_path)
        skipped: list[dict] = []
        items = _checked(iter_items(args.inputs, [out_dir], skipped), reserved)
        chunks = list(plan_tables(items, table.done_map(config)))   # ~140 bytes an input (Arrow)
        total = sum(c.num_rows for c in chunks)
        out_dir.mkdir(parents=True, exist_ok=True)   # after the inputs' fatal errors
        try:
            from tqdm import tqdm  # noqa: PLC0415
            bar = tqdm(total=total, unit="img", disable=args.quiet or not sys.stderr.isatty(), desc="audit")
        except ImportError:  # pragma: no cover
            bar = None
        try:
            if getattr(args, "ray", None):
                del flt
                _run_ray(args, cfg, config, chunks, total, table, bar)
            else:
                auditor = Auditor(cfg, config, flt=flt)
                seen = 0
                for c in chunks:
                    for b in c.to_batches(max_chunksize=max(1, args.batch_size)):
                        batch = b.to_pydict()
                        if _stop_after is not None:
                            batch = {k: v[:max(0, _stop_after - seen)] for k, v in batch.items()}
                        n = len(batch["path"])
                        if n:
                            rows = auditor(batch)
                            table.add([dict(zip(rows, v)) for v in zip(*rows.values())])
                            if bar is not None:
                                bar.update(n)
                        seen += n
                        if _stop_after is not None and seen >= _stop_after:
                            raise KeyboardInterrupt("audit interrupted by the test hook")
        finally:
            if bar is not None:
                bar.close()
        del chunks
        _remove_stale_temp_files(out_dir)
        # The table keeps every audit of these files (another policy is another key); the summary
        # and the exit status are this configuration's.
        counts, entries = table.merge(config, keep_entries=bool(reports))

    status = 0
    if counts["unsafe"]:
        status |= EXIT_UNSAFE
    if counts["errors"]:
        status |= EXIT_BROKEN
    if reports:
        report = build_report(description, entries, skipped)
        for opt, p in reports.items():
            try:
                if opt == "report":
                    atomic_write(p, lambda fh: write_json(report, fh))
                else:
                    atomic_write(p, lambda fh: write_html(report, fh, _thumbs(entries, args.action)))
            except (OSError, ValueError) as exc:
                print(f"safet2i: error: cannot write the {opt} {p}: {getattr(exc, 'strerror', None) or exc}",
                      file=sys.stderr)
                status |= EXIT_REPORT
    if not args.quiet:
        print(f"safet2i: {counts['files']} files, {counts['safe']} safe, {counts['unsafe']} unsafe, "
              f"{counts['errors']} errors, {len(skipped)} skipped -> {out_dir}, table {table_path}", file=sys.stderr)
    return status


# --------------------------------------------------------------------------- Ray


def _run_ray(args, cfg: dict, config: str, chunks: list, total: int, table: Table, bar) -> None:
    from .raycluster import connected, default_workers, error_cause, quiet_ray_data  # noqa: PLC0415

    with connected("safet2i audit --ray", args.ray, args.workers, data=True) as ray:
        if not total:
            return
        workers, gpu = default_workers(ray, args.workers)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.verbose_stats_logs = False
        # Blocks of a few batches each, so every actor gets work; Ray Data streams them to the
        # actors with backpressure (bounded memory) and re-runs the batches of a lost actor.
        per = max(args.batch_size, min(4096, -(-total // max(1, workers * 8))))
        blocks = [c.slice(i, per) for c in chunks for i in range(0, c.num_rows, per)]
        ds = ray.data.from_arrow(blocks)
        ds = ds.map_batches(
            Auditor, fn_constructor_kwargs={"cfg": cfg, "config": config, "arrow": True},
            batch_size=args.batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=workers),
            num_cpus=1, num_gpus=1 if gpu else 0,
        )
        try:
            with quiet_ray_data():
                for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                    rows = batch.to_pylist()
                    table.add(rows)
                    if bar is not None:
                        bar.update(len(rows))
        except ray.exceptions.RayError as exc:
            table.flush()      # what came back is kept: a re-run resumes after it
            raise SafeT2IError(f"the Ray run failed: {error_cause(exc)} (is safet2i installed on every node? "
                               "run the same command again to resume)") from None
