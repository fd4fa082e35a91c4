// The test-failover rewrite of a domain XML (tools/vm_xml.h): each rule on a realistic
// source definition, checked by parsing the result (libxml2 XPath), never by string search.
#include <catch2/catch.hpp>
#include <libxml/parser.h>
#include <libxml/xpath.h>

#include <memory>
#include <string>

#include "vm_xml.h"

using namespace ferry::tools;

namespace {

const char* kSource = R"(<domain type='kvm' id='7'>
  <name>web-01</name>
  <uuid>0b5a1c3e-1111-4222-8333-444455556666</uuid>
  <title>web server</title>
  <memory unit='KiB'>1048576</memory>
  <vcpu>2</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>/var/lib/guest/vmlinuz</kernel>
    <initrd>/var/lib/guest/initrd.gz</initrd>
    <nvram>/var/lib/libvirt/qemu/nvram/web-01_VARS.fd</nvram>
  </os>
  <seclabel type='dynamic' model='dac'/>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='none'/>
      <source file='/images/web-01-vda.qcow2'/>
      <backingStore type='file'><format type='qcow2'/><source file='/images/base.qcow2'/></backingStore>
      <target dev='vda' bus='virtio'/>
      <boot order='1'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x04' function='0x0'/>
    </disk>
    <disk type='block' device='disk'>
      <driver name='qemu' type='raw'/>
      <source dev='/dev/vg0/web-01-data'/>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'>
      <source file='/images/scratch.raw'/>
      <target dev='vdz' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <source file='/iso/install.iso'/>
      <target dev='sda' bus='sata'/>
      <readonly/>
    </disk>
    <interface type='network'>
      <mac address='52:54:00:aa:bb:cc'/>
      <source network='prod'/>
      <target dev='vnet3'/>
      <model type='virtio'/>
    </interface>
    <interface type='bridge'>
      <mac address='52:54:00:aa:bb:cd'/>
      <source bridge='br-backup'/>
      <model type='virtio'/>
    </interface>
    <serial type='file'><source path='/var/log/guest/console.log'/><target port='0'/></serial>
    <serial type='unix'><source mode='bind' path='/run/guest/ctl.sock'/><target port='1'/></serial>
    <console type='file'><source path='/var/log/guest/console.log'/><target type='serial' port='0'/></console>
    <graphics type='vnc' port='5901' autoport='no' listen='10.0.0.5' passwd='x'>
      <listen type='address' address='10.0.0.5'/>
    </graphics>
    <graphics type='egl-headless'/>
    <hostdev mode='subsystem' type='pci' managed='yes'>
      <source><address domain='0x0000' bus='0x3b' slot='0x00' function='0x0'/></source>
    </hostdev>
    <filesystem type='mount'><source dir='/srv/share'/><target dir='share'/></filesystem>
  </devices>
</domain>
)";

struct Parsed {
  struct DocFree {
    void operator()(xmlDocPtr d) const { xmlFreeDoc(d); }
  };
  struct CtxFree {
    void operator()(xmlXPathContextPtr c) const { xmlXPathFreeContext(c); }
  };
  std::unique_ptr<xmlDoc, DocFree> doc;
  std::unique_ptr<xmlXPathContext, CtxFree> ctx;
  explicit Parsed(const std::string& xml)
      : doc(xmlReadMemory(xml.data(), int(xml.size()), "t.xml", nullptr, XML_PARSE_NONET)) {
    REQUIRE(doc);
    ctx.reset(xmlXPathNewContext(doc.get()));
  }
  int count(const char* xpath) const {
    xmlXPathObjectPtr o = xmlXPathEvalExpression(reinterpret_cast<const xmlChar*>(xpath), ctx.get());
    REQUIRE(o != nullptr);
    const int n = o->nodesetval ? o->nodesetval->nodeNr : 0;
    xmlXPathFreeObject(o);
    return n;
  }
  std::string str(const char* xpath) const {
    const std::string expr = std::string("string(") + xpath + ")";
    xmlXPathObjectPtr o =
        xmlXPathEvalExpression(reinterpret_cast<const xmlChar*>(expr.c_str()), ctx.get());
    REQUIRE(o != nullptr);
    std::string s = o->stringval ? reinterpret_cast<const char*>(o->stringval) : "";
    xmlXPathFreeObject(o);
    return s;
  }
};

VmXmlRewrite opts() {
  VmXmlRewrite r;
  r.uuid = "9f2a6c0e-0000-4abc-8def-0123456789ab";
  r.disks["vda"] = {"/store/g/tests/run-1/vda.qcow2", "/tmp/fo/vda.sock"};
  r.disks["vdb"] = {"/store/g/tests/run-1/vdb.qcow2", "/tmp/fo/vdb.sock"};
  r.chardev_dir = "/tmp/fo";
  return r;
}

}  // namespace

TEST_CASE("vm xml: name, UUID and runtime leftovers") {
  auto r = rewrite_vm_xml(kSource, opts());
  REQUIRE(r.is_ok());
  CHECK(r->source_name == "web-01");
  CHECK(r->name == "web-01-test");
  Parsed x(r->xml);
  CHECK(x.str("/domain/name") == "web-01-test");
  CHECK(x.str("/domain/uuid") == "9f2a6c0e-0000-4abc-8def-0123456789ab");
  CHECK(x.count("/domain/@id") == 0);
  CHECK(x.count("/domain/title") == 0);
  CHECK(x.count("//seclabel") == 0);
  CHECK(x.str("/domain/@type") == "kvm");  // the hypervisor type is the user's to change
  CHECK(x.str("/domain/memory") == "1048576");

  VmXmlRewrite o = opts();
  o.name_suffix = "-dr1";
  CHECK(rewrite_vm_xml(kSource, o)->name == "web-01-dr1");
}

TEST_CASE("vm xml: replicated disks run on overlays backed by the exports") {
  auto r = rewrite_vm_xml(kSource, opts());
  REQUIRE(r.is_ok());
  Parsed x(r->xml);
  CHECK(x.count("/domain/devices/disk[@device='disk']") == 2);
  for (const char* dev : {"vda", "vdb"}) {
    const std::string d = std::string("/domain/devices/disk[target/@dev='") + dev + "']";
    CHECK(x.str((d + "/@type").c_str()) == "file");
    CHECK(x.str((d + "/driver/@type").c_str()) == "qcow2");
    CHECK(x.str((d + "/source/@file").c_str()) ==
          std::string("/store/g/tests/run-1/") + dev + ".qcow2");
    CHECK(x.str((d + "/backingStore/@type").c_str()) == "network");
    CHECK(x.str((d + "/backingStore/format/@type").c_str()) == "raw");
    CHECK(x.str((d + "/backingStore/source/@protocol").c_str()) == "nbd");
    CHECK(x.str((d + "/backingStore/source/host/@socket").c_str()) ==
          std::string("/tmp/fo/") + dev + ".sock");
    CHECK(x.count((d + "/backingStore/backingStore").c_str()) == 1);  // end of the chain
    CHECK(x.count((d + "/source/@dev").c_str()) == 0);
  }
  // Guest-visible parts stay: boot order and PCI address.
  CHECK(x.str("/domain/devices/disk[target/@dev='vda']/boot/@order") == "1");
  CHECK(x.str("/domain/devices/disk[target/@dev='vda']/address/@slot") == "0x04");
  // Nothing of the source's images is left.
  CHECK(r->xml.find("/images/") == std::string::npos);
  CHECK(r->xml.find("/dev/vg0") == std::string::npos);
  // The disk the RP does not hold is dropped, the CD-ROM ejected; both reported.
  CHECK(x.count("/domain/devices/disk[target/@dev='vdz']") == 0);
  CHECK(x.count("/domain/devices/disk[@device='cdrom']") == 1);
  CHECK(x.count("/domain/devices/disk[@device='cdrom']/source") == 0);
  CHECK(r->xml.find("install.iso") == std::string::npos);
  int dropped = 0;
  for (const auto& n : r->notes) dropped += n.find("vdz") != std::string::npos;
  CHECK(dropped == 1);
}

TEST_CASE("vm xml: a disk of the RP missing from the XML is an error naming it") {
  VmXmlRewrite o = opts();
  o.disks["vdq"] = {"/x.qcow2", "/x.sock"};
  auto r = rewrite_vm_xml(kSource, o);
  REQUIRE_FALSE(r.is_ok());
  CHECK(r.status().message().find("vdq") != std::string::npos);
}

TEST_CASE("vm xml: NICs mapped or removed, MACs renewed") {
  auto r = rewrite_vm_xml(kSource, opts());
  REQUIRE(r.is_ok());
  CHECK(Parsed(r->xml).count("/domain/devices/interface") == 0);

  VmXmlRewrite o = opts();
  o.network_map["prod"] = "dr-isolated";
  o.network_map["br-backup"] = "br-test";
  r = rewrite_vm_xml(kSource, o);
  REQUIRE(r.is_ok());
  Parsed x(r->xml);
  CHECK(x.count("/domain/devices/interface") == 2);
  CHECK(x.str("/domain/devices/interface[@type='network']/source/@network") == "dr-isolated");
  CHECK(x.str("/domain/devices/interface[@type='bridge']/source/@bridge") == "br-test");
  CHECK(x.count("//interface/mac") == 0);
  CHECK(x.count("//interface/target") == 0);
  CHECK(x.str("/domain/devices/interface[@type='network']/model/@type") == "virtio");

  o.network_map.erase("br-backup");
  CHECK(Parsed(rewrite_vm_xml(kSource, o)->xml).count("/domain/devices/interface") == 1);
}

TEST_CASE("vm xml: host-bound devices and paths") {
  auto r = rewrite_vm_xml(kSource, opts());
  REQUIRE(r.is_ok());
  Parsed x(r->xml);
  CHECK(x.count("//hostdev") == 0);
  CHECK(x.count("//filesystem") == 0);
  CHECK(x.count("//graphics[@type='egl-headless']") == 0);
  CHECK(x.str("//graphics[@type='vnc']/@autoport") == "yes");
  CHECK(x.count("//graphics/@passwd") == 0);
  CHECK(x.count("//graphics/@port") == 0);
  CHECK(x.str("//graphics/listen/@address") == "127.0.0.1");
  CHECK(x.count("/domain/os/nvram") == 0);
  // Character devices move into chardev_dir; <console> keeps sharing <serial>'s file.
  CHECK(r->chardev_paths.size() == 2);
  const std::string console = r->chardev_paths.at("/var/log/guest/console.log");
  const std::string ctl = r->chardev_paths.at("/run/guest/ctl.sock");
  CHECK(console.rfind("/tmp/fo/", 0) == 0);
  CHECK(ctl == "/tmp/fo/1-ctl.sock");
  CHECK(x.str("/domain/devices/serial[target/@port='0']/source/@path") == console);
  CHECK(x.str("/domain/devices/console/source/@path") == console);
  CHECK(x.str("/domain/devices/serial[target/@port='1']/source/@path") == ctl);
  // Direct kernel boot keeps its paths, which the caller must find on this host.
  CHECK(r->required_paths ==
        std::vector<std::string>{"/var/lib/guest/vmlinuz", "/var/lib/guest/initrd.gz"});
}

TEST_CASE("vm xml: bad input is refused with what is wrong") {
  auto msg = [](const std::string& xml, VmXmlRewrite o) {
    auto r = rewrite_vm_xml(xml, o);
    REQUIRE_FALSE(r.is_ok());
    return r.status().message();
  };
  CHECK(msg("", opts()).find("empty") != std::string::npos);
  CHECK(msg("<domain><name>x</name>", opts()).find("well-formed") != std::string::npos);
  CHECK(msg("<network><name>x</name></network>", opts()).find("<domain>") != std::string::npos);
  CHECK(msg("<domain type='qemu'><devices/></domain>", opts()).find("<name>") != std::string::npos);
  VmXmlRewrite o = opts();
  o.uuid = "not-a-uuid";
  CHECK(msg(kSource, o).find("UUID") != std::string::npos);
  o = opts();
  o.name_suffix = "/../x";
  CHECK(msg(kSource, o).find("domain name") != std::string::npos);
  CHECK(msg(std::string(300 * 1024, ' '), opts()).find("bytes") != std::string::npos);
  // A domain without disks and devices: fine when the RP holds none of them.
  o = opts();
  o.disks.clear();
  auto r = rewrite_vm_xml("<domain type='qemu'><name>bare</name></domain>", o);
  REQUIRE(r.is_ok());
  CHECK(Parsed(r->xml).str("/domain/uuid") == o.uuid);
}

TEST_CASE("vm xml: failover overlays backed by the replica images (raw files)") {
  VmXmlRewrite o = opts();
  o.name_suffix = "";
  for (const char* dev : {"vda", "vdb"})
    o.disks[dev] = {std::string("/store/g/failover/") + dev + ".qcow2", "",
                    std::string("/store/g/replica/") + dev + ".img"};
  auto r = rewrite_vm_xml(kSource, o);
  REQUIRE(r.is_ok());
  CHECK(r->name == "web-01");
  Parsed x(r->xml);
  for (const char* dev : {"vda", "vdb"}) {
    const std::string d = std::string("/domain/devices/disk[target/@dev='") + dev + "']";
    CHECK(x.str((d + "/driver/@type").c_str()) == "qcow2");
    CHECK(x.str((d + "/source/@file").c_str()) ==
          std::string("/store/g/failover/") + dev + ".qcow2");
    CHECK(x.str((d + "/backingStore/@type").c_str()) == "file");
    CHECK(x.str((d + "/backingStore/format/@type").c_str()) == "raw");
    CHECK(x.str((d + "/backingStore/source/@file").c_str()) ==
          std::string("/store/g/replica/") + dev + ".img");
    CHECK(x.count((d + "/backingStore/source/host").c_str()) == 0);
    CHECK(x.count((d + "/backingStore/backingStore").c_str()) == 1);  // end of the chain
  }
  CHECK(x.str("/domain/description").find("Ferry failover of web-01") == 0);
}
