"""Run by ``test_audit.py`` in its own process (bounded in time by the test): start a two-node
Ray cluster on 127.0.0.1 (``ray.cluster_utils.Cluster``: a head and a second node), run the
``safet2i audit`` command given as JSON on argv[1] with ``--ray <the cluster's address>``, and
once the first copy is written, SIGKILL a model-holding actor process from outside (one on the
second node if there is one, found through Ray's GCS actor table). Prints one JSON line with what
happened, then stops the cluster.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def _actors(ray) -> list[dict]:
    """Alive Ray Data map actors: {pid, node_id, name}."""
    from ray._private import state  # noqa: PLC0415  (the GCS actor table; no dashboard needed)

    out = []
    for a in state.actors().values():
        if a.get("State") == "ALIVE" and "MapWorker" in (a.get("ActorClassName") or "") and a.get("Pid"):
            out.append({"pid": int(a["Pid"]), "node_id": (a.get("Address") or {}).get("NodeID"),
                        "name": a["ActorClassName"]})
    return out


def main() -> int:
    spec = json.loads(sys.argv[1])
    deadline = time.monotonic() + float(spec["deadline_s"])
    out_dir, total = Path(spec["out"]), int(spec["total"])

    import ray  # noqa: PLC0415
    from ray.cluster_utils import Cluster  # noqa: PLC0415

    report: dict = {"killed": None}
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "node_ip_address": "127.0.0.1", "include_dashboard": False})
    proc = None
    try:
        second = cluster.add_node(num_cpus=2, node_ip_address="127.0.0.1")
        cluster.wait_for_nodes(timeout=60)
        ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        report["nodes"] = [n["NodeManagerAddress"] for n in nodes]
        report["address"] = cluster.address
        report["second_node"] = second.node_id
        with open(spec["stderr"], "w") as err:
            proc = subprocess.Popen([*spec["cmd"], "--ray", cluster.address], stdout=err, stderr=err,
                                    env=dict(os.environ, RAY_ADDRESS=""), cwd=spec["cwd"])
            while proc.poll() is None and time.monotonic() < deadline:
                copies = sum(1 for p in out_dir.rglob("*") if p.is_file()) if out_dir.is_dir() else 0
                if report["killed"] is None and copies >= 1:
                    actors = _actors(ray)
                    if actors:
                        on_second = [a for a in actors if a["node_id"] == second.node_id]
                        victim = (on_second or actors)[0]
                        os.kill(victim["pid"], signal.SIGKILL)
                        report["killed"] = victim | {"copies_before": copies, "total": total,
                                                     "on_second_node": bool(on_second),
                                                     "audit_running": proc.poll() is None,
                                                     "actors": len(actors)}
                time.sleep(0.05)
            try:
                report["returncode"] = proc.wait(max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                report["returncode"] = "timeout"
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
        ray.shutdown()
        cluster.shutdown()
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
