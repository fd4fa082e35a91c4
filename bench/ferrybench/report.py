"""The report: machine description, the Markdown tables, the targets and the gnuplot plots."""
import os, subprocess
from .procs import GIB, MIB, sh


def machine():
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    def ver(*cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.splitlines()[0].strip()
        except Exception as e:  # noqa: BLE001
            return f"unavailable ({e})"
    return {"cpu": cpu, "cores": os.cpu_count(), "kernel": os.uname().release,
            "mem_gib": round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / GIB, 1),
            "os": next((l.split("=", 1)[1].strip().strip('"') for l in open("/etc/os-release")
                        if l.startswith("PRETTY_NAME")), "?"),
            "kvm": os.path.exists("/dev/kvm"),
            "qemu": ver("qemu-storage-daemon", "--version"), "libvirt": ver("virsh", "--version"),
            "virtnbdbackup": ver("virtnbdbackup", "--version"), "rsync": ver("rsync", "--version"),
            "nbdcopy": ver("nbdcopy", "--version"), "shared": "yes: other engineers use the same 2 cores"}


def fmt_s(x):
    return "n/a" if x is None else f"{x:.2f} s"


TOOLS = [("ferry", "Ferry"), ("dirty_copy", "dirty-extent copy"), ("nbdcopy", "nbdcopy whole disk"),
         ("rsync", "rsync daemon"), ("vnb_plain", "virtnbdbackup"), ("vnb_lz4", "virtnbdbackup -z")]


def tables(rep):
    sets = ["full"] + [s["name"] for s in rep["change_sets"]]
    label = {"full": "full"}
    label.update({s["name"]: f"{s['name']} ({s['bytes'] / MIB:.0f} MiB)" for s in rep["change_sets"]})
    L = []
    m = rep["machine"]
    L.append(f"Machine: {m['cpu']}, {m['cores']} cores (shared), {m['mem_gib']} GiB, {m['os']}, "
             f"kernel {m['kernel']}; load average during the run: min {rep['load']['min']}, mean "
             f"{rep['load']['mean']}, max {rep['load']['max']}. Disk {rep['disk']['size_bytes'] / GIB:.0f} GiB qcow2, "
             f"{rep['disk']['allocated_bytes'] / GIB:.2f} GiB allocated; seed {rep['seed']}; zstd -{rep['zstd_level']}.")
    L.append("")
    L.append("Wall time (start to durable copy; Ferry: to the durable acknowledgement) and Ferry's "
             "time as a ratio of each peer's (< 1: Ferry faster).")
    L.append("")
    hdr = "| change set | " + " | ".join(t for _, t in TOOLS) + " |"
    L.append(hdr)
    L.append("|" + "---|" * (len(TOOLS) + 1))
    for s in sets:
        fe = rep["results"]["ferry"].get(s, {}).get("wall_s")
        cells = []
        for k, _ in TOOLS:
            r = rep["results"].get(k, {})
            if isinstance(r, dict) and "skipped" in r:
                cells.append("not run")
                continue
            v = r.get(s, {}).get("wall_s") if isinstance(r, dict) else None
            if v is None:
                cells.append("—")
            elif k == "ferry":
                cells.append(f"**{v:.2f} s**")
            else:
                cells.append(f"{v:.2f} s (x{fe / v:.2f})" if fe else f"{v:.2f} s")
        L.append(f"| {label[s]} | " + " | ".join(cells) + " |")
    L.append("")
    L.append("Ferry per change set (changed MB/s = changed bytes / wall; wire = TCP bytes of the RP; "
             "written = receiver's write_bytes incl. journal and apply; read = qemu-storage-daemon's rchar).")
    L.append("")
    L.append("| change set | wall | changed MB/s | apply | CPU src / rcv | read | wire | written | peak RSS src / rcv |")
    L.append("|---|---|---|---|---|---|---|---|---|")
    for s in sets:
        f = rep["results"]["ferry"][s]
        ch = f.get("changed_bytes")
        rate = f"{ch / 1e6 / f['wall_s']:.0f}" if ch else "—"
        L.append(f"| {label[s]} | {f['wall_s']:.2f} s | {rate} | {fmt_s(f['apply_s'])} | "
                 f"{f['source_cpu_s']:.2f} / {f['receiver_cpu_s']:.2f} s | {f['source_read_bytes'] / 1e6:.0f} MB | "
                 f"{(f['wire_bytes'] or 0) / 1e6:.0f} MB | {f['receiver_write_bytes'] / 1e6:.0f} MB | "
                 f"{f['source_peak_rss_mib']:.0f} / {f['receiver_peak_rss_mib']:.0f} MiB |")
    L.append("")
    L.append("Peers per change set (CPU of the tool; rsync adds its daemon; read = source QEMU's rchar or "
             "rsync's reads; wire: NBD payload over a unix socket, taken as QEMU's image reads (sendmsg is not in /proc/PID/io), rsync's protocol bytes (--stats); written = tool's write_bytes).")
    L.append("")
    L.append("| tool | change set | wall | CPU | read | wire | written | peak RSS |")
    L.append("|---|---|---|---|---|---|---|---|")
    for k, t in TOOLS[1:]:
        r = rep["results"].get(k, {})
        if "skipped" in r:
            L.append(f"| {t} | — | not run: {r['skipped']} | | | | | |")
            continue
        for s in sets:
            if s not in r:
                continue
            p = r[s]
            cpu = p["cpu_s"] + p.get("daemon_cpu_s", 0)
            L.append(f"| {t} | {label[s]} | {p['wall_s']:.2f} s | {cpu:.2f} s | "
                     f"{p.get('source_read_bytes', 0) / 1e6:.0f} MB | {(p.get('wire_bytes') or 0) / 1e6:.0f} MB | "
                     f"{p['write_bytes'] / 1e6:.0f} MB | {p['peak_rss_mib']:.0f} MiB |")
    L.append("")
    lim = rep["limits"]
    z1 = lim["zstd"][str(rep["zstd_level"])]
    L.append("Limits measured in this run (one core each; TCP: one sender and one receiver thread) and "
             "Ferry's 10% scattered incremental as a fraction of them.")
    L.append("")
    L.append("| limit | value | Ferry | fraction |")
    L.append("|---|---|---|---|")
    f10 = rep["results"]["ferry"].get("10pct")
    if f10:
        rate = f10["changed_bytes"] / 1e6 / f10["wall_s"]
        wire_rate = (f10["wire_bytes"] or 0) / 1e6 / f10["wall_s"]
        wr_rate = f10["receiver_write_bytes_at_ack"] / 1e6 / f10["wall_s"]
        L.append(f"| xxh3-128 | {z1['xxh3_128_mb_s']:.0f} MB/s | {rate:.0f} MB/s changed | {rate / z1['xxh3_128_mb_s']:.3f} |")
        for lv, z in sorted(lim["zstd"].items()):
            L.append(f"| zstd -{lv} compress (ratio {z['zstd_ratio']:.2f}) | {z['zstd_compress_mb_s']:.0f} MB/s | "
                     f"{rate:.0f} MB/s changed | {rate / z['zstd_compress_mb_s']:.2f} |")
            L.append(f"| zstd -{lv} decompress | {z['zstd_decompress_mb_s']:.0f} MB/s | {rate:.0f} MB/s changed | "
                     f"{rate / z['zstd_decompress_mb_s']:.2f} |")
        L.append(f"| loopback TCP | {lim['tcp']['tcp_loopback_gb_s'] * 1000:.0f} MB/s | {wire_rate:.0f} MB/s wire | "
                 f"{wire_rate / (lim['tcp']['tcp_loopback_gb_s'] * 1000):.3f} |")
        L.append(f"| disk write (io_uring O_DIRECT) | {lim['disk']['disk_write_mb_s']:.0f} MB/s | {wr_rate:.0f} MB/s "
                 f"written by the ack | {wr_rate / lim['disk']['disk_write_mb_s']:.3f} |")
        L.append(f"| disk read (io_uring O_DIRECT) | {lim['disk']['disk_read_mb_s']:.0f} MB/s | — | — |")
    L.append("")
    L.append("Targets.")
    L.append("")
    L.append("| target | measured | met |")
    L.append("|---|---|---|")
    for t in rep["targets"]:
        L.append(f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else 'NO'} |")
    L.append("")
    if rep.get("scaling"):
        L.append("Scaling: the same 1% change set (same bytes) on sparse disks (median of "
                 f"{len(rep['scaling'][0]['incremental_wall_s'])} RPs).")
        L.append("")
        L.append("| disk | changed | median wall | s per changed GB | peak RSS src / rcv |")
        L.append("|---|---|---|---|---|")
        for s in rep["scaling"]:
            L.append(f"| {s['disk_gib']} GiB | {s['changed_bytes'] / MIB:.0f} MiB | {s['median_wall_s']:.3f} s | "
                     f"{s['s_per_changed_gb']:.2f} | {s['source_peak_rss_mib']:.0f} / {s['receiver_peak_rss_mib']:.0f} MiB |")
        L.append("")
    e = rep.get("empty_disk")
    if e:
        L.append(f"Empty thin qcow2 of {e['size_bytes'] / (1 << 40):g} TiB (bench/empty-disk; measured / target).")
        L.append("")
        L.append("| first RP | wire | store (du) | receiver start-up | start-up peak RSS |")
        L.append("|---|---|---|---|---|")
        L.append(f"| {e['first_rp_s']:.2f} s / 5 s | {e['wire_bytes'] / 1e3:.0f} kB / 10 MB | "
                 f"{e['store_bytes'] / 1024:.0f} KiB / 16 MiB | {e['startup_s']:.2f} s / 5 s | "
                 f"{e['startup_peak_rss_mib']:.0f} MiB |")
        L.append("")
    return "\n".join(L) + "\n"


def targets(rep):
    T = []
    F = rep["results"]["ferry"]
    R = rep["results"]
    if "10pct" in F:
        rate = F["10pct"]["changed_bytes"] / 1e6 / F["10pct"]["wall_s"]
        T.append({"target": f"10% scattered >= 400 MB/s of changed data (zstd -{rep['zstd_level']})",
                  "measured": f"{rate:.0f} MB/s", "met": rate >= 400})
    if "1pct" in F:
        fe = F["1pct"]["wall_s"]
        dc = R.get("dirty_copy", {}).get("1pct", {}).get("wall_s")
        T.append({"target": "1% no slower than the bare dirty-extent copy",
                  "measured": f"{fe:.2f} s vs {dc:.2f} s" if dc else f"{fe:.2f} s (peer not run)",
                  "met": bool(dc) and fe <= dc})
        fixed = F["1pct"]["describe"].get("capture_s", 0) + F["1pct"]["describe"].get("commit_s", 0)
        T.append({"target": "fixed cost per RP < 0.3 s (capture + commit of the 1% RP)",
                  "measured": f"{fixed:.2f} s (capture {F['1pct']['describe'].get('capture_s', 0):.2f} + "
                              f"commit {F['1pct']['describe'].get('commit_s', 0):.2f}; wall minus transfer "
                              f"{F['1pct']['wall_s'] - F['1pct']['describe'].get('transfer_s', 0):.2f} s)",
                  "met": fixed < 0.3})
    nc = R.get("nbdcopy", {}).get("full", {}).get("wall_s")
    T.append({"target": "full RP no slower than whole-image nbdcopy",
              "measured": f"{F['full']['wall_s']:.2f} s vs {nc:.2f} s" if nc else f"{F['full']['wall_s']:.2f} s (peer not run)",
              "met": bool(nc) and F["full"]["wall_s"] <= nc})
    rss = max(max(f["source_peak_rss_mib"], f["receiver_peak_rss_mib"]) for f in F.values())
    if rep.get("scaling"):
        rss = max(rss, max(max(s["source_peak_rss_mib"], s["receiver_peak_rss_mib"]) for s in rep["scaling"]))
    T.append({"target": "peak RSS < 256 MiB (source and receiver, every RP)", "measured": f"{rss:.0f} MiB",
              "met": rss < 256})
    if rep.get("scaling") and len(rep["scaling"]) >= 2:
        a, b = rep["scaling"][0], rep["scaling"][-1]
        ratio = b["s_per_changed_gb"] / a["s_per_changed_gb"]
        rep["scaling_ratio"] = ratio
        T.append({"target": f"{b['disk_gib']} GiB / {a['disk_gib']} GiB time per changed byte <= 1.2",
                  "measured": f"{ratio:.2f}", "met": ratio <= 1.2})
    return T


def plots(rep, outdir):
    sets = ["full"] + [s["name"] for s in rep["change_sets"]]
    tools = [(k, t) for k, t in TOOLS if "skipped" not in rep["results"].get(k, {"skipped": 1})]
    dat = os.path.join(outdir, "times.dat")
    with open(dat, "w") as f:
        f.write("set " + " ".join(f'"{t}"' for _, t in tools) + "\n")
        for s in sets:
            row = [rep["results"][k].get(s, {}).get("wall_s") for k, _ in tools]
            f.write(s + " " + " ".join("NaN" if v is None else f"{v:.4f}" for v in row) + "\n")
    gp = os.path.join(outdir, "times.gp")
    cols = " ".join(f"'{dat}' using {i + 2}:xtic(1) title columnheader({i + 2})" + ("," if i < len(tools) - 1 else "")
                    for i in range(len(tools)))
    with open(gp, "w") as f:
        f.write(f"""set terminal pngcairo size 1100,600 font 'DejaVu Sans,11'
set output '{outdir}/times.png'
set title "Time per change set, {rep['disk']['size_bytes'] // GIB} GiB disk (log scale; lower is better)"
set style data histograms
set style histogram clustered gap 1
set style fill solid 0.85 border -1
set logscale y
set yrange [0.05:*]
set ylabel 'wall time to a durable copy (s)'
set grid ytics
set key outside right top
set datafile missing 'NaN'
plot {cols}
""")
    sh("gnuplot", gp)
    lim = rep["limits"]
    z = lim["zstd"][str(rep["zstd_level"])]
    dat2 = os.path.join(outdir, "limits.dat")
    rows = []
    for s in rep["change_sets"]:
        f = rep["results"]["ferry"][s["name"]]
        rows.append((f"Ferry {s['name']}", s["bytes"] / 1e6 / f["wall_s"], 1))
    f = rep["results"]["ferry"]["full"]
    rows.append(("Ferry full", rep["disk"]["allocated_bytes"] / 1e6 / f["wall_s"], 1))
    rows += [("xxh3-128", z["xxh3_128_mb_s"], 2), (f"zstd -{rep['zstd_level']} comp", z["zstd_compress_mb_s"], 2),
             (f"zstd -{rep['zstd_level']} decomp", z["zstd_decompress_mb_s"], 2),
             ("loopback TCP", lim["tcp"]["tcp_loopback_gb_s"] * 1000, 2),
             ("disk write", lim["disk"]["disk_write_mb_s"], 2), ("disk read", lim["disk"]["disk_read_mb_s"], 2)]
    with open(dat2, "w") as fh:
        for i, (name, v, c) in enumerate(rows):
            fh.write(f'{i} "{name}" {v:.1f} {c}\n')
    gp2 = os.path.join(outdir, "limits.gp")
    with open(gp2, "w") as fh:
        fh.write(f"""set terminal pngcairo size 1100,600 font 'DejaVu Sans,11'
set output '{outdir}/limits.png'
set title "Ferry's throughput (changed bytes / wall; full: allocated bytes / wall) against this machine's limits"
set style fill solid 0.85 border -1
set boxwidth 0.7
set logscale y
set yrange [10:40000]
set ylabel 'MB/s (log scale)'
set grid ytics
set xtics rotate by -30
set key off
set palette defined (1 '#1f77b4', 2 '#aaaaaa')
unset colorbox
plot '{dat2}' using 1:3:4:xtic(2) with boxes lc palette, '' using 1:3:(sprintf('%.0f', $3)) with labels offset 0,0.8
""")
    sh("gnuplot", gp2)
