#include "libvirt_api.h"

#include <libvirt/virterror.h>
#include <libxml/parser.h>
#include <libxml/xpathInternals.h>

#include <fmt/format.h>

namespace ferry::cbt::lv {

namespace {

Errc map_code(int code, int domain) {
  switch (code) {
    case VIR_ERR_NO_DOMAIN:
    case VIR_ERR_NO_DOMAIN_CHECKPOINT:
    case VIR_ERR_NO_DOMAIN_BACKUP:
      return Errc::not_found;
    case VIR_ERR_NO_SUPPORT:
    case VIR_ERR_OPERATION_UNSUPPORTED:
    case VIR_ERR_ARGUMENT_UNSUPPORTED:
    case VIR_ERR_CONFIG_UNSUPPORTED:
    case VIR_ERR_AGENT_UNRESPONSIVE:
    case VIR_ERR_AGENT_UNSYNCED:
      return Errc::unsupported;
    case VIR_ERR_OPERATION_TIMEOUT:
      return Errc::timeout;
    case VIR_ERR_INVALID_ARG:
    case VIR_ERR_XML_ERROR:
    case VIR_ERR_XML_DETAIL:
      return Errc::invalid_argument;
    case VIR_ERR_NO_CONNECT:
    case VIR_ERR_INVALID_CONN:
    case VIR_ERR_RPC:
      return Errc::disconnected;
    case VIR_ERR_SYSTEM_ERROR:
      return domain == VIR_FROM_RPC || domain == VIR_FROM_REMOTE ? Errc::disconnected : Errc::io;
    default:
      return Errc::external;
  }
}

void quiet_handler(void*, virErrorPtr) {}

}  // namespace

Status last_error(const std::string& what) {
  virErrorPtr e = virGetLastError();
  if (e == nullptr || e->code == VIR_ERR_OK)
    return Status::error(Errc::external, what + ": libvirt failed without an error");
  Errc code = map_code(e->code, e->domain);
  Status s = Status::error(code, fmt::format("{}: {} (libvirt error {}, domain {})", what,
                                             e->message ? e->message : "?", e->code, e->domain));
  // A lost connection or a timed-out job may work on the next RP.
  if (code == Errc::disconnected || code == Errc::timeout) s.set_retryable();
  virResetLastError();
  return s;
}

int last_error_code() {
  virErrorPtr e = virGetLastError();
  return e ? e->code : VIR_ERR_OK;
}

void install_quiet_error_handler() { virSetErrorFunc(nullptr, quiet_handler); }

std::string take_string(char* s) {
  CString owned(s);
  return s ? std::string(s) : std::string();
}

Result<XmlDoc> XmlDoc::parse(const std::string& xml, const std::string& what) {
  XmlDoc d;
  d.doc_.reset(xmlReadMemory(xml.data(), static_cast<int>(xml.size()), "libvirt.xml", nullptr,
                             XML_PARSE_NONET | XML_PARSE_NOERROR | XML_PARSE_NOWARNING));
  if (!d.doc_) return Status::error(Errc::protocol, what + ": libvirt returned XML that does not parse");
  d.ctx_.reset(xmlXPathNewContext(d.doc_.get()));
  FERRY_ASSERT(d.ctx_ != nullptr);
  return d;
}

std::vector<xmlNodePtr> XmlDoc::nodes(const char* xpath, xmlNodePtr context) const {
  std::vector<xmlNodePtr> out;
  ctx_->node = context ? context : xmlDocGetRootElement(doc_.get());
  xmlXPathObjectPtr obj = xmlXPathEvalExpression(reinterpret_cast<const xmlChar*>(xpath), ctx_.get());
  FERRY_ASSERT_MSG(obj != nullptr, xpath);  // our expressions are constants: a bad one is a bug
  if (obj->nodesetval)
    for (int i = 0; i < obj->nodesetval->nodeNr; ++i) out.push_back(obj->nodesetval->nodeTab[i]);
  xmlXPathFreeObject(obj);
  return out;
}

std::string XmlDoc::dump(xmlNodePtr node) const {
  xmlBufferPtr buf = xmlBufferCreate();
  FERRY_ASSERT(buf != nullptr);
  xmlNodeDump(buf, doc_.get(), node, 0, 0);
  std::string out(reinterpret_cast<const char*>(xmlBufferContent(buf)),
                  static_cast<std::size_t>(xmlBufferLength(buf)));
  xmlBufferFree(buf);
  return out;
}

std::optional<std::string> XmlDoc::text(const char* xpath, xmlNodePtr context) const {
  auto found = nodes(xpath, context);
  if (found.empty()) return std::nullopt;
  xmlChar* content = xmlNodeGetContent(found.front());
  std::string s = content ? reinterpret_cast<const char*>(content) : "";
  xmlFree(content);
  return s;
}

std::string xml_escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    switch (c) {
      case '&': out += "&amp;"; break;
      case '<': out += "&lt;"; break;
      case '>': out += "&gt;"; break;
      case '\'': out += "&apos;"; break;
      case '"': out += "&quot;"; break;
      default: out += c;
    }
  }
  return out;
}

}  // namespace ferry::cbt::lv
