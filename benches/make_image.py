#!/usr/bin/env python3
"""Build three docker-archive-like tars from real files on this machine.

    benches/make_image.py OUT_DIR [--size-gb 2.5]

Writes OUT_DIR/v1.tar, v2.tar, v3.tar in the legacy `docker save` layout
(manifest.json with Config/RepoTags/Layers, <configdigest>.json with
rootfs.diff_ids, repositories, <layerid>/{VERSION,json,layer.tar}) and
OUT_DIR/images.json describing them (written last: it marks completion).

Layers, in order (each capped so that the total is about --size-gb):
  1. usr-lib     /usr/lib
  2. usr-share   /usr/share
  3. toolchain   /root/.rustup/toolchains/<first> (a bounded subset)
  4. python      /root/.pyenv/versions (or /usr/lib/python3*)

  v1  the base.
  v2  the last two layers changed: a few files edited in the middle (same
      size), some appended to, a few MiB of new files; everything else is
      byte-identical (same mtimes, same order).
  v3  the last two layers of v1 re-tarred with new mtimes only (same
      content, same order): a docker rebuild without cache.

Deterministic: sorted walks, fixed mtimes per version, fixed owners names,
seeded edits. v2 and v3 are derived from v1's layer tars (not from the file
system again), so all three agree even if files change meanwhile. Streaming:
layers go to temporary files, then into the outer tar; no layer is ever held
in memory.
"""

import argparse
import hashlib
import io
import json
import os
import random
import shutil
import stat
import sys
import tarfile
import time

MTIME_V1 = 1_700_000_000  # 2023-11-14
MTIME_V2 = 1_710_000_000  # edited / new files in v2
MTIME_V3 = 1_720_000_000  # everything in the re-tarred layers of v3
COPY_BUF = 1 << 20
REPO = "ferry-bench"


# --------------------------------------------------------------------------
# small stream helpers


class CountingHashWriter:
    """File-like writer that counts and SHA-256-hashes what passes through."""

    def __init__(self, f):
        self.f = f
        self.n = 0
        self.h = hashlib.sha256()

    def write(self, b):
        self.f.write(b)
        self.h.update(b)
        self.n += len(b)
        return len(b)

    def tell(self):
        return self.n

    def flush(self):
        self.f.flush()


class ExactReader:
    """Reads exactly `size` bytes from f: pads with zeros if the file shrank."""

    def __init__(self, f, size):
        self.f = f
        self.left = size

    def read(self, n=-1):
        if n is None or n < 0 or n > self.left:
            n = self.left
        if n == 0:
            return b""
        b = self.f.read(n)
        if len(b) < n:
            b += b"\0" * (n - len(b))
        self.left -= n
        return b


class PatchedReader:
    """Reads `size` bytes from f with byte ranges overwritten, then `append`."""

    def __init__(self, f, size, patches, append=b""):
        self.f = f
        self.size = size
        self.patches = patches  # [(offset, bytes)]
        self.append = append
        self.pos = 0
        self.total = size + len(append)

    def read(self, n=-1):
        if n is None or n < 0 or self.pos + n > self.total:
            n = self.total - self.pos
        out = bytearray()
        while len(out) < n:
            want = n - len(out)
            if self.pos < self.size:
                k = min(want, self.size - self.pos)
                b = bytearray(self.f.read(k))
                if len(b) < k:
                    b += b"\0" * (k - len(b))
                for off, data in self.patches:
                    lo = max(off, self.pos)
                    hi = min(off + len(data), self.pos + k)
                    if lo < hi:
                        b[lo - self.pos:hi - self.pos] = data[lo - off:hi - off]
                out += b
                self.pos += k
            else:
                a = self.pos - self.size
                k = min(want, len(self.append) - a)
                out += self.append[a:a + k]
                self.pos += k
        return bytes(out)


def open_tar_writer(w):
    return tarfile.open(fileobj=w, mode="w", format=tarfile.PAX_FORMAT,
                        copybufsize=COPY_BUF)


# --------------------------------------------------------------------------
# layer 1..4: from the file system


def walk_sorted(root):
    """Yield (path, lstat) in a sorted depth-first walk, the dir before its
    contents. Unreadable directories are skipped."""
    try:
        st = os.lstat(root)
    except OSError:
        return
    yield root, st
    if not stat.S_ISDIR(st.st_mode):
        return
    try:
        names = sorted(os.listdir(root))
    except OSError:
        return
    for name in names:
        yield from walk_sorted(os.path.join(root, name))


def base_info(arcname, st, mtime):
    ti = tarfile.TarInfo(arcname)
    ti.mode = stat.S_IMODE(st.st_mode)
    ti.uid = st.st_uid
    ti.gid = st.st_gid
    ti.uname = ""
    ti.gname = ""
    ti.mtime = mtime
    return ti


def build_fs_layer(path, roots, excludes, cap):
    """Tar `roots` (sorted walk) into `path`, stopping before `cap` bytes."""
    stats = {"files": 0, "dirs": 0, "symlinks": 0, "skipped": 0,
             "over_cap": 0, "content_bytes": 0}
    with open(path, "wb") as raw:
        w = CountingHashWriter(raw)
        tar = open_tar_writer(w)
        # parent directories of the roots
        parents = set()
        for r in roots:
            p = os.path.dirname(r.rstrip("/"))
            while p not in ("/", ""):
                parents.add(p)
                p = os.path.dirname(p)
        for p in sorted(parents):
            st = os.lstat(p)
            ti = base_info(p.lstrip("/") + "/", st, MTIME_V1)
            ti.type = tarfile.DIRTYPE
            tar.addfile(ti)
            stats["dirs"] += 1
        full = False
        for r in roots:
            for p, st in walk_sorted(r):
                if any(p == e or p.startswith(e + "/") for e in excludes):
                    continue
                arc = p.lstrip("/")
                mode = st.st_mode
                if stat.S_ISDIR(mode):
                    ti = base_info(arc + "/", st, MTIME_V1)
                    ti.type = tarfile.DIRTYPE
                    tar.addfile(ti)
                    stats["dirs"] += 1
                elif stat.S_ISLNK(mode):
                    try:
                        target = os.readlink(p)
                    except OSError:
                        stats["skipped"] += 1
                        continue
                    ti = base_info(arc, st, MTIME_V1)
                    ti.type = tarfile.SYMTYPE
                    ti.linkname = target
                    tar.addfile(ti)
                    stats["symlinks"] += 1
                elif stat.S_ISREG(mode):
                    size = st.st_size
                    # header(s) + padded content; stop before the cap
                    if w.n + 1536 + size + 1024 > cap:
                        # does not fit: skip it, keep filling with smaller
                        # files until the layer is (nearly) full
                        stats["over_cap"] += 1
                        if cap - w.n < 256 * 1024:
                            full = True
                            break
                        continue
                    try:
                        f = open(p, "rb")
                    except OSError:
                        stats["skipped"] += 1
                        continue
                    with f:
                        ti = base_info(arc, st, MTIME_V1)
                        ti.type = tarfile.REGTYPE
                        ti.size = size
                        try:
                            tar.addfile(ti, ExactReader(f, size))
                        except OSError as e:  # read error mid-file: fatal,
                            # the tar stream is already half-written
                            sys.exit(f"make_image: read error on {p}: {e}")
                    stats["files"] += 1
                    stats["content_bytes"] += size
                else:
                    stats["skipped"] += 1  # devices, fifos, sockets
            if full:
                break
        tar.close()
        stats["size"] = w.n
        stats["diff_id"] = "sha256:" + w.h.hexdigest()
    return stats


# --------------------------------------------------------------------------
# v2 and v3 layers: derived from a v1 layer tar


def copy_info(m):
    ti = tarfile.TarInfo(m.name)
    ti.type = m.type
    ti.mode = m.mode
    ti.uid = m.uid
    ti.gid = m.gid
    ti.uname = m.uname
    ti.gname = m.gname
    ti.mtime = m.mtime
    ti.size = m.size
    ti.linkname = m.linkname
    return ti


def derive_layer(src, dst, mode, seed):
    """mode 'v2': edit/append/add files; mode 'v3': new mtimes only."""
    stats = {"files": 0, "edited": 0, "appended": 0, "added": 0,
             "added_bytes": 0}
    plan_edit, plan_append = {}, {}
    if mode == "v2":
        with tarfile.open(src, "r:") as t:  # headers only: seeks past data
            regs = [(m.name, m.size) for m in t if m.isreg()]
        rng = random.Random(seed)
        big = sorted(n for n, s in regs if s >= 1 << 20)
        mid = sorted(n for n, s in regs if s >= 4096)
        for n in rng.sample(big, min(4, len(big))):
            size = dict(regs)[n]
            plan_edit[n] = [(size // 2, rng.randbytes(4096))]
        rest = [n for n in mid if n not in plan_edit]
        for n in rng.sample(rest, min(8, len(rest))):
            line = f"# appended by ferry-bench v2 to {n}\n".encode()
            plan_append[n] = line * (16384 // len(line) + 1)
    with open(src, "rb") as sraw, open(dst, "wb") as draw:
        w = CountingHashWriter(draw)
        out = open_tar_writer(w)
        t = tarfile.open(fileobj=sraw, mode="r:")
        for m in t:
            ti = copy_info(m)
            if mode == "v3":
                ti.mtime = MTIME_V3
            if m.isreg():
                f = t.extractfile(m)
                if m.name in plan_edit or m.name in plan_append:
                    app = plan_append.get(m.name, b"")
                    r = PatchedReader(f, m.size, plan_edit.get(m.name, []), app)
                    ti.size = m.size + len(app)
                    ti.mtime = MTIME_V2
                    stats["edited" if m.name in plan_edit else "appended"] += 1
                else:
                    r = f
                out.addfile(ti, r)
                stats["files"] += 1
            else:
                out.addfile(ti)
        t.close()
        if mode == "v2":
            rng = random.Random(seed + "-new")
            top = f"opt/ferry-bench-added-{seed}"
            for d in ("opt/", top + "/"):
                ti = tarfile.TarInfo(d)
                ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, MTIME_V2
                out.addfile(ti)
            words = [rng.randbytes(rng.randint(2, 6)).hex()
                     for _ in range(2000)]
            files = [("blob.bin", rng.randbytes(2 << 20)),
                     ("notes.txt", " ".join(rng.choice(words)
                                            for _ in range(60000)).encode())]
            for i in range(24):
                files.append((f"conf/{i:02d}.cfg", "\n".join(
                    f"{rng.choice(words)} = {rng.randint(0, 1 << 30)}"
                    for _ in range(700)).encode()))
            ti = tarfile.TarInfo(top + "/conf/")
            ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, MTIME_V2
            out.addfile(ti)
            for name, data in files:
                ti = tarfile.TarInfo(f"{top}/{name}")
                ti.size, ti.mode, ti.mtime = len(data), 0o644, MTIME_V2
                out.addfile(ti, io.BytesIO(data))
                stats["added"] += 1
                stats["added_bytes"] += len(data)
        out.close()
        stats["size"] = w.n
        stats["diff_id"] = "sha256:" + w.h.hexdigest()
    return stats


# --------------------------------------------------------------------------
# the outer docker-save tar


def layer_ids(diff_ids):
    ids, parent = [], ""
    for d in diff_ids:
        lid = hashlib.sha256(f"{parent}\n{d}".encode()).hexdigest()
        ids.append(lid)
        parent = lid
    return ids


def write_image(out_path, tag, layers, created):
    """layers: [(name, tar_path, diff_id)]. Streams the layer files in."""
    diff_ids = [d for _, _, d in layers]
    ids = layer_ids(diff_ids)
    ts = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(created))
    config = {
        "architecture": "amd64",
        "os": "linux",
        "created": ts,
        "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:"
                           "/usr/bin:/sbin:/bin"], "Cmd": ["/bin/bash"]},
        "history": [{"created": ts, "created_by": f"ferry-bench layer {n}"}
                    for n, _, _ in layers],
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }
    config_bytes = json.dumps(config, sort_keys=True).encode()
    config_hex = hashlib.sha256(config_bytes).hexdigest()
    entries = {}  # arcname -> ("dir",) | ("bytes", b) | ("file", path)
    for i, ((name, path, _), lid) in enumerate(zip(layers, ids)):
        lj = {"id": lid, "created": ts, "os": "linux",
              "comment": f"ferry-bench layer {name}"}
        if i:
            lj["parent"] = ids[i - 1]
        entries[lid + "/"] = ("dir",)
        entries[lid + "/VERSION"] = ("bytes", b"1.0")
        entries[lid + "/json"] = ("bytes", json.dumps(lj, sort_keys=True)
                                  .encode())
        entries[lid + "/layer.tar"] = ("file", path)
    entries[config_hex + ".json"] = ("bytes", config_bytes)
    entries["manifest.json"] = ("bytes", json.dumps([{
        "Config": config_hex + ".json",
        "RepoTags": [f"{REPO}:{tag}"],
        "Layers": [lid + "/layer.tar" for lid in ids],
    }]).encode())
    entries["repositories"] = ("bytes", json.dumps(
        {REPO: {tag: ids[-1]}}).encode())
    tmp = out_path + ".tmp"
    with open(tmp, "wb") as raw:
        w = CountingHashWriter(raw)
        tar = open_tar_writer(w)
        for arc in sorted(entries):
            e = entries[arc]
            ti = tarfile.TarInfo(arc)
            ti.mtime = created
            if e[0] == "dir":
                ti.type, ti.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(ti)
            elif e[0] == "bytes":
                ti.size, ti.mode = len(e[1]), 0o644
                tar.addfile(ti, io.BytesIO(e[1]))
            else:
                ti.size, ti.mode = os.path.getsize(e[1]), 0o644
                with open(e[1], "rb") as f:
                    tar.addfile(ti, f)
        tar.close()
        size = w.n
    os.replace(tmp, out_path)
    return {"path": out_path, "tag": f"{REPO}:{tag}", "size": size,
            "sha256": w.h.hexdigest(), "config": config_hex,
            "layer_ids": ids}


# --------------------------------------------------------------------------


def pick_sources():
    srcs = [("usr-lib", ["/usr/lib"], 0.40),
            ("usr-share", ["/usr/share"], 0.20)]
    tc = "/root/.rustup/toolchains"
    tcs = sorted(d for d in (os.listdir(tc) if os.path.isdir(tc) else [])
                 if os.path.isdir(os.path.join(tc, d))
                 and not os.path.islink(os.path.join(tc, d)))
    stable = [d for d in tcs if d.startswith("stable")] or tcs
    if stable:
        srcs.append(("toolchain", [os.path.join(tc, stable[0])], 0.20))
    else:
        srcs.append(("toolchain", ["/usr/lib/gcc", "/usr/libexec"], 0.20))
    py = "/root/.pyenv/versions"
    if os.path.isdir(py):
        srcs.append(("python", [py], 0.20))
    else:
        pys = sorted(os.path.join("/usr/lib", d) for d in os.listdir("/usr/lib")
                     if d.startswith("python3"))
        srcs.append(("python", pys, 0.20))
    return srcs


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--size-gb", type=float, default=2.5,
                    help="approximate size of v1 in GB (1e9 bytes)")
    args = ap.parse_args()
    out = os.path.abspath(args.out_dir)
    os.makedirs(out, exist_ok=True)
    build = os.path.join(out, ".build")
    shutil.rmtree(build, ignore_errors=True)
    os.makedirs(build)
    try:
        os.remove(os.path.join(out, "images.json"))
    except FileNotFoundError:
        pass
    total = args.size_gb * 1e9
    srcs = pick_sources()
    # layers whose roots are inside another layer's roots are excluded there
    all_roots = [r for _, rs, _ in srcs for r in rs]
    t0 = time.time()

    v1 = []
    for i, (name, roots, frac) in enumerate(srcs):
        excl = [r for r in all_roots if r not in roots
                and any(r.startswith(x + "/") for x in roots)]
        path = os.path.join(build, f"v1-{i}-{name}.tar")
        s = build_fs_layer(path, roots, excl, int(total * frac))
        s.update(name=name, roots=roots, path=path)
        v1.append(s)
        print(f"  v1 layer {i} {name:<10} {s['size'] / 1e6:9.1f} MB  "
              f"{s['files']:6d} files {s['dirs']:5d} dirs "
              f"{s['symlinks']:5d} symlinks {s['skipped']:3d} skipped "
              f"{s['over_cap']:5d} left out (cap)  "
              f"from {' '.join(roots)}", flush=True)

    n = len(v1)
    v2, v3 = list(v1[:n - 2]), list(v1[:n - 2])
    for i in range(n - 2, n):
        src = v1[i]
        p2 = os.path.join(build, f"v2-{i}-{src['name']}.tar")
        s2 = derive_layer(src["path"], p2, "v2", src["name"])
        s2.update(name=src["name"], path=p2)
        v2.append(s2)
        print(f"  v2 layer {i} {src['name']:<10} {s2['size'] / 1e6:9.1f} MB  "
              f"{s2['edited']} edited in the middle, {s2['appended']} "
              f"appended to, {s2['added']} new files "
              f"({s2['added_bytes'] / 2**20:.1f} MiB)", flush=True)
        p3 = os.path.join(build, f"v3-{i}-{src['name']}.tar")
        s3 = derive_layer(src["path"], p3, "v3", src["name"])
        s3.update(name=src["name"], path=p3)
        v3.append(s3)
        print(f"  v3 layer {i} {src['name']:<10} {s3['size'] / 1e6:9.1f} MB  "
              f"re-tarred, new mtimes only", flush=True)

    images = {}
    for tag, layers, created in (("v1", v1, MTIME_V1), ("v2", v2, MTIME_V2),
                                 ("v3", v3, MTIME_V3)):
        img = write_image(os.path.join(out, tag + ".tar"), tag,
                          [(l["name"], l["path"], l["diff_id"])
                           for l in layers], created)
        img["layers"] = [{k: l[k] for k in l if k != "path"} for l in layers]
        images[tag] = img
        print(f"{tag}.tar  {img['size'] / 1e6:9.1f} MB  {len(layers)} layers  "
              f"sha256 {img['sha256'][:16]}…", flush=True)

    shutil.rmtree(build)
    info = {"size_gb": args.size_gb, "changed_layers": 2,
            "mtimes": {"v1": MTIME_V1, "v2": MTIME_V2, "v3": MTIME_V3},
            "images": images, "seconds": round(time.time() - t0, 1)}
    with open(os.path.join(out, "images.json.tmp"), "w") as f:
        json.dump(info, f, indent=1)
    os.replace(os.path.join(out, "images.json.tmp"),
               os.path.join(out, "images.json"))
    print(f"built in {info['seconds']} s: {out}/{{v1,v2,v3}}.tar, "
          f"{out}/images.json")


if __name__ == "__main__":
    main()
