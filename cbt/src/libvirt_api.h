// The libvirt boundary of the libvirt source: RAII owners for libvirt and libxml2 handles,
// the one function that turns a libvirt error into a Status, and small XML readers.
#pragma once

#include <libvirt/libvirt.h>
#include <libxml/tree.h>
#include <libxml/xpath.h>

#include <cstdlib>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "ferry/base/status.h"

namespace ferry::cbt::lv {

struct ConnClose { void operator()(virConnectPtr c) const { virConnectClose(c); } };
struct DomainFree { void operator()(virDomainPtr d) const { virDomainFree(d); } };
struct CheckpointFree {
  void operator()(virDomainCheckpointPtr c) const { virDomainCheckpointFree(c); }
};
struct CFree { void operator()(char* p) const { std::free(p); } };
using Conn = std::unique_ptr<virConnect, ConnClose>;
using Domain = std::unique_ptr<virDomain, DomainFree>;
using Checkpoint = std::unique_ptr<virDomainCheckpoint, CheckpointFree>;
using CString = std::unique_ptr<char, CFree>;  // strings libvirt hands over

// The last libvirt error of this thread as a Status: `what` says what Ferry was doing and on
// which domain/disk/checkpoint; libvirt's code, domain and message follow. Resets the error.
Status last_error(const std::string& what);
// libvirt's code of the last error (VIR_ERR_OK when none), without resetting it.
int last_error_code();
// Silences libvirt's default handler (it prints every error to stderr); errors are ours.
void install_quiet_error_handler();

// Takes a string libvirt allocated; empty when null.
std::string take_string(char* s);

// A parsed XML document with XPath queries relative to the root or to a node.
class XmlDoc {
 public:
  static Result<XmlDoc> parse(const std::string& xml, const std::string& what);
  // Nodes matching an XPath expression (relative to `context`, or the document).
  std::vector<xmlNodePtr> nodes(const char* xpath, xmlNodePtr context = nullptr) const;
  // The first match's text as a string, or nullopt.
  std::optional<std::string> text(const char* xpath, xmlNodePtr context = nullptr) const;
  // A node and its subtree serialised as XML.
  std::string dump(xmlNodePtr node) const;

 private:
  struct DocFree { void operator()(xmlDocPtr d) const { xmlFreeDoc(d); } };
  struct CtxFree { void operator()(xmlXPathContextPtr c) const { xmlXPathFreeContext(c); } };
  std::unique_ptr<xmlDoc, DocFree> doc_;
  std::unique_ptr<xmlXPathContext, CtxFree> ctx_;
};

// Escapes text for an XML attribute value.
std::string xml_escape(const std::string& s);

}  // namespace ferry::cbt::lv
