#!/usr/bin/env bash
# End-to-end comparison: ferry vs gzip, zstd and casync on docker-save archives
# built from real files on this machine (benches/make_image.py).
#
#   benches/e2e.sh [DATA_DIR]            (default /work/bench-data)
#
# Environment:
#   FERRY=path     use this ferry binary instead of building target/release/ferry
#   SIZE_GB=2.5    size of the generated images; existing data of another size
#                  is regenerated only when SIZE_GB is set (default 2.5 for new data)
#   BIG_GB=8       size of the stdin stream used to show that memory stays flat
#   KEEP=1         keep DATA_DIR/work (stores and outputs) afterwards
#
# Writes DATA_DIR/results.json and prints a table with the ratios the targets
# need. The page cache cannot be dropped here, so every input is read once and
# every tool run once untimed before anything is timed: all runs read warm.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")
DATA=$(mkdir -p "${1:-/work/bench-data}" && cd "${1:-/work/bench-data}" && pwd)
BIG_GB=${BIG_GB:-8}
W=$DATA/work

say() { printf '\n== %s\n' "$*" >&2; }
die() { printf 'e2e.sh: error: %s\n' "$*" >&2; exit 1; }
trap 'printf "e2e.sh: failed at line %s: %s\n" "$LINENO" "$BASH_COMMAND" >&2' ERR

# --- tools -------------------------------------------------------------------
need=()
command -v zstd >/dev/null || need+=(zstd)
command -v casync >/dev/null || need+=(casync)
[ -x /usr/bin/time ] || need+=(time)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx)
command -v curl >/dev/null || need+=(curl)
command -v python3 >/dev/null || need+=(python3)
if ((${#need[@]})); then
    say "installing ${need[*]}"
    SUDO=
    [ "$(id -u)" = 0 ] || SUDO=sudo
    $SUDO apt-get update
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y "${need[@]}"
fi

# --- ferry -------------------------------------------------------------------
if [ -z "${FERRY:-}" ]; then
    say "building ferry (cargo build --release -p ferry-cli)"
    (cd "$REPO" && cargo build --release -p ferry-cli)
    FERRY=$REPO/target/release/ferry
fi
[ -x "$FERRY" ] || die "no ferry binary at $FERRY"
"$FERRY" stash --help >/dev/null 2>&1 || die "$FERRY has no working 'stash' command"
"$FERRY" unstash --help >/dev/null 2>&1 || die "$FERRY has no working 'unstash' command"

# --- data --------------------------------------------------------------------
have_size=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["size_gb"])' \
    "$DATA/images.json" 2>/dev/null || true)
if [ -z "$have_size" ] || { [ -n "${SIZE_GB:-}" ] && [ "$have_size" != "$(python3 -c "print(float('$SIZE_GB'))")" ]; }; then
    say "generating images (${SIZE_GB:-2.5} GB) in $DATA"
    python3 "$HERE/make_image.py" "$DATA" --size-gb "${SIZE_GB:-2.5}"
fi
V1=$DATA/v1.tar V2=$DATA/v2.tar V3=$DATA/v3.tar
for f in "$V1" "$V2" "$V3"; do [ -f "$f" ] || die "missing $f (delete $DATA/images.json to regenerate)"; done

rm -rf "$W"
mkdir -p "$W"
RES=$W/results.tsv
: >"$RES"
rec() { printf '%s\t%s\n' "$1" "$2" >>"$RES"; }
# Run a command under /usr/bin/time: wall seconds and maximum resident set
# size (the same field `time -v` prints as "Maximum resident set size").
# Redirections given to `timed` apply to the command.
timed() {
    local key=$1
    shift
    /usr/bin/time -f '%e %M' -o "$W/$key.time" "$@"
}
bytes_of() { stat -c %s "$1"; }
du_b() { du -sb "$1" | cut -f1; }
file_bytes() { find "$1" -type f -printf '%s\n' | awk '{s+=$1} END {print s+0}'; }
stored() { # KEY DIR: record the store's size two ways
    rec "$1.du_bytes" "$(du_b "$2")"
    rec "$1.file_bytes" "$(file_bytes "$2")"
}
FJ=("$FERRY" --json --store) # ferry with JSON reports; then the store dir

rec ferry "$FERRY"
rec ferry_version "$("$FERRY" --version 2>/dev/null || echo unknown)"
rec loadavg_start "$(cut -d' ' -f1-3 /proc/loadavg)"
rec nproc "$(nproc)"
rec casync_version "$(casync --version 2>/dev/null | head -1)"
rec zstd_version "$(zstd --version | head -1)"
rec gzip_version "$(gzip --version | head -1)"

# --- warm-up -----------------------------------------------------------------
say "warming the page cache: reading inputs and running each tool once untimed"
cat "$V1" "$V2" "$V3" >/dev/null
gzip -6 -c "$V1" >/dev/null
zstd -3 -T0 -q -c "$V1" >/dev/null
zstd -3 -T0 -q -c "$V2" >"$W/v2.tar.zst" # for the decompression comparison
zstd -d -q -c "$W/v2.tar.zst" >/dev/null
"${FJ[@]}" "$W/warm" stash bench/v1 "$V1" >/dev/null
"${FJ[@]}" "$W/warm" unstash bench/v1 - 2>/dev/null >/dev/null
rm -rf "$W/warm"
mkdir "$W/warm-ca"
casync make --store="$W/warm-ca" "$W/warm.caibx" "$V1" >/dev/null
rm -rf "$W/warm-ca" "$W/warm.caibx"
sync

# --- gzip, zstd --------------------------------------------------------------
say "gzip -6 v1"
timed gzip gzip -6 -c "$V1" >"$W/v1.tar.gz"
rec gzip.bytes "$(bytes_of "$W/v1.tar.gz")"
rm -f "$W/v1.tar.gz"
sync

say "zstd -3 -T0 v1"
timed zstd zstd -3 -T0 -q -c "$V1" >"$W/v1.tar.zst"
rec zstd.bytes "$(bytes_of "$W/v1.tar.zst")"
rm -f "$W/v1.tar.zst"
sync

# --- ferry stash -------------------------------------------------------------
say "ferry stash v1 (cold, file argument)"
timed ferry_cold "${FJ[@]}" "$W/s-v1" stash bench/v1 "$V1" >"$W/ferry_cold.json"
stored ferry_cold.store "$W/s-v1"
sync

say "ferry stash v1 (cold, stdin pipe)"
cat "$V1" | timed ferry_cold_pipe "${FJ[@]}" "$W/s-pipe" stash bench/v1 - >"$W/ferry_cold_pipe.json"
stored ferry_cold_pipe.store "$W/s-pipe"
rm -rf "$W/s-pipe"
sync

cp -a "$W/s-v1" "$W/s-base" # the store right after v1

say "ferry stash v2 after v1"
timed ferry_v2 "${FJ[@]}" "$W/s-v1" stash bench/v2 "$V2" >"$W/ferry_v2.json"
stored ferry_v2.store "$W/s-v1"
sync

say "ferry stash v3 (re-tarred, new mtimes) after v1"
cp -a "$W/s-base" "$W/s-v3"
timed ferry_v3 "${FJ[@]}" "$W/s-v3" stash bench/v3 "$V3" >"$W/ferry_v3.json"
stored ferry_v3.store "$W/s-v3"
rm -rf "$W/s-v3"
sync

say "ferry re-stash of identical v1"
cp -a "$W/s-base" "$W/s-re"
timed ferry_restash "${FJ[@]}" "$W/s-re" stash bench/v1 "$V1" >"$W/ferry_restash.json"
stored ferry_restash.store "$W/s-re"
rm -rf "$W/s-re"
stored ferry_base.store "$W/s-base"
rm -rf "$W/s-base"
sync

"${FJ[@]}" "$W/s-v1" du >"$W/ferry_du.json"

# --- casync ------------------------------------------------------------------
say "casync make v1, then v2 (and v3) after v1"
mkdir "$W/ca"
timed casync_v1 casync make --store="$W/ca" "$W/v1.caibx" "$V1" >/dev/null
stored casync_v1.store "$W/ca"
cp -a "$W/ca" "$W/ca3"
timed casync_v2 casync make --store="$W/ca" "$W/v2.caibx" "$V2" >/dev/null
stored casync_v2.store "$W/ca"
timed casync_v3 casync make --store="$W/ca3" "$W/v3.caibx" "$V3" >/dev/null
stored casync_v3.store "$W/ca3"
rec casync_v1.chunks "$(find "$W/ca" -type f -name '*.cacnk' | wc -l)"
rm -rf "$W/ca" "$W/ca3" "$W"/*.caibx
sync

# --- unstash vs zstd -d ------------------------------------------------------
say "ferry unstash v2 vs zstd -d"
timed unstash_file "${FJ[@]}" "$W/s-v1" unstash bench/v2 "$W/v2.out" >"$W/unstash_file.json"
cmp "$V2" "$W/v2.out" || die "unstash to a file is not byte-exact"
rm -f "$W/v2.out"
sync
timed unstash_null "${FJ[@]}" "$W/s-v1" unstash bench/v2 - >/dev/null 2>"$W/unstash_null.json"
sync
timed unstash_stdout_file "${FJ[@]}" "$W/s-v1" unstash bench/v2 - >"$W/v2.out" 2>"$W/unstash_stdout_file.json"
cmp "$V2" "$W/v2.out" || die "unstash to stdout is not byte-exact"
rm -f "$W/v2.out"
sync
timed zstdd_null zstd -d -q -c "$W/v2.tar.zst" >/dev/null
sync
timed zstdd_file zstd -d -q -c "$W/v2.tar.zst" >"$W/v2.zout"
rm -f "$W/v2.zout" "$W/v2.tar.zst"
sync

# --- memory on a long stdin stream -------------------------------------------
big_stream() { # KEY GB: a stream of repeated v1, cut at GB GiB, into a fresh store
    set +o pipefail
    while cat "$V1"; do :; done | head -c "$2G" | timed "$1" "${FJ[@]}" "$W/s-big" stash bench/big - >"$W/$1.json"
    local rc=${PIPESTATUS[2]}
    set -o pipefail
    [ "$rc" = 0 ] || die "ferry stash of the $2 GiB stream failed ($rc)"
    rm -rf "$W/s-big"
    sync
}
say "ferry stash of a 1 GiB and a $BIG_GB GiB stdin stream (peak RSS)"
big_stream big1 1
big_stream bigN "$BIG_GB"
rec big.gib "$BIG_GB"
rec loadavg_end "$(cut -d' ' -f1-3 /proc/loadavg)"

[ -n "${KEEP:-}" ] || rm -rf "$W/s-v1"

# --- report ------------------------------------------------------------------
W=$W DATA=$DATA python3 - <<'PY'
import json, os, glob

W, DATA = os.environ["W"], os.environ["DATA"]
res = {}
for line in open(f"{W}/results.tsv"):
    k, v = line.rstrip("\n").split("\t", 1)
    res[k] = v
def num(k):
    return float(res[k])
times = {}
for p in glob.glob(f"{W}/*.time"):
    k = os.path.basename(p)[:-5]
    sec, rss = open(p).read().split()[-2:]
    times[k] = {"seconds": float(sec), "max_rss_kib": int(rss)}
reports = {}
for p in glob.glob(f"{W}/*.json"):
    try:
        reports[os.path.basename(p)[:-5]] = json.load(open(p))
    except ValueError:
        pass
info = json.load(open(f"{DATA}/images.json"))
img = info["images"]
size = {t: img[t]["size"] for t in img}
nchg = info["changed_layers"]
retarred = sum(l["size"] for l in img["v3"]["layers"][-nchg:])
changed_v2 = sum(l["size"] for l in img["v2"]["layers"][-nchg:])

def t(k): return times[k]["seconds"]
def rss(k): return times[k]["max_rss_kib"] / 1024
base_fb = num("ferry_base.store.file_bytes")
base_du = num("ferry_base.store.du_bytes")
ca1_fb, ca1_du = num("casync_v1.store.file_bytes"), num("casync_v1.store.du_bytes")
out = {
    "gzip": {"bytes": int(num("gzip.bytes")), **times["gzip"]},
    "zstd": {"bytes": int(num("zstd.bytes")), **times["zstd"]},
    "ferry": {},
    "casync": {},
    "unstash": {},
    "stream": {},
}
for k in ("cold", "cold_pipe", "v2", "v3", "restash"):
    r = reports[f"ferry_{k}"]
    fb = num(f"ferry_{k}.store.file_bytes")
    du = num(f"ferry_{k}.store.du_bytes")
    if k not in ("cold", "cold_pipe"):
        fb, du = fb - base_fb, du - base_du
    out["ferry"][k] = {**times[f"ferry_{k}"], "report": r,
                       "store_growth_file_bytes": int(fb),
                       "store_growth_du_bytes": int(du)}
out["ferry"]["du_after_v1_v2"] = reports.get("ferry_du")
for k in ("v1", "v2", "v3"):
    fb = num(f"casync_{k}.store.file_bytes")
    du = num(f"casync_{k}.store.du_bytes")
    if k != "v1":
        fb, du = fb - ca1_fb, du - ca1_du
    out["casync"][k] = {**times[f"casync_{k}"], "added_file_bytes": int(fb),
                        "added_du_bytes": int(du)}
out["casync"]["v1"]["chunks"] = int(num("casync_v1.chunks"))
for k in ("unstash_file", "unstash_null", "unstash_stdout_file",
          "zstdd_null", "zstdd_file"):
    out["unstash"][k] = {**times[k], "report": reports.get(k)}
for k in ("big1", "bigN"):
    out["stream"][k] = {**times[k], "report": reports.get(k)}

F = out["ferry"]
cold_stored = F["cold"]["report"]["stored_bytes"]
v2_stored = F["v2"]["report"]["stored_bytes"]
v3_stored = F["v3"]["report"]["stored_bytes"]
re_stored = F["restash"]["report"]["stored_bytes"]
ca2, ca3 = out["casync"]["v2"]["added_file_bytes"], out["casync"]["v3"]["added_file_bytes"]
def ratio(a, b): return a / b if b else float("inf")
ratios = {
    "cold_stash_time_vs_zstd": ratio(t("ferry_cold"), t("zstd")),
    "cold_stash_pipe_time_vs_zstd": ratio(t("ferry_cold_pipe"), t("zstd")),
    "cold_stored_vs_zstd_bytes": ratio(cold_stored, out["zstd"]["bytes"]),
    "cold_store_on_disk_vs_zstd_bytes": ratio(base_fb, out["zstd"]["bytes"]),
    "cold_stored_vs_gzip_bytes": ratio(cold_stored, out["gzip"]["bytes"]),
    "v2_stash_time_vs_cold": ratio(t("ferry_v2"), t("ferry_cold")),
    "v2_stored_vs_casync_added": ratio(v2_stored, ca2),
    "v2_store_growth_vs_casync_added": ratio(F["v2"]["store_growth_file_bytes"], ca2),
    "v3_stored_pct_of_retarred_layers": 100 * ratio(v3_stored, retarred),
    "v3_stored_vs_casync_added": ratio(v3_stored, ca3),
    "unstash_file_time_vs_zstd_d_file": ratio(t("unstash_file"), t("zstdd_file")),
    "unstash_stdout_file_time_vs_zstd_d_file": ratio(t("unstash_stdout_file"), t("zstdd_file")),
    "unstash_null_time_vs_zstd_d_null": ratio(t("unstash_null"), t("zstdd_null")),
    "cold_stash_peak_rss_mib": rss("ferry_cold"),
    "stream_1gib_peak_rss_mib": rss("big1"),
    "stream_big_peak_rss_mib": rss("bigN"),
    "restash_stored_bytes": re_stored,
    "restash_under_1mib": re_stored < (1 << 20),
}
result = {"data": DATA, "images": {k: {"size": size[k], "sha256": img[k]["sha256"],
          "layers": [{x: l[x] for x in ("name", "size", "files", "diff_id")}
                     for l in img[k]["layers"]]} for k in img},
          "retarred_layers_bytes": retarred, "env": {k: res[k] for k in res if "." not in k},
          "warm_cache": True, "results": out, "ratios": ratios}
with open(f"{DATA}/results.json", "w") as f:
    json.dump(result, f, indent=1)

MB = 1e6
def mib(b): return f"{b / 2**20:,.1f} MiB"
rows = []
def row(step, key, inp, outb="", note=""):
    s = t(key)
    rows.append((step, f"{s:8.2f}", f"{inp / s / MB:8.0f}" if s > 0 else "     inf",
                 f"{rss(key):8.0f}", outb, note))
row("gzip -6 v1", "gzip", size["v1"], mib(out["gzip"]["bytes"]), "output")
row("zstd -3 -T0 v1", "zstd", size["v1"], mib(out["zstd"]["bytes"]), "output")
row("ferry stash v1, cold (file)", "ferry_cold", size["v1"], mib(cold_stored),
    f"stored; store on disk {mib(base_fb)}")
row("ferry stash v1, cold (stdin pipe)", "ferry_cold_pipe", size["v1"],
    mib(F["cold_pipe"]["report"]["stored_bytes"]), "stored")
row("ferry stash v2 after v1", "ferry_v2", size["v2"], mib(v2_stored),
    f"stored; store grew {mib(F['v2']['store_growth_file_bytes'])}")
row("ferry stash v3 after v1", "ferry_v3", size["v3"], mib(v3_stored),
    f"stored; store grew {mib(F['v3']['store_growth_file_bytes'])}")
row("ferry re-stash identical v1", "ferry_restash", size["v1"], f"{re_stored:,} B",
    f"stored; store grew {F['restash']['store_growth_file_bytes']:,} B")
row("casync make v1, cold", "casync_v1", size["v1"], mib(ca1_fb),
    f"store; du -sb {mib(ca1_du)}")
row("casync make v2 after v1", "casync_v2", size["v2"], mib(ca2),
    f"added; du -sb +{mib(out['casync']['v2']['added_du_bytes'])}")
row("casync make v3 after v1", "casync_v3", size["v3"], mib(ca3),
    f"added; du -sb +{mib(out['casync']['v3']['added_du_bytes'])}")
row("ferry unstash v2 -> file", "unstash_file", size["v2"], "", "byte-exact (cmp)")
row("ferry unstash v2 - > /dev/null", "unstash_null", size["v2"])
row("ferry unstash v2 - > file", "unstash_stdout_file", size["v2"], "", "byte-exact (cmp)")
row("zstd -d v2.tar.zst > /dev/null", "zstdd_null", size["v2"])
row("zstd -d v2.tar.zst > file", "zstdd_file", size["v2"])
row("ferry stash 1 GiB stdin stream", "big1", 1 << 30, "", "repeated v1, fresh store")
row(f"ferry stash {res['big.gib']} GiB stdin stream", "bigN", int(res["big.gib"]) << 30,
    "", "repeated v1, fresh store")

print()
print(f"ferry end-to-end benchmark  ({res['ferry_version']}, {res['nproc']} cores, "
      f"load average {res['loadavg_start']} at start, {res['loadavg_end']} at end)")
print(f"data: {DATA}  v1 {size['v1']/MB:,.0f} MB, v2 {size['v2']/MB:,.0f} MB, "
      f"v3 {size['v3']/MB:,.0f} MB; the last {nchg} layers changed in v2 "
      f"({changed_v2/MB:,.0f} MB), re-tarred in v3 ({retarred/MB:,.0f} MB)")
print("page cache: warm for every run (dropping it is not possible here): all inputs were "
      "read once and each tool run once untimed first")
print("time = wall clock of the process (/usr/bin/time), MB/s = input (or output) bytes / time, "
      "RSS = peak resident set size")
print()
hdr = ("step", "time s", "MB/s", "RSS MiB", "bytes", "")
w0 = max(len(r[0]) for r in rows + [hdr])
w4 = max(len(r[4]) for r in rows + [hdr])
print(f"{hdr[0]:<{w0}}  {hdr[1]:>8}  {hdr[2]:>8}  {hdr[3]:>8}  {hdr[4]:>{w4}}")
print("-" * (w0 + w4 + 40))
for r in rows:
    print(f"{r[0]:<{w0}}  {r[1]}  {r[2]}  {r[3]}  {r[4]:>{w4}}  {r[5]}")
print()
R = ratios
print("ratios")
print(f"  cold stash time / zstd -3 -T0 time          {R['cold_stash_time_vs_zstd']:6.2f}x   "
      f"(stdin pipe: {R['cold_stash_pipe_time_vs_zstd']:.2f}x)")
print(f"  cold stored / zstd output                   {R['cold_stored_vs_zstd_bytes']:6.2f}x   "
      f"(store on disk: {R['cold_store_on_disk_vs_zstd_bytes']:.2f}x; vs gzip -6: "
      f"{R['cold_stored_vs_gzip_bytes']:.2f}x)")
print(f"  v2 stash time / cold stash time             {R['v2_stash_time_vs_cold']:6.2f}x")
print(f"  v2 stored / casync added by v2              {R['v2_stored_vs_casync_added']:6.2f}x   "
      f"({mib(v2_stored)} vs {mib(ca2)}; ferry store growth {R['v2_store_growth_vs_casync_added']:.2f}x)")
print(f"  v3 stored / re-tarred layers                {R['v3_stored_pct_of_retarred_layers']:6.2f}%   "
      f"({mib(v3_stored)} of {mib(retarred)})")
print(f"  v3 stored / casync added by v3              {R['v3_stored_vs_casync_added']:6.3f}x   "
      f"({mib(v3_stored)} vs {mib(ca3)})")
print(f"  unstash v2 -> file / zstd -d > file         {R['unstash_file_time_vs_zstd_d_file']:6.2f}x   "
      f"(stdout > file: {R['unstash_stdout_file_time_vs_zstd_d_file']:.2f}x; "
      f"> /dev/null: {R['unstash_null_time_vs_zstd_d_null']:.2f}x)")
print(f"  peak RSS, cold stash of v1                  {R['cold_stash_peak_rss_mib']:6.0f} MiB")
print(f"  peak RSS, 1 GiB vs {res['big.gib']} GiB stdin stream         "
      f"{R['stream_1gib_peak_rss_mib']:6.0f} vs {R['stream_big_peak_rss_mib']:.0f} MiB")
print(f"  re-stash of identical v1 stored             {re_stored:,} B  "
      f"({'OK, < 1 MiB' if R['restash_under_1mib'] else 'FAIL, >= 1 MiB'})")
print()
print(f"results: {DATA}/results.json")
PY
