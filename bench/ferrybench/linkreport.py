"""The report of the shaped links and of the long-lived source: Markdown sections, targets
(issue 15) and one gnuplot plot per link."""
import os

from .procs import GIB, MIB, sh


def _rate(bps):
    return f"{bps / 1e9:g} Gbit/s" if bps >= 1e9 else f"{bps / 1e6:g} Mbit/s"


def best_ferry(link):
    rows = [r for r in link["rows"] if r["tool"].startswith("Ferry")]
    return min(rows, key=lambda r: r["wall_s"]) if rows else None


def links_tables(lk):
    L = []
    L.append(f"Shaped links ({lk['topology']}): tbf on the egress of both veth ends, burst "
             f"{lk['tbf']['burst']}, limit {lk['tbf']['limit']}; the seed went over the unshaped "
             f"link ({lk['seed']['wall_s']:.2f} s). Time: start to a durable copy (Ferry: the "
             "acknowledgement); x bare: the bare copy's time / this row's (> 1: faster than the bare "
             "copy); wire: bytes the source's veth sent (IP packets with headers); source CPU: the "
             "tool plus qemu-storage-daemon serving its reads (rsync: the client, which reads the "
             "raw image itself) per changed GiB; receiver RSS: ferry receive / qemu-nbd peak, the "
             "rsync daemon and its children sampled every 50 ms. virtnbdbackup: " + lk["virtnbdbackup"] + ".")
    L.append("")
    for s in lk["links"]:
        t = s["tcp_limit"]
        shaping = (f"tbf rate {_rate(s['tbf']['rate_bit_s'])}, burst {s['tbf']['burst_bytes'] >> 10} KiB, "
                   f"limit {s['tbf']['limit_bytes'] >> 10} KiB" if s["tbf"] else "no qdisc")
        check = f"tcp-limit across it: {t['gbit_s']:.3f} Gbit/s"
        if s["tbf"]:
            check += f" ({t['gbit_s'] * 1e9 / s['tbf']['rate_bit_s'] * 100:.0f}% of the rate)"
        L.append(f"#### {s['link']}: {shaping}; {check}; change set {s['change_set']} "
                 f"({s['changed_bytes'] / MIB:.0f} MiB)")
        L.append("")
        L.append("| tool | time | x bare | wire | source CPU s / changed GiB | receiver RSS |")
        L.append("|---|---|---|---|---|---|")
        for r in s["rows"]:
            name = f"**{r['tool']}**" if r["tool"].startswith("Ferry") else r["tool"]
            L.append(f"| {name} | {r['wall_s']:.2f} s | {r['x_vs_bare']:.2f}x | {r['wire_bytes'] / 1e6:.1f} MB | "
                     f"{r['source_cpu_s_per_changed_gib']:.2f} | {r['receiver_peak_rss_mib']:.0f} MiB |")
        L.append("")
    return "\n".join(L) + "\n"


def interval_table(iv):
    L = []
    f = iv["first_after_seed"]
    L.append(f"Long-lived source: `ferry replicate --interval {iv['interval_s']:g}` against one "
             f"`--once` process per RP (zstd {iv['zstd_level']}, median of {iv['repeats']}; --interval "
             "figures from the source's RP log lines: wall = the line's total, CPU = the process's CPU "
             "time between two lines, RSS at the line; --once: the process's wall, CPU and peak RSS; "
             f"the RP's own total in brackets). 1% = {iv['changed_bytes'] / MIB:.0f} MiB.")
    L.append("")
    L.append("| mode | RP | wall per RP | CPU per RP | source RSS | changed |")
    L.append("|---|---|---|---|---|---|")
    R = iv["rows"]
    for key, mode, rp in (("once_empty", "--once", "empty"), ("interval_empty", "--interval", "empty"),
                          ("once_1pct", "--once", "1%"), ("interval_1pct", "--interval", "1%")):
        r = R[key]
        own = f" ({r['rp_total_s'] * 1000:.0f} ms)" if mode == "--once" else ""
        L.append(f"| {mode} | {rp} | {r['wall_s'] * 1000:.0f} ms{own} | {r['cpu_s'] * 1000:.0f} ms | "
                 f"{r['rss_mib']:.0f} MiB | {r['changed_mb']:.1f} MB |")
    b = R["bare_1pct"]
    L.append(f"| bare dirty-extent copy | 1% | {b['wall_s'] * 1000:.0f} ms | {b['cpu_s'] * 1000:.0f} ms | "
             f"{b['rss_mib']:.0f} MiB | |")
    L.append("")
    L.append(f"First RP after the seed: seed {f['seed_wall_s']:.2f} s ({f['seed_changed_mb']:.0f} MB changed), "
             f"then an empty RP started at once waited {f['handshake_s']:.2f} s at the handshake "
             f"(its wall {f['next_wall_s']:.2f} s). Receiver peak RSS {iv['receiver_peak_rss_mib']:.0f} MiB.")
    L.append("")
    return "\n".join(L) + "\n"


def issue15_targets(rep):
    T = []
    lk = rep.get("links_run")
    want = {"1g": 3.2, "100m": 3.0, "unshaped": 2.0}
    if lk:
        for s in lk["links"]:
            if s["link"] not in want:
                continue
            b = best_ferry(s)
            l1 = next((r for r in s["rows"] if r.get("level") in ("1", 1)), None)
            bare = s["rows"][0]["wall_s"]
            meas = f"best fixed ({b['tool']}) {b['x_vs_bare']:.2f}x ({b['wall_s']:.2f} s vs {bare:.2f} s)"
            if l1 and l1 is not b:
                meas += f"; zstd 1 {l1['x_vs_bare']:.2f}x"
            T.append({"target": f"{s['change_set']} over {s['link']}: >= {want[s['link']]}x faster than the bare copy",
                      "measured": meas, "met": b["x_vs_bare"] >= want[s["link"]]})
        rss = max(r["receiver_peak_rss_mib"] for s in lk["links"] for r in s["rows"] if r["tool"].startswith("Ferry"))
        T.append({"target": "receiver RSS < 256 MiB in every Ferry row", "measured": f"{rss:.0f} MiB",
                  "met": rss < 256})
        g1 = next((s for s in lk["links"] if s["link"] == "1g"), None)
        if g1:
            cells = ", ".join(f"{r['tool']} {r['source_cpu_s_per_changed_gib']:.2f}" for r in g1["rows"]
                              if r["tool"].startswith("Ferry"))
            T.append({"target": "source CPU s per changed GiB at 1 Gbit/s (auto: no more than zstd 1)",
                      "measured": cells + " (no auto yet: reported only)", "met": None})
        T.append({"target": "auto within 10% of the best fixed level per link",
                  "measured": "not measured: --zstd-level auto does not exist yet", "met": None})
    iv = rep.get("interval")
    if iv:
        f = iv["first_after_seed"]
        disk_gib = rep["disk"]["size_bytes"] / GIB
        T.append({"target": f"first RP after the seed of a 4 GiB disk waits < 1 s (disk here: {disk_gib:g} GiB)",
                  "measured": f"{f['handshake_s']:.2f} s (seed {f['seed_wall_s']:.2f} s)",
                  "met": f["handshake_s"] < 1.0 if disk_gib >= 4 else None})
        R = iv["rows"]
        x = R["bare_1pct"]["wall_s"] / R["interval_1pct"]["wall_s"]
        T.append({"target": "1% in --interval mode >= 1.5x faster than the bare copy",
                  "measured": f"{x:.2f}x ({R['interval_1pct']['wall_s']:.3f} s vs {R['bare_1pct']['wall_s']:.3f} s)",
                  "met": x >= 1.5})
        e = R["interval_empty"]["wall_s"]
        T.append({"target": "empty RP in --interval mode < 50 ms", "measured": f"{e * 1000:.0f} ms",
                  "met": e < 0.050})
    return T


def targets_table(T):
    L = ["Issue 15 targets (met: yes / NO / — when this run cannot decide).", "",
         "| target | measured | met |", "|---|---|---|"]
    for t in T:
        met = "—" if t["met"] is None else ("yes" if t["met"] else "NO")
        L.append(f"| {t['target']} | {t['measured']} | {met} |")
    return "\n".join(L) + "\n\n"


def link_plots(lk, outdir):
    for s in lk["links"]:
        dat = os.path.join(outdir, f"link-{s['link']}.dat")
        with open(dat, "w") as f:
            for i, r in enumerate(s["rows"]):
                c = 1 if r["tool"].startswith("Ferry") else 2
                f.write(f'{i} "{r["tool"]}" {r["wall_s"]:.4f} {c} "{r["x_vs_bare"]:.2f}x"\n')
        gp = os.path.join(outdir, f"link-{s['link']}.gp")
        title = (f"{s['change_set']} over {s['link']} (tcp-limit {s['tcp_limit']['gbit_s']:.2f} Gbit/s): "
                 "time to a durable copy, lower is better; label: x the bare copy")
        with open(gp, "w") as f:
            f.write(f"""set terminal pngcairo size 1000,550 font 'DejaVu Sans,11'
set output '{outdir}/link-{s['link']}.png'
set title "{title}"
set style fill solid 0.85 border -1
set boxwidth 0.7
set yrange [0:*]
set ylabel 'wall time (s)'
set grid ytics
set xtics rotate by -20
set key off
set palette defined (1 '#1f77b4', 2 '#aaaaaa')
unset colorbox
plot '{dat}' using 1:3:4:xtic(2) with boxes lc palette, '' using 1:3:5 with labels offset 0,0.8
""")
        sh("gnuplot", gp)
