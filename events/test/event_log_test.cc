// The event log: bounds and rotation, the torn line, --since parsing, the line format.
#include <catch2/catch.hpp>
#include <sys/resource.h>
#include <sys/stat.h>
#include <csignal>
#include <unistd.h>

#include <filesystem>
#include <fstream>

#include "ferry/events/event_log.h"

using namespace ferry;
using namespace ferry::events;

namespace {

struct TempDir {
  std::string path;
  TempDir() {
    char tmpl[] = "/tmp/ferry-events-test-XXXXXX";
    path = ::mkdtemp(tmpl);
  }
  ~TempDir() { std::filesystem::remove_all(path); }
};

Event make(std::uint64_t rp, std::string kind = "rp_committed") {
  Event e;
  e.group = "vm1";
  e.kind = std::move(kind);
  e.rp = rp;
  e.disk = "vda";
  e.message = "RP " + std::to_string(rp);
  e.fields = {{"bytes", std::int64_t(4096)}, {"source", std::string("host-a")}};
  return e;
}

std::uint64_t file_size(const std::string& p) {
  struct stat st{};
  return ::stat(p.c_str(), &st) == 0 ? std::uint64_t(st.st_size) : 0;
}

}  // namespace

TEST_CASE("an event round-trips through its JSON line") {
  Event e = make(7);
  e.time_us = 1'765'000'000'123'456;
  const std::string line = to_json_line(e);
  CHECK(line.find('\n') == std::string::npos);
  auto back = from_json_line(line);
  REQUIRE(back.is_ok());
  CHECK(back->time_us == e.time_us);
  CHECK(back->group == "vm1");
  CHECK(back->kind == "rp_committed");
  CHECK(back->rp == 7);
  CHECK(back->disk == "vda");
  REQUIRE(back->fields.size() == 2);
  CHECK(std::get<std::int64_t>(back->fields[0].value) == 4096);
}

TEST_CASE("a huge event is cut to the line bound") {
  Event e = make(1);
  e.message = std::string(100000, 'x');
  e.fields.push_back({"cause", std::string(100000, 'y')});
  const std::string line = to_json_line(e);
  CHECK(line.size() <= kMaxLineBytes);
  CHECK(from_json_line(line).is_ok());
}

TEST_CASE("rotation bounds the log to two files") {
  TempDir d;
  EventLogOptions o{.dir = d.path, .max_file_bytes = 8192, .journald = false};
  auto log = EventLog::open(o);
  REQUIRE(log.is_ok());
  for (std::uint64_t i = 1; i <= 500; ++i) (*log)->emit(make(i));
  REQUIRE((*log)->sync().is_ok());
  CHECK((*log)->write_failures() == 0);
  CHECK(file_size(d.path + "/events.jsonl") <= 8192);
  CHECK(file_size(d.path + "/events.1.jsonl") <= 8192);
  CHECK(file_size(d.path + "/events.1.jsonl") > 4096);
  auto r = read_events(d.path, 0);
  REQUIRE(r.is_ok());
  CHECK(r->notes.empty());
  REQUIRE(!r->events.empty());
  CHECK(r->events.back().rp == 500);
  for (std::size_t i = 1; i < r->events.size(); ++i)  // in order, without gaps
    CHECK(r->events[i].rp == r->events[i - 1].rp + 1);
}

TEST_CASE("two writers of one log share its bound and its rotation") {
  TempDir d;
  EventLogOptions o{.dir = d.path, .max_file_bytes = 8192, .journald = false};
  auto a = EventLog::open(o);
  auto b = EventLog::open(o);
  REQUIRE(a.is_ok());
  REQUIRE(b.is_ok());
  for (std::uint64_t i = 1; i <= 300; ++i) (i % 2 ? *a : *b)->emit(make(i));
  CHECK(file_size(d.path + "/events.jsonl") <= 8192);
  auto r = read_events(d.path, 0);
  REQUIRE(r.is_ok());
  CHECK(r->notes.empty());
  CHECK(r->events.back().rp == 300);
}

TEST_CASE("a torn last line is skipped with a note, and the next event starts a new line") {
  TempDir d;
  EventLogOptions o{.dir = d.path, .journald = false};
  {
    auto log = EventLog::open(o);
    REQUIRE(log.is_ok());
    (*log)->emit(make(1));
    (*log)->emit(make(2));
  }
  {  // a crash in the middle of a write
    std::ofstream f(d.path + "/events.jsonl", std::ios::app);
    f << R"({"time":"2026-12-08T02:50:00.000000Z","group":"vm1","ki)";
  }
  auto r = read_events(d.path, 0);
  REQUIRE(r.is_ok());
  CHECK(r->events.size() == 2);
  REQUIRE(r->notes.size() == 1);
  CHECK(r->notes[0].find("events.jsonl line 3") != std::string::npos);
  {
    auto log = EventLog::open(o);
    REQUIRE(log.is_ok());
    (*log)->emit(make(3));
  }
  r = read_events(d.path, 0);
  REQUIRE(r.is_ok());
  REQUIRE(r->events.size() == 3);
  CHECK(r->events[2].rp == 3);
  REQUIRE(r->notes.size() == 1);
  CHECK(r->notes[0].find("not an event") != std::string::npos);
}

TEST_CASE("an unwritable log counts the failure and never throws") {
  TempDir d;
  EventLogOptions o{.dir = d.path, .journald = false};
  auto log = EventLog::open(o);
  REQUIRE(log.is_ok());
  // events.jsonl replaced by a directory: the reopen after a "rotation" fails.
  std::filesystem::rename(d.path + "/events.jsonl", d.path + "/gone");
  std::filesystem::create_directory(d.path + "/events.jsonl");
  (*log)->emit(make(1));
  CHECK((*log)->write_failures() == 1);
}

TEST_CASE("read_events filters by time") {
  TempDir d;
  auto log = EventLog::open({.dir = d.path, .journald = false});
  REQUIRE(log.is_ok());
  for (int i = 1; i <= 5; ++i) {
    Event e = make(std::uint64_t(i));
    e.time_us = std::int64_t(i) * 1'000'000'000;
    (*log)->emit(e);
  }
  auto r = read_events(d.path, 3'000'000'000);
  REQUIRE(r.is_ok());
  REQUIRE(r->events.size() == 3);
  CHECK(r->events[0].rp == 3);
  auto none = read_events(d.path + "/missing", 0);
  REQUIRE(none.is_ok());
  CHECK(none->events.empty());
}

TEST_CASE("--since takes RFC 3339 times and relative ages") {
  const std::int64_t now = 1'765'162'200'000'000;  // 2025-12-08T02:50:00Z
  CHECK(parse_since("10m", now).value() == now - 600'000'000);
  CHECK(parse_since("90s", now).value() == now - 90'000'000);
  CHECK(parse_since("2h", now).value() == now - 7200'000'000);
  CHECK(parse_since("1d", now).value() == now - 86400'000'000);
  CHECK(parse_since("2025-12-08T02:50:00Z", now).value() == now);
  CHECK(parse_since("2025-12-08T02:50:00.5Z", now).value() == now + 500'000);
  CHECK(parse_since("2025-12-08T03:50:00+01:00", now).value() == now);
  CHECK(parse_since("2025-12-08t02:50:00z", now).value() == now);
  for (const char* bad : {"", "10", "m", "10x", "yesterday", "2025-12-08", "2025-13-08T00:00:00Z",
                          "2025-12-08T02:50:00", "2025-12-08T02:50:00Zjunk", "-5m", "9999999d"}) {
    INFO(bad);
    auto r = parse_since(bad, now);
    REQUIRE(!r.is_ok());
    CHECK(r.status().code() == Errc::invalid_argument);
  }
}

TEST_CASE("many open logs share one flusher thread; closing a written log is safe") {
  auto threads = [] {
    std::size_t n = 0;
    for (const auto& e : std::filesystem::directory_iterator("/proc/self/task")) n += !e.path().empty();
    return n;
  };
  TempDir d;
  {  // start the flusher once
    auto first = EventLog::open({.dir = d.path + "/first", .journald = false});
    REQUIRE(first.is_ok());
    (*first)->emit(make(1));
  }
  const std::size_t before = threads();
  std::vector<std::unique_ptr<EventLog>> logs;
  for (int i = 0; i < 50; ++i) {
    auto log = EventLog::open({.dir = d.path + "/g" + std::to_string(i), .journald = false});
    REQUIRE(log.is_ok());
    (*log)->emit(make(std::uint64_t(i) + 1));
    logs.push_back(std::move(log).value());
  }
  CHECK(threads() == before);
  logs.clear();  // closed while the flusher may be about to sync them
  auto r = read_events(d.path + "/g49", 0);
  REQUIRE(r.is_ok());
  REQUIRE(r->events.size() == 1);
  CHECK(r->events[0].rp == 50);
}

TEST_CASE("a short write (file size limit) is counted, and the next event starts a new line") {
  TempDir d;
  auto log = EventLog::open({.dir = d.path, .journald = false});
  REQUIRE(log.is_ok());
  (*log)->emit(make(1));
  const std::uint64_t size = file_size(d.path + "/events.jsonl");
  std::signal(SIGXFSZ, SIG_IGN);
  rlimit old{};
  REQUIRE(::getrlimit(RLIMIT_FSIZE, &old) == 0);
  rlimit small = old;
  small.rlim_cur = size + 40;  // the next line is cut after 40 bytes
  REQUIRE(::setrlimit(RLIMIT_FSIZE, &small) == 0);
  (*log)->emit(make(2));
  REQUIRE(::setrlimit(RLIMIT_FSIZE, &old) == 0);
  std::signal(SIGXFSZ, SIG_DFL);
  CHECK((*log)->write_failures() == 1);
  CHECK(file_size(d.path + "/events.jsonl") == size + 40);
  (*log)->emit(make(3));
  auto r = read_events(d.path, 0);
  REQUIRE(r.is_ok());
  REQUIRE(r->events.size() == 2);
  CHECK(r->events[0].rp == 1);
  CHECK(r->events[1].rp == 3);
  REQUIRE(r->notes.size() == 1);
  CHECK(r->notes[0].find("line 2") != std::string::npos);
}
