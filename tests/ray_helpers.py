"""Ray clusters for the tests, bound to loopback only, and the check that they are.

Ray binds the machine's own address unless told otherwise. Importing this module (before Ray is
imported) turns that off for the process and every process it starts (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0:
Ray then takes 127.0.0.1 as the node's address), and every cluster below also names 127.0.0.1.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

import numpy as np

from moe_router import Router

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

LOOPBACK = "127.0.0.1"


def start_local(num_cpus: int):
    """ray.init of a one-node cluster on loopback; the ray module."""
    import ray

    ray.init(num_cpus=num_cpus, _node_ip_address=LOOPBACK, include_dashboard=False, log_to_driver=False)
    return ray


def start_cluster(head_cpus: int, worker_cpus: list[int]):
    """A multi-node test cluster on this machine (ray.cluster_utils.Cluster), on loopback, joined by this process."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": head_cpus, "node_ip_address": LOOPBACK, "include_dashboard": False},
    )
    for cpus in worker_cpus:
        add_worker(cluster, cpus)
    ray.init(address=cluster.address, _node_ip_address=LOOPBACK, log_to_driver=False)
    return cluster


def add_worker(cluster, num_cpus: int = 1):
    """A worker node of `num_cpus` CPUs on loopback; its ray._private.node.Node."""
    return cluster.add_node(num_cpus=num_cpus, node_ip_address=LOOPBACK)


def same_hits(a, b) -> None:
    """Two batches of hits are equal: ids, experts and scores (to float32 rounding) in order."""
    assert len(a) == len(b)
    for ha, hb in zip(a, b):
        assert [(h.id, h.expert) for h in ha] == [(h.id, h.expert) for h in hb]
        np.testing.assert_allclose([h.score for h in ha], [h.score for h in hb], rtol=1e-6, atol=1e-6)


def merged_without(
    local: Router, xq: np.ndarray, k: int, top: np.ndarray, drop: np.ndarray
) -> list[list[tuple[int, str]]]:
    """Per query, the (id, expert) of the local merge over its chosen experts `top` (nq, t) but those `drop` marks."""
    res = local.search_experts(xq, k, top, merge=False)  # (nq, t * k): expert blocks in the order of top
    out = []
    for q in range(len(xq)):
        keep = np.repeat(~drop[q], k) & (res.I[q] >= 0)
        order = np.argsort(-res.D[q][keep], kind="stable")[:k]
        out.append([(int(i), local.experts[e].name) for i, e in zip(res.I[q][keep][order], res.E[q][keep][order])])
    return out


def _tree(root: int) -> set[int]:
    """`root` and every process below it."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # exited meanwhile
            continue
        pid, ppid = int(stat.parent.name), int(text[text.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(pid)
    out, todo = set(), [root]
    while todo:
        pid = todo.pop()
        out.add(pid)
        todo += children.get(pid, [])
    return out


def _address(hexed: str) -> tuple[str, int]:
    """A /proc/net/{tcp,udp}[6] address (host-order words in hex) as (ip, port)."""
    host, port = hexed.split(":")
    raw = bytes.fromhex(host)
    raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))  # each 32-bit word is little-endian
    ip = ipaddress.ip_address(raw)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip), int(port, 16)


def sockets(root: int) -> list[tuple[str, str, tuple[str, int], tuple[str, int]]]:
    """Every TCP and UDP socket of `root`'s process tree: (process name, kind, local, remote) address."""
    owner: dict[int, str] = {}
    for pid in _tree(root):
        try:
            name = Path(f"/proc/{pid}/comm").read_text().strip()
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                link = os.readlink(fd)
                if link.startswith("socket:["):
                    owner[int(link[8:-1])] = name
        except OSError:  # exited meanwhile
            continue
    out = []
    for kind in ("tcp", "tcp6", "udp", "udp6"):
        for line in Path(f"/proc/net/{kind}").read_text().splitlines()[1:]:
            fields = line.split()
            inode = int(fields[9])
            if inode in owner:
                out.append((owner[inode], kind, _address(fields[1]), _address(fields[2])))
    return out


def off_loopback(root: int) -> list[tuple[str, str, tuple[str, int], tuple[str, int]]]:
    """The sockets of `root`'s tree bound to, or talking to, anything but loopback (all addresses included)."""

    def loopback(ip: str, port: int, remote: bool) -> bool:
        if remote and port == 0 and ipaddress.ip_address(ip).is_unspecified:
            return True  # a listening or unconnected socket has no peer
        return ipaddress.ip_address(ip).is_loopback

    return [s for s in sockets(root) if not (loopback(*s[2], remote=False) and loopback(*s[3], remote=True))]
