// The test-failover rewrite of a domain XML (vm_xml.h). Works on the parsed tree (libxml2),
// never on the text: attribute order, quoting, namespaces and comments are libxml2's business.
#include "vm_xml.h"

#include <libxml/parser.h>
#include <libxml/tree.h>
#include <libxml/xpath.h>

#include <cctype>
#include <memory>
#include <set>

#include "ferry/site/rp.h"

namespace ferry::tools {
namespace {

struct DocFree {
  void operator()(xmlDocPtr d) const { xmlFreeDoc(d); }
};
struct CtxFree {
  void operator()(xmlXPathContextPtr c) const { xmlXPathFreeContext(c); }
};
struct ObjFree {
  void operator()(xmlXPathObjectPtr o) const { xmlXPathFreeObject(o); }
};
using Doc = std::unique_ptr<xmlDoc, DocFree>;

Status bad(const std::string& what) { return Status::error(Errc::invalid_argument, what); }

const xmlChar* X(const char* s) { return reinterpret_cast<const xmlChar*>(s); }

// The nodes an XPath expression selects (relative to `at`), in document order. Collected
// before the caller changes the tree, so removing one never invalidates the walk.
std::vector<xmlNodePtr> select(xmlXPathContextPtr ctx, const char* xpath, xmlNodePtr at) {
  ctx->node = at;
  std::unique_ptr<xmlXPathObject, ObjFree> o(xmlXPathEvalExpression(X(xpath), ctx));
  std::vector<xmlNodePtr> out;
  if (o && o->nodesetval != nullptr)
    for (int i = 0; i < o->nodesetval->nodeNr; ++i) out.push_back(o->nodesetval->nodeTab[i]);
  return out;
}

xmlNodePtr first(xmlXPathContextPtr ctx, const char* xpath, xmlNodePtr at) {
  auto n = select(ctx, xpath, at);
  return n.empty() ? nullptr : n.front();
}

std::string attr(xmlNodePtr n, const char* name) {
  xmlChar* v = xmlGetProp(n, X(name));
  if (v == nullptr) return {};
  std::string s(reinterpret_cast<const char*>(v));
  xmlFree(v);
  return s;
}

std::string text_of(xmlNodePtr n) {
  xmlChar* v = xmlNodeGetContent(n);
  if (v == nullptr) return {};
  std::string s(reinterpret_cast<const char*>(v));
  xmlFree(v);
  return s;
}

void set_attr(xmlNodePtr n, const char* name, const std::string& value) {
  xmlSetProp(n, X(name), X(value.c_str()));
}

void set_text(xmlNodePtr n, const std::string& value) {
  // xmlNodeSetContent takes entity-encoded text; xmlEncodeSpecialChars makes it so.
  xmlChar* enc = xmlEncodeSpecialChars(n->doc, X(value.c_str()));
  xmlNodeSetContent(n, enc);
  xmlFree(enc);
}

void remove(xmlNodePtr n) {
  xmlUnlinkNode(n);
  xmlFreeNode(n);
}

void remove_all(xmlXPathContextPtr ctx, const char* xpath, xmlNodePtr at) {
  for (xmlNodePtr n : select(ctx, xpath, at)) remove(n);
}

xmlNodePtr add_child(xmlNodePtr parent, const char* name) {
  return xmlNewChild(parent, nullptr, X(name), nullptr);
}

bool valid_uuid(const std::string& u) {
  if (u.size() != 36) return false;
  for (std::size_t i = 0; i < u.size(); ++i) {
    const bool dash = i == 8 || i == 13 || i == 18 || i == 23;
    if (dash ? u[i] != '-' : !std::isxdigit(static_cast<unsigned char>(u[i]))) return false;
  }
  return true;
}

// libvirt's own rule for domain names is loose; ours keeps them usable as file names too.
bool valid_domain_name(const std::string& n) {
  if (n.empty() || n.size() > 200) return false;
  for (char c : n)
    if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_' || c == '.'))
      return false;
  return true;
}

// Disks: each replicated disk runs on its overlay, whose backing chain (the RP's export over
// NBD) is spelled out so libvirt never probes the image for it. Disks the RP does not hold
// are dropped (a CD-ROM keeps its drive, empty).
Status rewrite_disks(xmlXPathContextPtr ctx, xmlNodePtr devices, const VmXmlRewrite& r,
                     VmXmlResult& out) {
  std::set<std::string> seen;
  for (xmlNodePtr disk : select(ctx, "disk", devices)) {
    xmlNodePtr target = first(ctx, "target", disk);
    const std::string dev = target ? attr(target, "dev") : "";
    const std::string device = attr(disk, "device").empty() ? "disk" : attr(disk, "device");
    auto it = r.disks.find(dev);
    if (it == r.disks.end()) {
      if (device == "cdrom" || device == "floppy") {
        remove_all(ctx, "source|backingStore", disk);
        out.notes.push_back(device + " " + dev + ": ejected (its medium is a host path of the source)");
        continue;
      }
      remove(disk);
      out.notes.push_back("disk " + (dev.empty() ? std::string("(no target)") : dev) +
                          ": removed, the recovery point does not hold it");
      continue;
    }
    seen.insert(dev);
    // Only what the overlay needs: the driver, the source, the chain, the target and the
    // guest-visible parts (address, boot order, serial) stay as the source had them.
    remove_all(ctx, "source|backingStore|driver|alias|mirror|auth|encryption|reservations",
               disk);
    set_attr(disk, "type", "file");
    set_attr(disk, "device", "disk");
    xmlNodePtr driver = xmlNewNode(nullptr, X("driver"));
    set_attr(driver, "name", "qemu");
    set_attr(driver, "type", "qcow2");
    xmlAddPrevSibling(target, driver);
    xmlNodePtr source = xmlNewNode(nullptr, X("source"));
    set_attr(source, "file", it->second.overlay);
    xmlAddPrevSibling(target, source);
    xmlNodePtr chain = xmlNewNode(nullptr, X("backingStore"));
    xmlAddPrevSibling(target, chain);
    if (!it->second.backing_file.empty()) {
      set_attr(chain, "type", "file");
      set_attr(add_child(chain, "format"), "type", "raw");
      set_attr(add_child(chain, "source"), "file", it->second.backing_file);
      add_child(chain, "backingStore");
      continue;
    }
    set_attr(chain, "type", "network");
    set_attr(add_child(chain, "format"), "type", "raw");
    xmlNodePtr nsrc = add_child(chain, "source");
    set_attr(nsrc, "protocol", "nbd");
    xmlNodePtr host = add_child(nsrc, "host");
    set_attr(host, "transport", "unix");
    set_attr(host, "socket", it->second.nbd_socket);
    add_child(chain, "backingStore");  // the export is the end of the chain
  }
  for (const auto& [dev, d] : r.disks)
    if (seen.count(dev) == 0)
      return bad("disk " + dev + " of the recovery point has no <disk> with target dev='" + dev +
                 "' in the domain XML");
  return Status::ok();
}

// NICs: mapped to a network (or bridge) of this site, or removed. The MAC is dropped so that
// libvirt picks a new one: the source VM may still run on a network the two share.
void rewrite_nics(xmlXPathContextPtr ctx, xmlNodePtr devices, const VmXmlRewrite& r,
                  VmXmlResult& out) {
  int i = 0;
  for (xmlNodePtr nic : select(ctx, "interface", devices)) {
    const std::string type = attr(nic, "type");
    xmlNodePtr src = first(ctx, "source", nic);
    std::string from;
    if (src && type == "network") from = attr(src, "network");
    if (src && type == "bridge") from = attr(src, "bridge");
    auto it = from.empty() ? r.network_map.end() : r.network_map.find(from);
    const std::string what = "NIC " + std::to_string(i++) + " (" + type +
                             (from.empty() ? "" : " " + from) + ")";
    if (it == r.network_map.end()) {
      remove(nic);
      out.notes.push_back(what + ": removed (no --network-map for it)");
      continue;
    }
    remove_all(ctx, "mac|target|alias|source", nic);
    xmlNodePtr ns = xmlNewNode(nullptr, X("source"));
    set_attr(ns, type == "bridge" ? "bridge" : "network", it->second);
    xmlNodePtr kids = nic->children;
    if (kids != nullptr)
      xmlAddPrevSibling(kids, ns);
    else
      xmlAddChild(nic, ns);
    out.notes.push_back(what + ": mapped to " + it->second);
  }
}

// Character devices that name a host path (a file, a unix socket) move into chardev_dir, so
// the test domain never touches the source's files (the source VM may run on this host).
void rewrite_chardevs(xmlXPathContextPtr ctx, xmlNodePtr devices, const VmXmlRewrite& r,
                      VmXmlResult& out) {
  int i = 0;
  for (xmlNodePtr dev : select(ctx, "serial|console|channel|parallel", devices)) {
    for (xmlNodePtr src : select(ctx, "source[@path]|log[@file]", dev)) {
      const char* key = xmlStrEqual(src->name, X("log")) ? "file" : "path";
      const std::string old = attr(src, key);
      auto known = out.chardev_paths.find(old);
      std::string now;
      if (known != out.chardev_paths.end()) {
        now = known->second;  // <console> repeats <serial>'s path: keep them one device
      } else {
        const auto slash = old.find_last_of('/');
        now = r.chardev_dir + "/" + std::to_string(i++) + "-" +
              (slash == std::string::npos ? old : old.substr(slash + 1));
        out.chardev_paths[old] = now;
      }
      set_attr(src, key, now);
    }
    remove_all(ctx, "alias", dev);
  }
}

// What cannot work at another site, or would clash with the source VM: host devices,
// host file shares, graphics listening on the source's addresses, security labels.
void remove_host_bound(xmlXPathContextPtr ctx, xmlNodePtr root, xmlNodePtr devices,
                       VmXmlResult& out) {
  for (const char* kind : {"hostdev", "redirdev", "filesystem", "smartcard"}) {
    const auto nodes = select(ctx, kind, devices);
    for (xmlNodePtr n : nodes) remove(n);
    if (!nodes.empty())
      out.notes.push_back(std::to_string(nodes.size()) + " <" + kind +
                          "> removed (a device of the source host)");
  }
  for (xmlNodePtr g : select(ctx, "graphics", devices)) {
    const std::string type = attr(g, "type");
    if (type != "vnc" && type != "spice") {
      remove(g);
      out.notes.push_back("graphics " + type + ": removed");
      continue;
    }
    // A free port on this host's loopback, no password (the XML carries none: no secrets).
    remove_all(ctx, "listen|*", g);
    for (const char* a : {"port", "tlsPort", "listen", "socket", "passwd", "passwdValidTo"})
      xmlUnsetProp(g, X(a));
    set_attr(g, "autoport", "yes");
    xmlNodePtr l = add_child(g, "listen");
    set_attr(l, "type", "address");
    set_attr(l, "address", "127.0.0.1");
  }
  remove_all(ctx, "seclabel", root);
  remove_all(ctx, "seclabel", devices);
  // A per-VM firmware variable store is the source's file: libvirt makes a fresh one.
  for (xmlNodePtr n : select(ctx, "os/nvram", root)) {
    remove(n);
    out.notes.push_back("os/nvram: a fresh variable store (the source's is a host file there)");
  }
  for (xmlNodePtr n : select(ctx, "os/kernel|os/initrd|os/dtb|os/loader", root)) {
    const std::string p = text_of(n);
    if (!p.empty()) out.required_paths.push_back(p);
  }
}

}  // namespace

Result<VmXmlResult> rewrite_vm_xml(const std::string& source_xml, const VmXmlRewrite& r) {
  if (source_xml.empty()) return bad("the VM config is empty");
  if (source_xml.size() > site::kMaxVmConfigBytes)
    return bad("the VM config is " + std::to_string(source_xml.size()) + " bytes, more than " +
               std::to_string(site::kMaxVmConfigBytes));
  if (!valid_uuid(r.uuid)) return bad("'" + r.uuid + "' is not a UUID");
  Doc doc(xmlReadMemory(source_xml.data(), static_cast<int>(source_xml.size()), "domain.xml",
                        nullptr, XML_PARSE_NONET | XML_PARSE_NOERROR | XML_PARSE_NOWARNING));
  if (!doc) return bad("the VM config is not well-formed XML");
  xmlNodePtr root = xmlDocGetRootElement(doc.get());
  if (root == nullptr || !xmlStrEqual(root->name, X("domain")))
    return bad("the VM config is not a libvirt <domain>");
  std::unique_ptr<xmlXPathContext, CtxFree> ctx(xmlXPathNewContext(doc.get()));
  FERRY_ASSERT(ctx != nullptr);

  VmXmlResult out;
  xmlNodePtr name = first(ctx.get(), "name", root);
  if (name == nullptr || text_of(name).empty()) return bad("the VM config has no <name>");
  out.source_name = text_of(name);
  out.name = out.source_name + r.name_suffix;
  if (!valid_domain_name(out.name))
    return bad("'" + out.name + "' is not a usable domain name (letters, digits, - _ .)");
  set_text(name, out.name);
  xmlNodePtr uuid = first(ctx.get(), "uuid", root);
  if (uuid == nullptr) uuid = xmlAddNextSibling(name, xmlNewNode(nullptr, X("uuid")));
  set_text(uuid, r.uuid);
  // Runtime leftovers a definition must not carry (a live XML of a transient domain has them).
  xmlUnsetProp(root, X("id"));
  remove_all(ctx.get(), "title|description|metadata", root);

  xmlNodePtr devices = first(ctx.get(), "devices", root);
  if (devices == nullptr) devices = add_child(root, "devices");
  FERRY_TRY(rewrite_disks(ctx.get(), devices, r, out));
  rewrite_nics(ctx.get(), devices, r, out);
  rewrite_chardevs(ctx.get(), devices, r, out);
  remove_host_bound(ctx.get(), root, devices, out);
  bool real = false;  // failover proper: the overlays back onto the replica images
  for (const auto& [dev, d] : r.disks) real |= !d.backing_file.empty();
  set_text(add_child(root, "description"),
           real ? "Ferry failover of " + out.source_name + " (overlays over the replica images)"
                : "Ferry test failover of " + out.source_name +
                      " (throwaway overlays; ferry failover test --stop removes it)");

  xmlChar* mem = nullptr;
  int len = 0;
  xmlDocDumpFormatMemory(doc.get(), &mem, &len, 1);
  if (mem == nullptr) return Status::error(Errc::internal, "libxml2 could not write the XML");
  out.xml.assign(reinterpret_cast<const char*>(mem), static_cast<std::size_t>(len));
  xmlFree(mem);
  return out;
}

}  // namespace ferry::tools
