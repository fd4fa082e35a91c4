// The journald side of the event log: one sd_journal_sendv per event.
#include <sys/uio.h>
#include <systemd/sd-journal.h>

#include <cctype>

#include "ferry/events/event_log.h"

namespace ferry::events {

int send_to_journald(const Event& e) {
  std::vector<std::string> lines;
  lines.reserve(8 + e.fields.size());
  std::string msg = e.message.empty() ? e.kind : e.message;
  lines.push_back("MESSAGE=" + msg.substr(0, kMaxLineBytes));
  lines.push_back("PRIORITY=" + std::to_string(static_cast<int>(e.priority)));
  lines.push_back("SYSLOG_IDENTIFIER=ferry");
  lines.push_back("FERRY_GROUP=" + e.group);
  lines.push_back("FERRY_EVENT=" + e.kind);
  if (e.rp != 0) lines.push_back("FERRY_RP=" + std::to_string(e.rp));
  if (!e.disk.empty()) lines.push_back("FERRY_DISK=" + e.disk);
  for (const Field& f : e.fields) {
    std::string key = "FERRY_";
    for (char c : f.key)
      key += std::isalnum(static_cast<unsigned char>(c)) ? char(std::toupper(static_cast<unsigned char>(c))) : '_';
    if (const auto* n = std::get_if<std::int64_t>(&f.value))
      lines.push_back(key + "=" + std::to_string(*n));
    else
      lines.push_back(key + "=" + std::get<std::string>(f.value).substr(0, kMaxLineBytes));
  }
  std::vector<iovec> iov;
  iov.reserve(lines.size());
  for (std::string& l : lines) iov.push_back({l.data(), l.size()});
  return sd_journal_sendv(iov.data(), static_cast<int>(iov.size()));
}

}  // namespace ferry::events
