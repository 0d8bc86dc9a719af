"""``safet2i audit`` (issue 20, first slice): local mode vs ``safet2i filter``, the odd files,
resumption after an interruption, file-list / Parquet / tar inputs, and the Ray path.

"Unsafe" is the ``face-only`` policy on benign pictures (the astronaut's face), as in
``test_cli.py``; no NSFW material is used.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from safet2i import audit as audit_mod
from safet2i.cli import build_parser

from filter_cli_kit import by_name, report, run, sha, tree
from test_cli import ODD

REPO = Path(__file__).resolve().parents[2]
try:
    import pyarrow as pa
    import pyarrow.parquet as pq
except ImportError:   # CI without the extra: the tests that read or write tables skip, the others run
    pa = pq = None
needs_pyarrow = pytest.mark.skipif(pa is None, reason="pyarrow is not installed: safet2i audit writes its table "
                                                      "with it (pip install 'safet2i[ray]')")


def rows(table) -> dict[str, dict]:
    """The verdict table -> {file name: row}; fails on a name seen twice."""
    out = {}
    for r in pq.read_table(table).to_pylist():
        name = Path(r["path"].split("#")[-1]).name
        assert name not in out, f"{name} twice in the table"
        out[name] = r
    return out


def comparable(r: dict) -> tuple:
    return (r["sha256"], r["cost"], tuple(r["labels"]), r["boxes"], r["action"], r["verdict"], r["images"],
            None if r["error"] is None else r["error"].split(": ", 1)[-1])


@pytest.fixture
def ctx(benign_set):
    return {"ast": benign_set["astronaut"], "cat": benign_set["chelsea"]}


@pytest.fixture
def mixed(tmp_path, ctx):
    """A folder with the astronaut, the cat and every odd file of the local CLI's tests."""
    src = tmp_path / "mixed"
    src.mkdir()
    for kind in ODD:
        ODD[kind][0](src, ctx)
    Image.fromarray(ctx["ast"]).save(src / "astronaut.png")
    Image.fromarray(ctx["cat"]).save(src / "chelsea.png")
    return src


@pytest.fixture
def six(tmp_path, benign_set):
    src = tmp_path / "six"
    src.mkdir()
    for name in ("astronaut", "camera", "grace_hopper", "coffee", "chelsea", "rocket"):
        Image.fromarray(benign_set[name]).save(src / f"{name}.png")
    return src


def audit_args(*argv):
    return build_parser().parse_args(["audit", *map(str, argv)])


# --------------------------------------------------------------------------- local mode


@needs_pyarrow
def test_mixed_folder_same_verdicts_and_copies_as_filter(tmp_path, mixed):
    before = tree(mixed)
    code_f = run("filter", mixed, "--out", tmp_path / "fout", "--policy", "face-only",
                 "--report", tmp_path / "f.json", "-q")
    code_a = run("audit", mixed, "--out", tmp_path / "aout", "--table", tmp_path / "v.parquet",
                 "--policy", "face-only", "--report", tmp_path / "a.json", "--html", tmp_path / "a.html", "-q")
    assert code_f == code_a == 3                       # unsafe and unreadable files: per-file, never fatal
    assert tree(mixed) == before
    assert tree(tmp_path / "aout") == tree(tmp_path / "fout")     # the same censored copies, byte for byte
    f, a = by_name(report(tmp_path / "f.json")), by_name(report(tmp_path / "a.json"))
    assert set(f) == set(a) == {p.name for p in mixed.iterdir()}
    for name in f:
        for k in ("verdict", "cost", "error", "sha256", "images"):
            assert a[name].get(k) == f[name].get(k), (name, k)
    assert report(tmp_path / "a.json")["summary"] == report(tmp_path / "f.json")["summary"]
    t = rows(tmp_path / "v.parquet")
    assert set(t) == set(f)
    assert t["astronaut.png"]["labels"] == ["FACE_FEMALE"] and t["astronaut.png"]["action"] == "blur"
    (box,) = json.loads(t["astronaut.png"]["boxes"])
    assert box["label"] == "FACE_FEMALE" and all(abs(v - e) <= 4 for v, e in zip(box["box"], (173, 82, 100, 97)))
    assert t["chelsea.png"]["verdict"] == "safe" and t["chelsea.png"]["action"] == "none"
    assert "not an image" in t["x.png"]["error"] and t["x.png"]["output"] is None
    assert t["anim.gif"]["labels"] == ["FACE_FEMALE"] and json.loads(t["anim.gif"]["boxes"])[0]["frame"] == 1
    for name, r in t.items():
        if r["sha256"] is not None:
            assert r["sha256"] == sha(mixed / name)
    html = (tmp_path / "a.html").read_text()
    assert html.count("data:image/") == sum(1 for r in t.values() if r["output"])


@needs_pyarrow
@pytest.mark.parametrize("censor", [["--action", "fill", "--colour", "#ff0000", "--expand", "0.2", "--shape", "ellipse"],
                                    ["--action", "pixelate", "--strength", "9", "--feather", "3"]])
def test_censoring_options_are_the_filters(tmp_path, six, censor):
    """audit takes filter's censoring options and writes the same copies; another option value is
    another configuration (checked again, not skipped as done)."""
    assert run("filter", six, "--out", tmp_path / "fout", "--policy", "face-only", *censor, "-q") == 1
    assert run("audit", six, "--out", tmp_path / "aout", "--table", tmp_path / "v.parquet", "--policy",
               "face-only", *censor, "-q") == 1
    assert tree(tmp_path / "aout") == tree(tmp_path / "fout")
    plain = tree(tmp_path / "aout")
    assert run("audit", six, "--out", tmp_path / "aout", "--table", tmp_path / "v.parquet", "--policy",
               "face-only", "-q") == 3             # default blur: the astronaut's copy differs -> refused
    assert tree(tmp_path / "aout") == plain and len(pq.read_table(tmp_path / "v.parquet")) == 12


@needs_pyarrow
def test_existing_file_in_out_is_never_replaced(tmp_path, six):
    out = tmp_path / "out"
    out.mkdir()
    (out / "camera.png").write_bytes(b"someone else's file")
    code = run("audit", six, "--out", out, "--table", tmp_path / "v.parquet", "-q")
    assert code == 2
    assert (out / "camera.png").read_bytes() == b"someone else's file"
    t = rows(tmp_path / "v.parquet")
    assert "never replaced" in t["camera.png"]["error"]
    assert sum(r["error"] is not None for r in t.values()) == 1


@needs_pyarrow
def test_interrupted_run_resumes_exactly_once(tmp_path, six, monkeypatch):
    clean_out, out, table = tmp_path / "clean", tmp_path / "out", tmp_path / "v.parquet"
    assert run("audit", six, "--out", clean_out, "--table", tmp_path / "clean.parquet", "--policy", "face-only",
               "--batch-size", "2", "-q") == 1
    monkeypatch.setattr(audit_mod, "PART_ROWS", 2)
    monkeypatch.setattr(audit_mod.Table, "BATCH", 2)     # the merge streams record batches of 2 rows
    args = audit_args(six, "--out", out, "--table", table, "--policy", "face-only", "--batch-size", "2", "-q")
    with pytest.raises(KeyboardInterrupt):
        audit_mod.run_audit(args, _stop_after=3)
    # a kill after 3 images: 2 rows reached a part, the 3rd image's copy exists but its row was lost
    assert not table.exists() and len(list(table.with_name("v.parquet.parts").iterdir())) == 1
    written = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.iterdir()}
    assert len(written) == 3

    from safet2i.filter.files import FileFilter
    checked = []
    real_add = FileFilter.add
    monkeypatch.setattr(FileFilter, "add", lambda self, path, rel, data=None: (checked.append(Path(path).name),
                                                                                 real_add(self, path, rel, data))[1])
    assert audit_mod.run_audit(audit_args(six, "--out", out, "--table", table, "--policy", "face-only",
                                          "--batch-size", "2", "-q")) == 1
    assert len(checked) == 4                               # the 2 recorded images are skipped, not re-checked
    assert not table.with_name("v.parquet.parts").exists()
    t = rows(table)                                         # every input exactly once
    assert set(t) == {p.name for p in six.iterdir()} and all(r["error"] is None for r in t.values())
    for name, ident in written.items():                    # nothing written before was replaced
        st = (out / name).stat()
        assert (st.st_ino, st.st_mtime_ns) == ident
    assert tree(out) == tree(clean_out)                    # and the copies are those of a clean run
    clean = rows(tmp_path / "clean.parquet")
    assert {n: comparable(r) for n, r in t.items()} == {n: comparable(r) for n, r in clean.items()}

    checked.clear()                                         # a third run has nothing left to check
    assert run("audit", six, "--out", out, "--table", table, "--policy", "face-only", "-q") == 1
    assert checked == [] and len(pq.read_table(table)) == 6
    # another policy is another audit of the same files: checked again; the astronaut is safe under
    # strict-5, so its copy would be the original, which differs from the blurred copy there: an error
    censored = {n for n, r in t.items() if r["verdict"] == "unsafe"}
    assert "astronaut.png" in censored and len(censored) < 6
    before = tree(out)
    assert run("audit", six, "--out", out, "--table", table, "--policy", "strict-5",
               "--report", tmp_path / "s.json", "-q") == 2
    assert len(checked) == 6 and len(pq.read_table(table)) == 12 and tree(out) == before
    s5 = by_name(report(tmp_path / "s.json"))
    assert len(s5) == 6 and all(f["verdict"] == "safe" for f in s5.values())
    assert {n for n, f in s5.items() if f["error"]} == censored
    assert all("never replaced" in s5[n]["error"] for n in censored)


@needs_pyarrow
def test_changed_file_is_audited_again_unchanged_is_skipped(tmp_path, six, monkeypatch):
    out, table = tmp_path / "out", tmp_path / "v.parquet"
    assert run("audit", six, "--out", out, "--table", table, "--policy", "face-only", "-q") == 1
    Image.fromarray(np.zeros((40, 48, 3), np.uint8)).save(six / "coffee.png")      # new content, same path
    from safet2i.filter.files import FileFilter
    checked = []
    real_add = FileFilter.add
    monkeypatch.setattr(FileFilter, "add", lambda self, path, rel, data=None: (checked.append(Path(path).name),
                                                                                 real_add(self, path, rel, data))[1])
    assert run("audit", six, "--out", out, "--table", table, "--policy", "face-only", "-q") == 3
    assert checked == ["coffee.png"]
    t = pq.read_table(table).to_pylist()
    coffee = [r for r in t if r["path"].endswith("coffee.png")]
    # both contents are in the table, each once; the new one's copy would replace the old copy: refused
    assert len(t) == 7 and len({r["sha256"] for r in coffee}) == 2
    new = [r for r in coffee if r["sha256"] == sha(six / "coffee.png")][0]
    assert "never replaced" in new["error"]


@needs_pyarrow
def test_one_writer_per_table_and_reserved_paths(tmp_path, six, capsys):
    import fcntl

    table = tmp_path / "v.parquet"
    fd = os.open(tmp_path / "v.parquet.lock", os.O_CREAT | os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)           # another audit holds the table
        assert run("audit", six, "--out", tmp_path / "o", "--table", table, "-q") == 4
        assert "another safet2i audit is writing this table" in capsys.readouterr().err
    finally:
        os.close(fd)
    assert not table.exists() and not (tmp_path / "o").exists()
    # a report path that is an input (an image of the folder, with --overwrite) is refused, nothing runs
    assert run("audit", six, "--out", tmp_path / "o", "--table", table, "--report", six / "camera.png",
               "--overwrite", "-q") == 4
    assert "is one of the inputs" in capsys.readouterr().err and not (tmp_path / "o").exists()
    # the table itself given as an input under another name (a hard link): refused, table unchanged
    assert run("audit", six / "camera.png", "--out", tmp_path / "o1", "--table", table, "-q") == 0
    before = table.read_bytes()
    os.link(table, tmp_path / "alias.png")
    assert run("audit", tmp_path / "alias.png", "--out", tmp_path / "o2", "--table", table, "-q") == 4
    assert "--table" in capsys.readouterr().err and table.read_bytes() == before
    # a Parquet file that is not an audit table is never merged into or replaced
    other = tmp_path / "other.parquet"
    pq.write_table(pa.table({"x": [1]}), other)
    assert run("audit", six, "--out", tmp_path / "o", "--table", other, "-q") == 4
    assert "not a safet2i audit table" in capsys.readouterr().err
    assert pq.read_table(other).to_pylist() == [{"x": 1}]


@needs_pyarrow
def test_file_list_parquet_and_tar_inputs(tmp_path, six):
    ref_out = tmp_path / "ref"
    assert run("audit", six, "--out", ref_out, "--table", tmp_path / "ref.parquet", "--policy", "face-only",
               "-q") == 1
    ref = {n: comparable(r) for n, r in rows(tmp_path / "ref.parquet").items()}
    names = sorted(p.name for p in six.iterdir())

    lst = tmp_path / "files.txt"
    lst.write_text("# one path a line\n" + "".join(f"six/{n}\n" for n in names) + "\n")
    paths_pq = tmp_path / "paths.parquet"
    pq.write_table(pa.table({"path": [str(six / n) for n in names]}), paths_pq)
    bytes_pq = tmp_path / "bytes.parquet"
    pq.write_table(pa.table({"path": names, "bytes": [(six / n).read_bytes() for n in names]}), bytes_pq,
                   row_group_size=4)                     # two row groups
    shard = tmp_path / "shard-000.tar"
    with tarfile.open(shard, "w") as tf:
        for n in names:
            tf.add(six / n, arcname=f"sub/{n}")
        info = tarfile.TarInfo("sub/readme.txt")
        info.size = 5
        tf.addfile(info, io.BytesIO(b"hello"))

    for src, sub in ((lst, ""), (paths_pq, ""), (bytes_pq, "bytes"), (shard, "shard-000/sub")):
        out, table = tmp_path / f"out-{src.stem}", tmp_path / f"{src.stem}-v.parquet"
        assert run("audit", src, "--out", out, "--table", table, "--policy", "face-only",
                   "--report", tmp_path / f"{src.stem}.json", "-q") == 1, src
        got = {n: comparable(r) for n, r in rows(table).items()}
        assert got == ref, src
        assert tree(out / sub if sub else out) == tree(ref_out), src
    rep = report(tmp_path / "shard-000.json")
    assert rep["skipped"] == [{"path": f"{shard}/sub/readme.txt", "reason": "not an image file extension"}]


@needs_pyarrow
def test_bad_parquet_input_is_a_clear_fatal_error(tmp_path, capsys):
    p = tmp_path / "t.parquet"
    pq.write_table(pa.table({"url": ["x"]}), p)
    assert run("audit", p, "--out", tmp_path / "o", "--table", tmp_path / "v.parquet", "-q") == 4
    assert "needs a 'path' and/or a 'bytes' column" in capsys.readouterr().err


@pytest.mark.parametrize("module", ["pyarrow", "pyarrow.parquet"])
def test_missing_pyarrow_names_the_install(tmp_path, six, monkeypatch, capsys, module):
    monkeypatch.setitem(sys.modules, module, None)     # import fails, as without the package
    assert run("audit", six, "--out", tmp_path / "o", "--table", tmp_path / "v.parquet", "-q") == 4
    err = capsys.readouterr().err
    assert "pip install pyarrow" in err and "safet2i[ray]" in err
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- Ray


def _ray_or_skip():
    try:
        import ray  # noqa: F401
        import ray.data  # noqa: F401
    except ImportError:
        pytest.skip("ray[data] is not installed (pip install 'safet2i[ray]')")


@needs_pyarrow
@pytest.mark.slow
def test_ray_local_cluster_gives_the_local_table(tmp_path, mixed):
    _ray_or_skip()
    assert run("audit", mixed, "--out", tmp_path / "lout", "--table", tmp_path / "l.parquet",
               "--policy", "face-only", "--batch-size", "3", "-q") == 3
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", RAY_USAGE_STATS_ENABLED="0")
    # A separate process (bounded in time) starts and stops its own cluster on 127.0.0.1.
    proc = subprocess.run(
        [sys.executable, "-m", "safet2i.cli", "audit", str(mixed), "--out", str(tmp_path / "rout"),
         "--table", str(tmp_path / "r.parquet"), "--policy", "face-only", "--batch-size", "3",
         "--ray", "auto", "--workers", "2", "--report", str(tmp_path / "r.json"), "-q"],
        env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert proc.returncode == 3, proc.stderr[-3000:]
    local, remote = rows(tmp_path / "l.parquet"), rows(tmp_path / "r.parquet")
    assert {n: comparable(r) for n, r in remote.items()} == {n: comparable(r) for n, r in local.items()}
    assert tree(tmp_path / "rout") == tree(tmp_path / "lout")
    assert report(tmp_path / "r.json")["summary"]["files"] == len(local)


@needs_pyarrow
@pytest.mark.slow
def test_ray_actor_killed_mid_run_is_retried(tmp_path, six):
    """An actor process dies (os._exit) on its first batch: Ray Data restarts it and retries the
    batch; the table and the copies equal a clean local run's, every input exactly once."""
    _ray_or_skip()
    assert run("audit", six, "--out", tmp_path / "lout", "--table", tmp_path / "l.parquet",
               "--policy", "face-only", "--batch-size", "2", "-q") == 1
    marker = tmp_path / "died"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", RAY_USAGE_STATS_ENABLED="0",
               SAFET2I_AUDIT_TEST_DIE_ONCE=str(marker))
    proc = subprocess.run(
        [sys.executable, "-m", "safet2i.cli", "audit", str(six), "--out", str(tmp_path / "rout"),
         "--table", str(tmp_path / "r.parquet"), "--policy", "face-only", "--batch-size", "2",
         "--ray", "auto", "--workers", "2", "-q"],
        env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert marker.exists(), "no actor was killed: the test proves nothing"
    assert proc.returncode == 1, proc.stderr[-3000:]
    local, remote = rows(tmp_path / "l.parquet"), rows(tmp_path / "r.parquet")
    assert len(pq.read_table(tmp_path / "r.parquet")) == 6
    assert {n: comparable(r) for n, r in remote.items()} == {n: comparable(r) for n, r in local.items()}
    assert tree(tmp_path / "rout") == tree(tmp_path / "lout")


@needs_pyarrow
@pytest.mark.parametrize("name", ["shard-000.tar.gz", "shard-000.tgz"])
def test_compressed_tar_shard_is_refused_clearly(tmp_path, six, name, capsys):
    shard = tmp_path / name
    with tarfile.open(shard, "w:gz") as tf:
        tf.add(six / "camera.png", arcname="camera.png")
    assert run("audit", shard, six, "--out", tmp_path / "o", "--table", tmp_path / "v.parquet", "-q") == 4
    err = capsys.readouterr().err
    assert "compressed tar shards are not supported" in err and "decompress" in err
    assert not (tmp_path / "o").exists() and not (tmp_path / "v.parquet").exists()   # nothing was run


def _listening(pids: set[int]) -> list[tuple[int, str, str]]:
    """(pid, process name, listening address) of every TCP socket in LISTEN of these processes."""
    psutil = pytest.importorskip("psutil", reason="psutil lists the Ray processes' sockets")
    out = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            for c in proc.net_connections(kind="tcp"):
                if c.status == psutil.CONN_LISTEN:
                    out.append((pid, proc.name(), c.laddr.ip))
        except psutil.Error:
            pass
    return out


@needs_pyarrow
@pytest.mark.slow
def test_ray_auto_listens_on_loopback_only(tmp_path, six):
    """``--ray auto``: every TCP socket the audit's Ray processes (driver, GCS, raylet, agents, the
    model-holding actors) listen on is on 127.0.0.1 (sampled during a real run)."""
    _ray_or_skip()
    import ipaddress
    psutil = pytest.importorskip("psutil", reason="psutil lists the Ray processes' sockets")
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", RAY_USAGE_STATS_ENABLED="0")
    proc = subprocess.Popen(
        [sys.executable, "-m", "safet2i.cli", "audit", str(six), "--out", str(tmp_path / "rout"),
         "--table", str(tmp_path / "r.parquet"), "--policy", "face-only", "--batch-size", "1",
         "--ray", "auto", "--workers", "1", "-q"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=tmp_path, start_new_session=True)
    seen: dict[tuple, str] = {}
    try:
        deadline = time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                pids = {proc.pid} | {c.pid for c in psutil.Process(proc.pid).children(recursive=True)}
            except psutil.Error:
                break
            for pid, name, ip in _listening(pids):
                seen[(pid, ip)] = name
            time.sleep(0.1)
        out = proc.communicate(timeout=max(1, deadline - time.monotonic()))[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait()
    assert proc.returncode == 1, out[-3000:]
    names = set(seen.values())
    # the test must have seen Ray's servers, or it proves nothing
    assert {"gcs_server", "raylet"} <= names and any(n.startswith("ray::") for n in names), seen
    wide = {k: v for k, v in seen.items() if not ipaddress.ip_address(k[1].removeprefix("::ffff:")).is_loopback}
    assert not wide, f"Ray listens beyond loopback: {wide}"


@needs_pyarrow
@pytest.mark.slow
def test_ray_multinode_cluster_actor_killed_from_outside(tmp_path, benign_set):
    """A two-node Ray cluster on 127.0.0.1 (``ray.cluster_utils.Cluster``), the audit pointed at it
    with ``--ray ADDRESS``; a model-holding actor on the second node is SIGKILLed from outside
    mid-run. The table has every input exactly once and equals a clean local run's; so do the copies."""
    _ray_or_skip()
    src = tmp_path / "src"
    src.mkdir()
    for name in ("astronaut", "camera", "grace_hopper", "coffee", "chelsea", "rocket"):
        for c in "abc":
            Image.fromarray(benign_set[name]).save(src / f"{c}_{name}.png")
    total = 18
    assert run("audit", src, "--out", tmp_path / "lout", "--table", tmp_path / "l.parquet",
               "--policy", "face-only", "-q") == 1
    spec = {"deadline_s": 150, "out": str(tmp_path / "rout"), "total": total, "stderr": str(tmp_path / "err.txt"),
            "cwd": str(tmp_path),
            "cmd": [sys.executable, "-m", "safet2i.cli", "audit", str(src), "--out", str(tmp_path / "rout"),
                    "--table", str(tmp_path / "r.parquet"), "--policy", "face-only", "--batch-size", "1",
                    "--workers", "2", "-q"]}
    # Ray keeps a node started on 127.0.0.1 there only when ENABLE_RAY_CLUSTER is off (see raycluster.ray_init)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", RAY_USAGE_STATS_ENABLED="0",
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    ctl = subprocess.Popen([sys.executable, str(Path(__file__).with_name("ray_cluster_kill.py")), json.dumps(spec)],
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                           start_new_session=True)
    try:
        out, err = ctl.communicate(timeout=200)
    except subprocess.TimeoutExpired:
        os.killpg(ctl.pid, 9)           # the controller, its cluster and the audit: one process group
        ctl.communicate()
        pytest.fail("the multi-node fault-injection run did not finish in 200 s")
    assert ctl.returncode == 0, err[-3000:]
    rep = json.loads(out.strip().splitlines()[-1])
    audit_err = (tmp_path / "err.txt").read_text()[-3000:]
    assert rep["nodes"] == ["127.0.0.1", "127.0.0.1"] and rep["address"].startswith("127.0.0.1:"), rep
    killed = rep["killed"]
    assert killed, f"no actor was killed: the test proves nothing ({rep}, {audit_err})"
    assert killed["audit_running"] and killed["copies_before"] < total, killed     # mid-run
    assert rep["returncode"] == 1, audit_err
    local, remote = rows(tmp_path / "l.parquet"), rows(tmp_path / "r.parquet")   # rows() fails on duplicates
    assert len(pq.read_table(tmp_path / "r.parquet")) == total == len(remote)
    assert {n: comparable(r) for n, r in remote.items()} == {n: comparable(r) for n, r in local.items()}
    assert tree(tmp_path / "rout") == tree(tmp_path / "lout")


@needs_pyarrow
def test_ray_missing_names_the_install_and_runs_nothing(tmp_path, six, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)      # import fails, as without the extra
    assert run("audit", six, "--out", tmp_path / "o", "--table", tmp_path / "v.parquet", "--ray", "auto",
               "-q") == 4
    err = capsys.readouterr().err
    assert "safet2i audit --ray" in err and "pip install 'safet2i[ray]'" in err
    assert not (tmp_path / "v.parquet").exists() and not (tmp_path / "o").exists()
