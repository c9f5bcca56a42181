#!/usr/bin/env python3
"""Drive one `ferry serve` with concurrent clients; the helper of load.sh.

    benches/load.py --ferry BIN --work DIR --shared DIR --server-pid PID
                    --metrics URL [--clients 32] [--duration 60]
                    [--distinct-mb 8] [--reset 0.1] [--mix k=w,...]

The server is reached through FERRY_REMOTE, FERRY_TOKEN_FILE and
FERRY_SERVER_CERT (set by load.sh). Each client is a thread running `ferry`
commands one after another, each with its own local store (its node's
cache) under WORK/clients/cN, until the duration is over (a command running
then finishes and counts). Operations, picked at random by weight:

  stash_shared      ferry stash main/shared/vK IMAGE   (the shared images:
                    benches/make_image.py's v1, v2, v3; every client stashes
                    the same bytes under the same names)
  stash_distinct    ferry stash load/cN/M IMAGE        (a new image of fresh
                    content, made before the clock starts: all new chunks)
  unstash_shared    ferry unstash main/shared/vK OUT   (SHA-256 of OUT checked)
  unstash_distinct  ferry unstash load/cJ/M OUT        (another client's
                    image; SHA-256 checked against what that client stashed)

all with --remote (from the environment). Before an operation a client
wipes its store with probability --reset (a fresh CI node with a cold
cache; not timed). The shared images are pushed once before the clock
starts.

Prints operations per second and p50/p99 latency per kind and overall,
errors, the bytes the server moved (its Prometheus counters, during the
run), and the server's peak RSS (VmHWM). Writes WORK/load-results.json.
Exits 1 if any operation failed or returned wrong bytes.
"""

import argparse
import hashlib
import io
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import make_image  # noqa: E402  (write_image: the docker-save layout)

KINDS = ["stash_shared", "stash_distinct", "unstash_shared", "unstash_distinct"]
MTIME = 1_730_000_000


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(1 << 20)
            if not b:
                return h.hexdigest()
            h.update(b)


def make_distinct(path, seed, size):
    """A docker-save archive of one layer of fresh content (`size` bytes:
    random blocks and compressible text, seeded); returns its SHA-256."""
    rng = random.Random(seed)
    layer = path + ".layer"
    w = make_image.CountingHashWriter(open(layer, "wb"))
    with tarfile.open(fileobj=w, mode="w", format=tarfile.PAX_FORMAT) as t:
        left, i = size, 0
        while left > 0:
            n = min(left, rng.randint(64 << 10, 2 << 20))
            if rng.random() < 0.5:
                data = rng.randbytes(n)
            else:
                words = [rng.randbytes(4).hex() for _ in range(64)]
                text = " ".join(rng.choice(words) for _ in range(n // 8 + 1))
                data = text.encode()[:n]
            ti = tarfile.TarInfo(f"opt/load/{seed}/f{i}")
            ti.size, ti.mode, ti.mtime = len(data), 0o644, MTIME
            t.addfile(ti, fileobj=io.BytesIO(data))
            left -= n
            i += 1
    w.f.close()
    img = make_image.write_image(path, seed.replace("/", "-"),
                                 [("distinct", layer, "sha256:" + w.h.hexdigest())],
                                 MTIME)
    os.remove(layer)
    return img["sha256"]


def json_docs(text):
    out, dec, i = [], json.JSONDecoder(), 0
    while True:
        while i < len(text) and text[i].isspace():
            i += 1
        if i >= len(text):
            return out
        try:
            doc, i = dec.raw_decode(text, i)
        except ValueError:
            return out
        out.append(doc)


def scrape(url):
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    vals = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*(\{[^}]*\})?) (\S+)$", line)
        if m:
            vals[m.group(1)] = float(m.group(3))
    return vals


def proc_status(pid):
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmHWM", "VmRSS"):
                out[k] = int(v.split()[0]) * 1024
    return out


def pct(xs, p):
    """Nearest-rank percentile of a sorted list."""
    if not xs:
        return float("nan")
    k = max(0, min(len(xs) - 1, int(round(p / 100 * len(xs) + 0.5)) - 1))
    return xs[k]


class Shared:
    def __init__(self):
        self.lock = threading.Lock()
        self.results = []  # (kind, seconds, ok, client)
        self.errors = []  # (kind, client, detail)
        self.published = {}  # name -> (sha256, client)
        self.resets = 0
        self.wire = 0

    def record(self, kind, secs, ok, client, detail=None, wire=0):
        with self.lock:
            self.results.append((kind, secs, ok, client))
            self.wire += wire
            if not ok:
                self.errors.append((kind, client, detail))


def run_ferry(ferry, store, args):
    cmd = [ferry, "--json", "-q", "--store", store] + args
    t = time.monotonic()
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    secs = time.monotonic() - t
    return p, secs


def wire_bytes(stdout):
    n = 0
    for d in json_docs(stdout.decode(errors="replace")):
        # push and pull reports: "stats"; a streaming remote unstash: "transfer"
        st = (d.get("stats") or d.get("transfer")) if isinstance(d, dict) else None
        if isinstance(st, dict):
            n += st.get("wire_bytes_sent", 0) + st.get("wire_bytes_received", 0)
    return n


def client(i, a, shared_imgs, sh, deadline, weights):
    rng = random.Random(1000 + i)
    base = os.path.join(a.work, "clients", f"c{i}")
    store = os.path.join(base, "store")
    tmp = os.path.join(base, "tmp")
    os.makedirs(tmp, exist_ok=True)
    seq = 0
    while time.monotonic() < deadline:
        kind = rng.choices(KINDS, weights=[weights[k] for k in KINDS])[0]
        if rng.random() < a.reset:
            shutil.rmtree(store, ignore_errors=True)
            with sh.lock:
                sh.resets += 1
        seq += 1
        out = os.path.join(tmp, f"out-{seq}.tar")
        if kind == "unstash_distinct":
            with sh.lock:
                others = [(n, v) for n, v in sh.published.items() if v[1] != i]
            if not others:
                kind = "unstash_shared"
        if kind == "stash_shared":
            tag = rng.choice(sorted(shared_imgs))
            p, secs = run_ferry(a.ferry, store, ["stash", f"main/shared/{tag}",
                                                 shared_imgs[tag]["path"]])
            ok = p.returncode == 0
            sh.record(kind, secs, ok, i, p.stderr.decode(errors="replace")[-500:],
                      wire_bytes(p.stdout) if ok else 0)
        elif kind == "stash_distinct":
            name = f"load/c{i}/n{seq}"
            img = os.path.join(tmp, f"img-{seq}.tar")
            digest = make_distinct(img, name, a.distinct_mb << 20)
            p, secs = run_ferry(a.ferry, store, ["stash", name, img])
            os.remove(img)
            ok = p.returncode == 0
            sh.record(kind, secs, ok, i, p.stderr.decode(errors="replace")[-500:],
                      wire_bytes(p.stdout) if ok else 0)
            if ok:
                with sh.lock:
                    sh.published[name] = (digest, i)
        else:
            if kind == "unstash_shared":
                tag = rng.choice(sorted(shared_imgs))
                name, want = f"main/shared/{tag}", shared_imgs[tag]["sha256"]
            else:
                name, (want, _) = rng.choice(sorted(others))
            p, secs = run_ferry(a.ferry, store, ["unstash", name, out])
            ok, detail = p.returncode == 0, p.stderr.decode(errors="replace")[-500:]
            if ok:
                got = sha256_file(out)
                if got != want:
                    ok, detail = False, f"{name}: sha256 {got}, expected {want}"
            try:
                os.remove(out)
            except FileNotFoundError:
                pass
            sh.record(kind, secs, ok, i, detail, wire_bytes(p.stdout) if ok else 0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ferry", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--shared", required=True, help="make_image.py's output dir")
    ap.add_argument("--server-pid", type=int, required=True)
    ap.add_argument("--metrics", required=True)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--duration", type=float, default=60)
    ap.add_argument("--distinct-mb", type=int, default=8)
    ap.add_argument("--reset", type=float, default=0.1)
    ap.add_argument("--mix", default="stash_shared=1,stash_distinct=1,"
                                      "unstash_shared=1,unstash_distinct=1")
    a = ap.parse_args()
    weights = {k: 0.0 for k in KINDS}
    for part in a.mix.split(","):
        k, _, v = part.partition("=")
        if k not in weights:
            sys.exit(f"load.py: unknown operation {k!r} in --mix (one of {KINDS})")
        weights[k] = float(v)

    info = json.load(open(os.path.join(a.shared, "images.json")))
    shared_imgs = {t: {"path": img["path"], "sha256": img["sha256"],
                       "size": img["size"]} for t, img in info["images"].items()}

    # The shared images on the server before the clock starts.
    seeder = os.path.join(a.work, "clients", "seeder")
    for tag, img in sorted(shared_imgs.items()):
        p, secs = run_ferry(a.ferry, seeder, ["stash", f"main/shared/{tag}", img["path"]])
        if p.returncode != 0:
            sys.exit(f"load.py: seeding main/shared/{tag} failed:\n{p.stderr.decode()}")
    shutil.rmtree(seeder)

    m0 = scrape(a.metrics)
    sh = Shared()
    start = time.monotonic()
    deadline = start + a.duration
    threads = [threading.Thread(target=client,
                                args=(i, a, shared_imgs, sh, deadline, weights))
               for i in range(a.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start
    m1 = scrape(a.metrics)
    mem = proc_status(a.server_pid)

    delta = lambda k: m1.get(k, 0) - m0.get(k, 0)
    rows = []
    for kind in KINDS + ["all"]:
        rs = [r for r in sh.results if kind == "all" or r[0] == kind]
        lat = sorted(r[1] for r in rs if r[2])
        rows.append({
            "op": kind, "count": len(rs), "ops_per_s": len(rs) / elapsed,
            "p50_s": pct(lat, 50), "p99_s": pct(lat, 99),
            "errors": sum(1 for r in rs if not r[2]),
        })
    server_errors = {k[len('ferry_errors_total{kind="'):-2]: delta(k)
                     for k in m1 if k.startswith("ferry_errors_total{") and delta(k)}
    res = {
        "clients": a.clients, "duration_s": a.duration, "elapsed_s": elapsed,
        "distinct_mb": a.distinct_mb, "reset": a.reset, "mix": weights,
        "shared_images": {t: v["size"] for t, v in shared_imgs.items()},
        "ops": rows,
        "errors": len(sh.errors),
        "error_samples": sh.errors[:10],
        "node_resets": sh.resets,
        "server": {
            "bytes_received": delta("ferry_bytes_received_total"),
            "bytes_sent": delta("ferry_bytes_sent_total"),
            "chunks_received": delta("ferry_chunks_received_total"),
            "chunks_stored": delta("ferry_chunks_stored_total"),
            "chunks_sent": delta("ferry_chunks_sent_total"),
            "dedup_hits": delta("ferry_dedup_hits_total"),
            "commits": delta("ferry_commits_total"),
            "connections": delta("ferry_connections_total"),
            "errors_by_kind": server_errors,
            "peak_rss_bytes": mem.get("VmHWM"),
            "rss_bytes_at_end": mem.get("VmRSS"),
        },
        "client_wire_bytes": sh.wire,
        "loadavg_end": open("/proc/loadavg").read().split()[:3],
    }
    with open(os.path.join(a.work, "load-results.json"), "w") as f:
        json.dump(res, f, indent=1)

    mib = lambda b: f"{b / 2**20:,.1f} MiB"
    print(f"\n{a.clients} clients, {elapsed:.1f} s (asked {a.duration:g} s), "
          f"shared images {', '.join(f'{t} {mib(v)}' for t, v in sorted(res['shared_images'].items()))}, "
          f"distinct images {a.distinct_mb} MiB of fresh content, "
          f"{sh.resets} node resets (cold caches)\n")
    print(f"{'operation':<18}{'count':>7}{'ops/s':>9}{'p50 s':>9}{'p99 s':>9}{'errors':>8}")
    for r in rows:
        print(f"{r['op']:<18}{r['count']:>7}{r['ops_per_s']:>9.2f}"
              f"{r['p50_s']:>9.3f}{r['p99_s']:>9.3f}{r['errors']:>8}")
    s = res["server"]
    print(f"\nserver, during the run (its /metrics):")
    print(f"  bytes received {mib(s['bytes_received'])}, sent {mib(s['bytes_sent'])} "
          f"(frames; clients counted {mib(sh.wire)} of UDP payload both ways)")
    print(f"  chunks received {s['chunks_received']:.0f} (new {s['chunks_stored']:.0f}), "
          f"sent {s['chunks_sent']:.0f}, dedup hits {s['dedup_hits']:.0f}, "
          f"commits {s['commits']:.0f}, connections {s['connections']:.0f}")
    print(f"  errors sent to clients: {server_errors or 'none'}")
    print(f"  peak RSS (VmHWM) {mib(s['peak_rss_bytes'] or 0)}, "
          f"RSS at the end {mib(s['rss_bytes_at_end'] or 0)}")
    print(f"load average at the end: {' '.join(res['loadavg_end'])}")
    if sh.errors:
        print(f"\n{len(sh.errors)} operations FAILED; first ones:", file=sys.stderr)
        for kind, c, detail in sh.errors[:5]:
            print(f"  client {c} {kind}: {detail}", file=sys.stderr)
        sys.exit(1)
    print("\nerrors: 0")


if __name__ == "__main__":
    main()
