"""The loopback scenarios: Ferry and the NBD peers per change set, TLS against plaintext,
virtnbdbackup through libvirt, scaling with the disk size."""
import os, random, shutil, statistics, subprocess, time
from .data import MixedData, make_scattered
from .ferry import Receiver, ferry_rp, make_pki
from .peers import RsyncDaemon, dirty_extent_copy, nbdcopy_whole, virtnbdbackup
from .procs import GIB, log, out, sh
from .qemu import Domain, Qsd


def copy_image(src, dst):
    sh("cp", "--sparse=always", src, dst)


def ferry_and_nbd_peers(bins, top, base_img, sets, level, peers):
    wd = os.path.join(top, "ferry")
    os.makedirs(wd)
    img = os.path.join(wd, "disk.qcow2")
    copy_image(base_img, img)
    qsd = Qsd(wd, img)
    rcv = Receiver(bins["ferry"], os.path.join(top, "store"), os.path.join(wd, "receive.log"))
    rsyncd = RsyncDaemon(top) if peers else None
    raw = os.path.join(top, "src.raw")
    dirty_dest = os.path.join(top, "dirty-dest.raw")
    res = {"ferry": {}, "nbdcopy": {}, "rsync": {}, "dirty_copy": {}, "write_through_qemu_s": {}}
    try:
        log("Ferry: full RP")
        res["ferry"]["full"] = ferry_rp(bins, qsd, rcv, os.path.join(wd, "state"), level)
        if peers:
            log("nbdcopy: whole disk (state 0)")
            res["nbdcopy"]["full"] = nbdcopy_whole(qsd, raw)
            log("rsync: full copy (state 0)")
            res["rsync"]["full"] = rsyncd.push(raw)
        for name, path, changed in sets:
            bitmap = f"bench-{name}"
            qsd.q.cmd("block-dirty-bitmap-add", node="disk0", name=bitmap)
            qsd.export("w", writable=True)
            t0 = time.monotonic()
            sh(bins["nbd-apply"], qsd.uri("w"), path, stdout=subprocess.DEVNULL)
            res["write_through_qemu_s"][name] = time.monotonic() - t0
            qsd.unexport("w")
            qsd.q.cmd("block-dirty-bitmap-disable", node="disk0", name=bitmap)
            if peers:
                log(f"dirty-extent copy: {name}")
                res["dirty_copy"][name] = dirty_extent_copy(bins, qsd, bitmap, dirty_dest)
            qsd.q.cmd("block-dirty-bitmap-remove", node="disk0", name=bitmap)
            log(f"Ferry: incremental RP, {name}")
            res["ferry"][name] = ferry_rp(bins, qsd, rcv, os.path.join(wd, "state"), level)
            res["ferry"][name]["changed_bytes"] = changed
            if peers:
                log(f"nbdcopy: whole disk, {name}")
                res["nbdcopy"][name] = nbdcopy_whole(qsd, raw)
                log(f"rsync: {name}")
                res["rsync"][name] = rsyncd.push(raw)
    finally:
        if rsyncd:
            rsyncd.stop()
        rcv.stop()
        qsd.stop()
        for p in (raw, dirty_dest):
            if os.path.exists(p):
                os.unlink(p)
        if rsyncd:
            shutil.rmtree(rsyncd.dir, ignore_errors=True)
        shutil.rmtree(os.path.join(top, "store"), ignore_errors=True)
        os.unlink(img)
    return res


def tls_compare(bins, top, base_img, sets, level, repeats=3):
    """The 10% scattered change set as one incremental RP, plaintext and mutual TLS 1.3
    alternating, each on a fresh copy of the image and a fresh store (full RP first)."""
    pki = make_pki(top)
    name, path, changed = next(x for x in sets if x[0] == "10pct")
    runs = {"plaintext": [], "tls": []}
    for rep_i in range(repeats):
        for mode in ("plaintext", "tls"):
            wd = os.path.join(top, f"tls-{mode}-{rep_i}")
            os.makedirs(wd)
            img = os.path.join(wd, "disk.qcow2")
            copy_image(base_img, img)
            qsd = Qsd(wd, img)
            p = pki if mode == "tls" else None
            rcv = Receiver(bins["ferry"], os.path.join(wd, "store"), os.path.join(wd, "receive.log"), p)
            try:
                ferry_rp(bins, qsd, rcv, os.path.join(wd, "state"), level, pki=p)
                qsd.export("w", writable=True)
                sh(bins["nbd-apply"], qsd.uri("w"), path, stdout=subprocess.DEVNULL)
                qsd.unexport("w")
                log(f"TLS vs plaintext: {name} over {mode}, run {rep_i + 1}/{repeats}")
                r = ferry_rp(bins, qsd, rcv, os.path.join(wd, "state"), level, pki=p)
                runs[mode].append({k: r[k] for k in ("wall_s", "source_cpu_s", "receiver_cpu_s",
                                                      "source_peak_rss_mib", "receiver_peak_rss_mib")})
            finally:
                rcv.stop()
                qsd.stop()
                shutil.rmtree(wd, ignore_errors=True)
    med = {m: statistics.median(x["wall_s"] for x in v) for m, v in runs.items()}
    cpu = {m: statistics.median(x["source_cpu_s"] + x["receiver_cpu_s"] for x in v)
           for m, v in runs.items()}
    return {"change_set": name, "changed_bytes": changed, "repeats": repeats, "runs": runs,
            "median_wall_s": med, "median_cpu_s": cpu, "ratio": med["tls"] / med["plaintext"]}


def virtnbdbackup_runs(bins, top, base_img, sets, compress):
    tag = "lz4" if compress else "plain"
    wd = os.path.join(top, f"vnb-{tag}")
    os.makedirs(wd)
    img = os.path.join(wd, "disk.qcow2")
    copy_image(base_img, img)
    outdir = os.path.join(wd, "backup")
    res = {}
    dom = Domain(f"ferrybench-{os.getpid()}-{tag}", img, wd)
    try:
        log(f"virtnbdbackup ({tag}): full")
        res["full"] = virtnbdbackup(dom, "full", outdir, compress)
        for name, path, changed in sets:
            dom.apply(bins["nbd-apply"], path)
            log(f"virtnbdbackup ({tag}): incremental, {name}")
            res[name] = virtnbdbackup(dom, "inc", outdir, compress)
        res["backup_dir_bytes"] = int(out("du", "-sb", outdir).split()[0])
    finally:
        dom.destroy()
        shutil.rmtree(wd, ignore_errors=True)
    return res


def scaling(bins, top, sizes_gib, n_blocks, seed, level, repeats=3):
    """The same change set (same blocks of data) on sparse disks of each size."""
    res = []
    for gib in sizes_gib:
        wd = os.path.join(top, f"scale-{gib}g")
        os.makedirs(wd)
        img = os.path.join(wd, "disk.qcow2")
        sh("qemu-img", "create", "-q", "-f", "qcow2", img, str(gib * GIB))
        mix = MixedData(seed + 7)  # same data for every size
        path = os.path.join(wd, "changes.bin")
        changed = make_scattered(path, gib * GIB, 0, mix, random.Random(seed + 11), n_blocks=n_blocks)
        qsd = Qsd(wd, img)
        rcv = Receiver(bins["ferry"], os.path.join(wd, "store"), os.path.join(wd, "receive.log"))
        runs = []
        try:
            log(f"scaling: {gib} GiB sparse disk")
            full = ferry_rp(bins, qsd, rcv, os.path.join(wd, "state"), level)
            for _ in range(repeats):
                qsd.export("w", writable=True)
                sh(bins["nbd-apply"], qsd.uri("w"), path, stdout=subprocess.DEVNULL)
                qsd.unexport("w")
                runs.append(ferry_rp(bins, qsd, rcv, os.path.join(wd, "state"), level))
        finally:
            rcv.stop()
            qsd.stop()
            shutil.rmtree(wd, ignore_errors=True)
        walls = [r["wall_s"] for r in runs]
        med = statistics.median(walls)
        res.append({"disk_gib": gib, "changed_bytes": changed, "full_wall_s": full["wall_s"],
                    "incremental_wall_s": walls, "median_wall_s": med,
                    "s_per_changed_gb": med / (changed / 1e9),
                    "source_peak_rss_mib": max(r["source_peak_rss_mib"] for r in runs),
                    "receiver_peak_rss_mib": max(r["receiver_peak_rss_mib"] for r in runs)})
    return res
