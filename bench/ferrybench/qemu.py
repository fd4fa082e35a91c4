"""QEMU: a QMP client, qemu-storage-daemon running the test disk, and an idle libvirt domain for
virtnbdbackup."""
import json, os, socket, subprocess, time
from .procs import VIRSH, out, sh


class Qmp:
    def __init__(self, path):
        self.s = socket.socket(socket.AF_UNIX)
        self.s.connect(path)
        self.f = self.s.makefile("rwb")
        self.f.readline()
        self.cmd("qmp_capabilities")

    def cmd(self, _cmd, **args):
        name = _cmd
        self.f.write(json.dumps({"execute": name, "arguments": args}).encode() + b"\n")
        self.f.flush()
        while True:
            m = json.loads(self.f.readline())
            if "event" in m:
                continue
            if "error" in m:
                raise RuntimeError(f"QMP {name}: {m['error']['desc']}")
            return m["return"]

    def close(self):
        self.s.close()


class Qsd:
    """qemu-storage-daemon running one qcow2 disk (node disk0), an NBD server on a unix socket,
    one QMP monitor for Ferry and one for the harness."""
    def __init__(self, workdir, image):
        self.dir = workdir
        self.image = image
        self.qmp = os.path.join(workdir, "qmp.sock")
        self.qmp2 = os.path.join(workdir, "qmp-bench.sock")
        self.nbd = os.path.join(workdir, "nbd.sock")
        self.proc = subprocess.Popen(
            ["qemu-storage-daemon",
             "--blockdev", f"driver=file,filename={image},node-name=file0",
             "--blockdev", "driver=qcow2,file=file0,node-name=disk0",
             "--nbd-server", f"addr.type=unix,addr.path={self.nbd}",
             "--chardev", f"socket,id=qmp0,path={self.qmp},server=on,wait=off",
             "--monitor", "chardev=qmp0",
             "--chardev", f"socket,id=qmp1,path={self.qmp2},server=on,wait=off",
             "--monitor", "chardev=qmp1"],
            stdout=open(os.path.join(workdir, "qsd.log"), "w"), stderr=subprocess.STDOUT)
        deadline = time.time() + 20
        while not (os.path.exists(self.qmp2) and os.path.exists(self.nbd)):
            if time.time() > deadline or self.proc.poll() is not None:
                raise RuntimeError("qemu-storage-daemon did not come up")
            time.sleep(0.05)
        self.q = Qmp(self.qmp2)

    def uri(self, name):
        return f"nbd+unix:///{name}?socket={self.nbd}"

    def export(self, name, writable=False, bitmap=None):
        args = {"type": "nbd", "id": name, "node-name": "disk0", "name": name, "writable": writable}
        if bitmap:
            args["bitmaps"] = [bitmap]
        self.q.cmd("block-export-add", **args)

    def unexport(self, name):
        self.q.cmd("block-export-del", id=name)
        for _ in range(200):
            if not any(e["id"] == name for e in self.q.cmd("query-block-exports")):
                return
            time.sleep(0.01)

    def stop(self):
        self.q.close()
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Domain:
    """A transient libvirt domain idling without an OS under TCG, using one qcow2 disk. Its
    virtio-blk frontend shares write permission (qemu:override share-rw) so that the harness can
    write the change files through a writable NBD export of the same node while it runs."""
    def __init__(self, name, image, workdir):
        self.name = name
        self.xml = os.path.join(workdir, f"{name}.xml")
        with open(self.xml, "w") as f:
            f.write(f"""<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{name}</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>
  <on_poweroff>destroy</on_poweroff><on_reboot>restart</on_reboot><on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2' cache='none'/>
      <source file='{image}'/><target dev='vda' bus='virtio'/><alias name='ua-bench0'/></disk>
    <controller type='usb' model='none'/><memballoon model='none'/>
    <video><model type='none'/></video>
  </devices>
  <qemu:override><qemu:device alias='ua-bench0'><qemu:frontend>
    <qemu:property name='share-rw' type='bool' value='true'/>
  </qemu:frontend></qemu:device></qemu:override>
</domain>
""")
        subprocess.run(VIRSH + ["destroy", name], capture_output=True)
        sh(*VIRSH, "create", self.xml, stdout=subprocess.DEVNULL)
        self.pid = int(open(f"/run/libvirt/qemu/{name}.pid").read())
        self.nbd = os.path.join(workdir, f"{name}-w.sock")
        nodes = json.loads(self.qmp("query-named-block-nodes", flat=True))["return"]
        self.node = next(n["node-name"] for n in nodes if n["drv"] == "qcow2")

    def qmp(self, _cmd, **args):
        return out(*VIRSH, "qemu-monitor-command", self.name,
                   json.dumps({"execute": _cmd, "arguments": args}))

    def apply(self, nbd_apply, change_file):
        """Writes a change file through a writable NBD export; the server is stopped again
        because libvirt's pull-mode backup starts its own."""
        self.qmp("nbd-server-start", addr={"type": "unix", "data": {"path": self.nbd}})
        self.qmp("block-export-add", type="nbd", id="w", **{"node-name": self.node}, name="w",
                 writable=True)
        t0 = time.monotonic()
        sh(nbd_apply, f"nbd+unix:///w?socket={self.nbd}", change_file, stdout=subprocess.DEVNULL)
        dt = time.monotonic() - t0
        self.qmp("block-export-del", id="w")
        time.sleep(0.1)
        self.qmp("nbd-server-stop")
        return dt

    def destroy(self):
        subprocess.run(VIRSH + ["destroy", self.name], capture_output=True)
