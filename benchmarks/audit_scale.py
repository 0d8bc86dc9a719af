"""``safet2i audit``: the Ray path's overhead and its scaling (issue 20). Prints; never asserts.

Every row is one ``safet2i audit`` command run as a subprocess on the same images (benign
pictures from scikit-image, JPEG, 512 px class, each file different), timed wall-clock from
start to exit, at two input counts ``N1 < N2``. From the two times of a mode:

* per-image cost = (T(N2) - T(N1)) / (N2 - N1): the steady state, without start-up;
* fixed cost = T(N1) - N1 * per-image cost: interpreter, model load, cluster start, actors.

Rows (the peer of each ratio is measured in the same run):

* ``local``: the embedded default (no ``--ray``), one onnxruntime thread;
* ``ray auto, 1 worker``: ``--ray auto --workers 1`` (the command starts and stops its own
  cluster on 127.0.0.1), the actor on one thread. Target (issue 20): per-image overhead
  against ``local`` <= 15 %;
* ``2-node cluster, 1 worker`` / ``2 workers``: a two-node Ray cluster on 127.0.0.1
  (``ray.cluster_utils.Cluster``, one CPU a node, started before the timed runs, as a user's
  cluster would be), ``--ray ADDRESS --workers 1|2``; the scaling ratio is
  per-image cost(1 worker) / per-image cost(2 workers);
* driver memory: bytes per input of the work list and of an earlier run's done hashes.

    python benchmarks/audit_scale.py [--n1 200] [--n2 2000] [--batch 16] [--repeats 1] [--providers cuda]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def make_images(folder: Path, n: int) -> list[Path]:
    import skimage.data as d
    from PIL import Image

    base = [d.astronaut(), d.coffee(), d.chelsea(), np.repeat(d.camera()[:, :, None], 3, 2), d.rocket()]
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        im = Image.fromarray(base[i % len(base)])
        w, h = im.size
        k = i // len(base)
        im = im.crop((k % 7, k % 5, w - (k % 11), h - (k % 3)))      # every file different
        if i % 2:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        p = folder / f"img-{i:05d}.jpg"
        im.convert("RGB").save(p, quality=90)
        out.append(p)
    return out


def timed(cmd: list[str], env: dict, work: Path, n: int) -> float:
    out = work / "out"
    for p in (out, work / "v.parquet", work / "v.parquet.parts"):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd + ["--out", str(out), "--table", str(work / "v.parquet"), "-q"], env=env,
                          capture_output=True, text=True, timeout=3600, cwd=work)
    dt = time.perf_counter() - t0
    import pyarrow.parquet as pq

    rows = pq.read_table(work / "v.parquet") if (work / "v.parquet").is_file() else None
    if proc.returncode not in (0, 1) or rows is None or rows.num_rows != n or \
            any(e is not None for e in rows.column("error").to_pylist()):
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}, "
                         f"{None if rows is None else rows.num_rows} rows for {n} images):\n{proc.stderr[-3000:]}")
    return dt


def driver_memory(n: int, work: Path) -> dict:
    """Bytes per input the driver holds for its work list (Arrow, plus the de-duplication digests,
    traced by tracemalloc) and for an earlier run's done hashes, on a file list of ``n`` paths of
    the shape ``/data/backlog/shard-00042/img-0004242.jpg`` (the files need not exist to plan)."""
    import tracemalloc

    import pyarrow as pa

    from safet2i import audit

    lst = work / "big.txt"
    lst.write_text("".join(f"/data/backlog/shard-{i // 10000:05d}/img-{i:07d}.jpg\n" for i in range(n)))
    tracemalloc.start()
    a0 = pa.total_allocated_bytes()
    chunks = list(audit.plan_tables(audit.iter_items([str(lst)]), {}))
    py = tracemalloc.get_traced_memory()[0]
    arrow = pa.total_allocated_bytes() - a0
    tracemalloc.stop()
    assert sum(c.num_rows for c in chunks) == n
    del chunks
    tracemalloc.start()      # what Table.done_map builds: {path digest: sha256 hex}
    done = {audit._digest(f"/data/backlog/shard-{i // 10000:05d}/img-{i:07d}.jpg"): "%064x" % i for i in range(n)}
    done_bytes = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    del done
    return {"arrow": arrow / n, "python": py / n, "done": done_bytes / n}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n1", type=int, default=200)
    ap.add_argument("--n2", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=1, help="runs of each command (median)")
    ap.add_argument("--skip-cluster", action="store_true", help="no 2-node rows")
    ap.add_argument("--providers", default=None, help="onnxruntime providers for every audit (e.g. cuda)")
    ap.add_argument("--plan-items", type=int, default=200_000, help="file-list size of the driver-memory row")
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="safet2i-audit-bench-"))
    try:
        mem = driver_memory(args.plan_items, work)
        files = make_images(work / "images", args.n2)
        lists = {}
        for n in (args.n1, args.n2):
            lists[n] = work / f"list-{n}.txt"
            lists[n].write_text("".join(f"{p}\n" for p in files[:n]))
        env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", SAFET2I_ORT_THREADS="1",
                   RAY_USAGE_STATS_ENABLED="0", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
        base = [sys.executable, "-m", "safet2i.cli", "audit", "--batch-size", str(args.batch)]
        if args.providers:
            base += ["--providers", args.providers]

        def measure(extra: list[str]) -> dict:
            t = {n: statistics.median(timed(base[:4] + [str(lists[n])] + base[4:] + extra, env, work, n)
                                      for _ in range(args.repeats)) for n in (args.n1, args.n2)}
            per = (t[args.n2] - t[args.n1]) / (args.n2 - args.n1)
            return {"t1": t[args.n1], "t2": t[args.n2], "per": per, "fixed": t[args.n1] - args.n1 * per}

        rows = {"local": measure([]), "ray auto, 1 worker": measure(["--ray", "auto", "--workers", "1"])}
        if not args.skip_cluster:
            import ray
            from ray.cluster_utils import Cluster

            os.environ.update(env)        # the cluster's processes import this checkout's safet2i
            cluster = Cluster(initialize_head=True, head_node_args={
                "num_cpus": 1, "node_ip_address": "127.0.0.1", "include_dashboard": False})
            try:
                cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
                cluster.wait_for_nodes(timeout=60)
                for w in (1, 2):
                    rows[f"2-node cluster, {w} worker{'s' if w > 1 else ''}"] = measure(
                        ["--ray", cluster.address, "--workers", str(w)])
            finally:
                ray.shutdown()
                cluster.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"safet2i audit, {args.n1} and {args.n2} JPEG images, batch {args.batch}, one thread per worker, "
          f"{os.cpu_count()} CPUs on this machine")
    print()
    print(f"| mode | T({args.n1}) s | T({args.n2}) s | per image ms | images/s | fixed s |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['t1']:.1f} | {r['t2']:.1f} | {r['per'] * 1e3:.1f} | {1 / r['per']:.1f} | "
              f"{r['fixed']:.1f} |")
    print()
    loc, r1 = rows["local"], rows["ray auto, 1 worker"]
    print(f"Ray path overhead per image (ray auto 1 worker vs local): {100 * (r1['per'] / loc['per'] - 1):+.1f} % "
          f"(target <= 15 %); end to end at {args.n2}: {100 * (r1['t2'] / loc['t2'] - 1):+.1f} %")
    if "2-node cluster, 2 workers" in rows:
        c1, c2 = rows["2-node cluster, 1 worker"], rows["2-node cluster, 2 workers"]
        print(f"Scaling 1 -> 2 workers on the 2-node cluster: {c1['per'] / c2['per']:.2f}x per image "
              f"(2.00x is linear); end to end at {args.n2}: {c1['t2'] / c2['t2']:.2f}x")
    print(f"Driver memory per input ({args.plan_items:,} listed paths): work list {mem['arrow']:.0f} B Arrow + "
          f"{mem['python']:.0f} B Python (de-duplication digests); an earlier run's done hashes "
          f"{mem['done']:.0f} B")
    per = loc["per"]
    print(f"Paper calculation (not a measurement): 100 million images at the local per-image cost "
          f"({per * 1e3:.1f} ms on one CPU thread) = {1e8 * per / 3600:,.0f} CPU-thread-hours")
    return 0


if __name__ == "__main__":
    sys.exit(main())
