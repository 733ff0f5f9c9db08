"""Peer copy against raw TCP on the same veth, same run: is the copy at link speed?

    sudo python bench/peer_copy.py                       # 1 GB model, receiver on tmpfs and on disk
    sudo python bench/peer_copy.py --fs tmpfs --profile /tmp/prof   # py-spy on both daemons

Two hippods in two network namespaces joined by a veth (bench/netns.py); the second pulls a
random-weight model (several safetensors shards, so several blobs and ranges of each) from the
first. Against, over the same veth and in the same run:
  raw TCP -> /dev/null   one connection, sendfile -> recv, nothing kept: the link itself
  raw TCP -> target fs   the same, each buffer written to a file beside the receiver's blobs
  sha256, one core       hashlib over the largest blob in memory: what verifying costs alone
The receiving home (HIPPO_HOME) is put on a tmpfs (so the link, not a slow disk, is the limit;
a Mac's SSD writes 3-7 GB/s) and on the disk this script runs from; the sender's home is always
on the tmpfs. Ratios are the pull's MB/s over each raw row.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import resource
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.daemon import Daemon  # noqa: E402
from bench.netns import in_netns, lan, raw_tcp as netns_raw_tcp  # noqa: E402

TMPFS = Path("/dev/shm")
BUF = 4 << 20


def make_model(dst: Path, total: int, shards: int) -> Path:
    """A llama-shaped directory whose weights are `shards` safetensors files of random bytes."""
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 1024, "num_hidden_layers": shards,
        "intermediate_size": 4096, "num_attention_heads": 16, "num_key_value_heads": 16,
        "vocab_size": 49152, "rms_norm_eps": 1e-5, "max_position_embeddings": 8192}))
    per = total // shards // 2 * 2
    for i in range(shards):
        name = f"model.layers.{i}.mlp.up_proj.weight"
        header = json.dumps({name: {"dtype": "F16", "shape": [per // 2], "data_offsets": [0, per]}}).encode()
        header += b" " * (-len(header) % 8)
        with open(dst / f"model-{i + 1:05d}-of-{shards:05d}.safetensors", "wb") as f:
            f.write(len(header).to_bytes(8, "little") + header)
            for _ in range(per // BUF):
                f.write(os.urandom(BUF))
            f.write(os.urandom(per % BUF))
    return dst


def raw_tcp(sender_ns: str, address: str, receiver_ns: str, path: Path, sink: Path | None
            ) -> tuple[float, float]:
    """(MB/s, CPU seconds per GB of sender and receiver together) of one TCP connection sending
    `path`, the bytes dropped or written to `sink`. Both ends are threads of this process."""
    c0 = own_cpu()
    n, seconds = netns_raw_tcp(sender_ns, address, receiver_ns, path, sink)
    return n / seconds / 1e6, (own_cpu() - c0) / (n / 1e9)


def own_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def proc_cpu(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def warm(mb: int) -> None:
    """Touch and free `mb` MB of memory: the pages a transfer is about to fill start out backed.

    A VM with free page reporting (this one: virtio-balloon, page_reporting) hands memory freed for
    a couple of seconds back to its host, and the next write into such a page faults in the host:
    filling new page-cache pages then runs at 300-500 MB/s whatever the filesystem, and a row's
    speed depends on how long ago memory was freed. A Mac's memory is simply there; so every
    measured transfer here starts right after this, the raw rows as much as the pulls."""
    if mb:
        b = bytearray(mb << 20)  # zero-filled: every page touched
        del b


def sha256_rate(path: Path) -> float:
    """One core's sha256 over the blob (from the page cache): a verified copy's ceiling."""
    data = path.read_bytes()
    t0 = time.perf_counter()
    hashlib.sha256(data).hexdigest()
    return len(data) / (time.perf_counter() - t0) / 1e6


def profile(pid: int, out: Path, seconds: float) -> subprocess.Popen | None:
    """py-spy recording `pid` (all threads, native frames off) for `seconds`, if py-spy is here."""
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(exe).exists():
        print("py-spy not installed: no profile", file=sys.stderr)
        return None
    return subprocess.Popen([exe, "record", "-p", str(pid), "-r", "250", "-d", str(int(seconds) + 1),
                             "--nonblocking", "--threads", "-f", "raw", "-o", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def one_fs(label: str, recv_root: Path, model_dir: Path, work: Path, repeat: int,
           prof: Path | None, warm_mb: int) -> dict:
    """Two daemons, the receiver's home under `recv_root`; the raw rows and `repeat` pulls."""
    secret = secrets.token_hex(16)
    res: dict = {"fs": label, "warm_MB": warm_mb, "raw_null": [], "raw_file": [], "pull": [], "copy": [],
                 "cpu": {"raw_null": [], "raw_file": [], "pull": []}}
    with lan(2, subnet="10.79.0") as net:
        homes = {"alpha": work / "alpha", "beta": recv_root / f"hippo-peer-beta-{os.getpid()}"}
        daemons = []
        try:
            for name, node in zip(("alpha", "beta"), net.nodes):
                d = Daemon(homes[name], host=node.address, netns=node.ns, args=["--insecure"],
                           env={"HIPPO_DISCOVERY": "true", "HIPPO_NODE_NAME": name,
                                "HIPPO_CLUSTER_SECRET": secret})
                daemons.append((d.start(timeout=60), node))
            (a, na), (b, nb) = daemons
            status, body = in_netns(na.ns, a.request, "POST", "/api/create",
                                    {"model": "bench", "from": str(model_dir), "stream": False}, 600)
            if status != 200:
                raise RuntimeError(f"create failed: {body}")
            deadline = time.monotonic() + 60
            while not any(n.get("trusted") and not n.get("stale") and "bench:latest" in n.get("models", [])
                          for n in in_netns(nb.ns, b.request, "GET", "/api/hippo/nodes")[1].get("nodes", [])):
                if time.monotonic() > deadline:
                    raise RuntimeError("the peers did not find each other")
                time.sleep(0.2)
            blobs = sorted((a.home / "blobs").glob("sha256-*"), key=lambda p: p.stat().st_size)
            total = sum(p.stat().st_size for p in blobs)
            res["bytes"], res["blobs"] = total, len(blobs)
            sink = b.home / "blobs" / ".bench-raw"
            for i in range(repeat):
                for row, to in (("raw_null", None), ("raw_file", sink)):
                    warm(warm_mb)
                    rate, cpu = raw_tcp(na.ns, na.address, nb.ns, blobs[-1], to)
                    res[row].append(rate)
                    res["cpu"][row].append(cpu)
                spies = []
                if prof and i == repeat - 1:
                    guess = max(2.0, total / 150e6)
                    spies = [profile(d.proc.pid, prof / f"{label}-{n}.txt", guess)
                             for d, n in ((a, "sender"), (b, "receiver"))]
                warm(warm_mb)
                c0 = proc_cpu(a.proc.pid) + proc_cpu(b.proc.pid)
                t0 = time.perf_counter()
                status, body = in_netns(nb.ns, b.request, "POST", "/api/hippo/pull",
                                        {"model": "bench", "from": "alpha", "stream": False}, 600)
                seconds = time.perf_counter() - t0
                res["cpu"]["pull"].append((proc_cpu(a.proc.pid) + proc_cpu(b.proc.pid) - c0) / (total / 1e9))
                if status != 200:
                    raise RuntimeError(f"peer pull failed: {body}")
                for s in spies:
                    if s:
                        s.wait(120)
                res["pull"].append(total / seconds / 1e6)
                said = re.findall(r"copied bench:latest from peer alpha: (\d+) bytes in ([\d.]+)s", b.log())
                if said:
                    res["copy"].append(int(said[-1][0]) / max(float(said[-1][1]), 1e-9) / 1e6)
                status, body = in_netns(nb.ns, b.request, "DELETE", "/api/delete", {"model": "bench"})
                if status != 200:
                    raise RuntimeError(f"delete failed: {body}")
            res["sha256"] = sha256_rate(blobs[-1])
        finally:
            for d, _ in daemons:
                d.stop()
            shutil.rmtree(homes["beta"], ignore_errors=True)
    return res


def print_table(results: list[dict]) -> None:
    def cell(xs: list[float], digits: int = 0) -> str:
        if not xs:
            return "-"
        fmt = lambda x: f"{x:.{digits}f}"  # noqa: E731
        return fmt(statistics.median(xs)) + (f" ({fmt(min(xs))}-{fmt(max(xs))})" if len(xs) > 1 else "")

    print(f"\npeer copy vs raw TCP, one veth, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}, "
          f"{results[0]['warm_MB']} MB warmed before each transfer (median (min-max); ratio: the "
          "pull's MB/s over the row's; CPU s/GB: both ends, user+system, whatever else the box runs)")
    lines = [("receiver fs", "row", "MB/s", "pull vs row", "CPU s/GB")]
    for r in results:
        pull = statistics.median(r["pull"])
        mb = r["bytes"] / 1e6
        cpu = r.get("cpu", {})
        rows = [(f"pull ({r['blobs']} blobs, {mb:.0f} MB)", r["pull"], cpu.get("pull")),
                ("copy alone (daemon's log)", r["copy"], None),
                ("raw TCP -> /dev/null", r["raw_null"], cpu.get("raw_null")),
                ("raw TCP -> target fs", r["raw_file"], cpu.get("raw_file")),
                ("sha256, one core", [r["sha256"]], [1e3 / r["sha256"]])]
        for row, xs, c in rows:
            ratio = f"{pull / statistics.median(xs):.2f}" if xs and not row.startswith("pull") else "-"
            lines.append((r["fs"], row, cell(xs), ratio, cell(c or [], 2)))
    widths = [max(len(x[i]) for x in lines) for i in range(len(lines[0]))]
    for j, line in enumerate(lines):
        print("| " + " | ".join(v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(line, widths))) + " |")
        if j == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=1024, help="model size in MB (default 1024)")
    ap.add_argument("--shards", type=int, default=3, help="safetensors files (blobs) it is cut into")
    ap.add_argument("--fs", choices=["tmpfs", "disk", "both"], default="both",
                    help="where the receiver's home lives")
    ap.add_argument("--repeat", type=int, default=3, help="pulls (and raw rows) per filesystem")
    ap.add_argument("--disk-dir", type=Path, default=Path(tempfile.gettempdir()),
                    help="a directory on the disk (default: the temp dir)")
    ap.add_argument("--warm", type=int, help="MB of memory touched and freed before each transfer "
                    "(default: twice the model; 0: none, to see a VM's cold-page cost)")
    ap.add_argument("--profile", type=Path, help="py-spy both daemons during the last pull, into here")
    ap.add_argument("--json", type=Path, help="write the raw results here")
    args = ap.parse_args()
    if os.geteuid() != 0 or shutil.which("ip") is None:
        print("needs root and iproute2 (network namespaces)", file=sys.stderr)
        return 2
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="hippo-peer-copy-", dir=TMPFS))
    results = []
    try:
        model_dir = make_model(work / "model", args.mb << 20, args.shards)
        fss = {"tmpfs": TMPFS, "disk": args.disk_dir}
        for label in (["tmpfs", "disk"] if args.fs == "both" else [args.fs]):
            print(f"[{label}] ...", flush=True)
            results.append(one_fs(label, fss[label], model_dir, work, args.repeat, args.profile,
                                  2 * args.mb if args.warm is None else args.warm))
            print(json.dumps(results[-1]), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    print_table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
