// Unit tests of a protection group's pure parts: the capture coordinator (group_capture.h)
// over a scripted twin of a domain that fails at any step or hangs, and the group document
// (ferry/cbt/group_doc.h). The twin is the narrow GroupMember interface's faulty twin; the
// real libvirt member runs in test/integration/test_protection_group.py.
#include <catch2/catch.hpp>

#include <atomic>
#include <thread>

#include "ferry/cbt/group_doc.h"
#include "group_capture.h"

using namespace ferry;
using namespace ferry::cbt;

namespace {

enum class Step { none, freeze, suspend, start_job, resume, thaw };

// A domain that records its state and fails (or sleeps) at one step.
class TwinDomain final : public GroupMember {
 public:
  explicit TwinDomain(std::string name, Step fail = Step::none) : name_(std::move(name)), fail_(fail) {}
  const std::string& member_name() const override { return name_; }
  Status freeze() override {
    if (fail_ == Step::freeze) return err("freeze");
    frozen = true;
    return Status::ok();
  }
  Status thaw() override {
    frozen = false;
    return fail_ == Step::thaw ? err("thaw") : Status::ok();
  }
  Status suspend() override {
    if (fail_ == Step::suspend) return err("suspend");
    paused = true;
    ++suspends;
    return Status::ok();
  }
  Status resume() override {
    ++resumes;
    if (fail_ == Step::resume) return err("resume");
    paused = false;
    return Status::ok();
  }
  Status start_job() override {
    if (fail_ == Step::start_job) return err("start_job");
    if (start_delay.count() > 0) std::this_thread::sleep_for(start_delay);
    job = true;
    started_while_paused = paused.load();
    return Status::ok();
  }
  void abandon_job() override { job = false; ++abandons; }

  std::atomic<bool> paused{false}, frozen{false}, job{false}, started_while_paused{false};
  std::atomic<int> suspends{0}, resumes{0}, abandons{0};
  std::chrono::milliseconds start_delay{0};

 private:
  Status err(const char* step) {
    return Status::error(Errc::external, name_ + ": " + step + " failed");
  }
  std::string name_;
  Step fail_;
};

std::vector<GroupMember*> ptrs(std::vector<std::unique_ptr<TwinDomain>>& v) {
  std::vector<GroupMember*> out;
  for (auto& d : v) out.push_back(d.get());
  return out;
}

std::vector<std::unique_ptr<TwinDomain>> twins(std::size_t n, std::size_t failing, Step step) {
  std::vector<std::unique_ptr<TwinDomain>> out;
  for (std::size_t i = 0; i < n; ++i)
    out.push_back(std::make_unique<TwinDomain>("vm" + std::to_string(i),
                                               i == failing ? step : Step::none));
  return out;
}

}  // namespace

TEST_CASE("instant: every job starts while every domain is paused, then all run") {
  auto d = twins(3, 99, Step::none);
  InstantOptions o;
  auto r = capture_instant(ptrs(d), o);
  REQUIRE(r.is_ok());
  for (auto& t : d) {
    CHECK(t->job);
    CHECK_FALSE(t->paused);
    CHECK(t->started_while_paused);  // the last domain was paused before the first job
    CHECK(t->suspends == 1);
    CHECK(t->resumes == 1);
    CHECK(t->abandons == 0);
  }
  CHECK_FALSE(r->app_consistent);
}

TEST_CASE("instant: a failure at any step of any domain resumes all and abandons every job") {
  for (Step step : {Step::suspend, Step::start_job}) {
    for (std::size_t failing = 0; failing < 3; ++failing) {
      CAPTURE(static_cast<int>(step), failing);
      auto d = twins(3, failing, step);
      InstantOptions o;
      o.quiesce = true;
      auto r = capture_instant(ptrs(d), o);
      REQUIRE_FALSE(r.is_ok());
      CHECK(r.status().message().find("vm" + std::to_string(failing)) != std::string::npos);
      for (auto& t : d) {
        CHECK_FALSE(t->paused);
        CHECK_FALSE(t->frozen);
        CHECK_FALSE(t->job);
        CHECK(t->resumes == t->suspends);
      }
    }
  }
}

TEST_CASE("instant: a domain that cannot be frozen costs application consistency only") {
  auto d = twins(2, 1, Step::freeze);
  InstantOptions o;
  o.quiesce = true;
  auto r = capture_instant(ptrs(d), o);
  REQUIRE(r.is_ok());
  CHECK_FALSE(r->app_consistent);
  for (auto& t : d) {
    CHECK(t->job);
    CHECK_FALSE(t->frozen);
  }
  auto ok = twins(2, 99, Step::none);
  auto r2 = capture_instant(ptrs(ok), o);
  REQUIRE(r2.is_ok());
  CHECK(r2->app_consistent);
}

TEST_CASE("instant: a domain that cannot be resumed fails the RP naming it; the others run") {
  auto d = twins(3, 1, Step::resume);
  auto r = capture_instant(ptrs(d), InstantOptions{});
  REQUIRE_FALSE(r.is_ok());
  CHECK(r.status().message().find("vm1") != std::string::npos);
  CHECK_FALSE(d[0]->paused);
  CHECK_FALSE(d[2]->paused);
  CHECK(d[1]->resumes >= 2);  // retried
  for (auto& t : d) CHECK_FALSE(t->job);
}

TEST_CASE("instant: a pause longer than the bound resumes the domains and fails (pause timeout)") {
  auto d = twins(3, 99, Step::none);
  d[0]->start_delay = std::chrono::milliseconds(300);  // a backup begin that hangs
  d[2]->start_delay = std::chrono::milliseconds(300);
  InstantOptions o;
  o.max_pause = std::chrono::milliseconds(50);
  auto t0 = std::chrono::steady_clock::now();
  auto r = capture_instant(ptrs(d), o);
  REQUIRE_FALSE(r.is_ok());
  CHECK(r.status().code() == Errc::timeout);
  CHECK(r.status().message().find("pause timeout") != std::string::npos);
  CHECK(std::chrono::steady_clock::now() - t0 < std::chrono::seconds(5));
  for (auto& t : d) {
    CHECK_FALSE(t->paused);
    CHECK_FALSE(t->job);
    CHECK(t->resumes == 1);  // once, by the watchdog
    CHECK(t->abandons == 1);  // every started job ended: the RP is not taken
  }
}

TEST_CASE("instant: the jobs start at once, the pause is the slowest start, not the sum") {
  auto d = twins(4, 99, Step::none);
  for (auto& t : d) t->start_delay = std::chrono::milliseconds(200);
  auto r = capture_instant(ptrs(d), InstantOptions{});
  REQUIRE(r.is_ok());
  CHECK(r->pause_us >= 200000);
  CHECK(r->pause_us < 700000);  // the sum would be 800 ms
  REQUIRE(r->start_us.size() == 4);
  for (auto us : r->start_us) CHECK(us >= 200000);
  for (auto& t : d) CHECK(t->started_while_paused);
}

TEST_CASE("instant: the pause is measured") {
  auto d = twins(2, 99, Step::none);
  d[1]->start_delay = std::chrono::milliseconds(20);
  auto r = capture_instant(ptrs(d), InstantOptions{});
  REQUIRE(r.is_ok());
  CHECK(r->pause_us >= 20000);
  CHECK(r->pause_us < 5000000);
}

namespace {
GroupDoc sample() {
  GroupDoc doc;
  doc.group = "app";
  doc.vms = {{"web", {{"web.vda", "vda"}}, "<domain type='kvm'><name>web</name></domain>"},
             {"db", {{"db.vda", "vda"}, {"db.vdb", "vdb"}},
              "<?xml version='1.0'?>\n<domain type='kvm'><name>db</name><uuid>x&amp;y</uuid></domain>\n"}};
  doc.boot_order = {"db", "web"};
  return doc;
}
}  // namespace

TEST_CASE("group document: round trip, boot order, one VM's XML") {
  const std::string text = group_doc_text(sample());
  CHECK(is_group_doc(text));
  CHECK_FALSE(is_group_doc("<domain type='kvm'/>"));
  auto back = parse_group_doc(text);
  REQUIRE(back.is_ok());
  CHECK(back->group == "app");
  REQUIRE(back->vms.size() == 2);
  CHECK(back->vms[0].name == "web");
  CHECK(back->vms[1].disks == std::vector<GroupDisk>{{"db.vda", "vda"}, {"db.vdb", "vdb"}});
  CHECK(back->vms[1].domain_xml.find("<name>db</name>") != std::string::npos);
  CHECK(back->vms[1].domain_xml.find("x&amp;y") != std::string::npos);
  CHECK(back->vms[1].domain_xml.rfind("<domain", 0) == 0);
  auto order = vms_in_boot_order(*back);
  REQUIRE(order.size() == 2);
  CHECK(order[0]->name == "db");
  CHECK(order[1]->name == "web");
  CHECK(group_doc_text(*back) == group_doc_text(*parse_group_doc(group_doc_text(*back))));
}

TEST_CASE("group document: a single domain's XML reads as a group of one") {
  auto doc = group_doc_of(
      "<domain type='kvm'><name>vm1</name><devices>"
      "<disk type='file' device='disk'><target dev='vda'/></disk>"
      "<disk type='file' device='cdrom'><target dev='hdc'/></disk>"
      "<disk type='file'><target dev='vdb'/><readonly/></disk></devices></domain>");
  REQUIRE(doc.is_ok());
  REQUIRE(doc->vms.size() == 1);
  CHECK(doc->vms[0].name == "vm1");
  CHECK(doc->vms[0].disks == std::vector<GroupDisk>{{"vda", "vda"}});
  CHECK(doc->boot_order == std::vector<std::string>{"vm1"});
}

TEST_CASE("group document: bad documents are refused naming what is wrong") {
  GroupDoc d = sample();
  d.boot_order = {"db"};
  CHECK(check_group_doc(d).message().find("every VM") != std::string::npos);
  d.boot_order = {"db", "nope"};
  CHECK(check_group_doc(d).message().find("nope") != std::string::npos);
  d = sample();
  d.vms[1].disks[0].name = "web.vda";
  CHECK(check_group_doc(d).message().find("web.vda") != std::string::npos);
  d = sample();
  d.vms[1].name = "web";
  CHECK(check_group_doc(d).message().find("twice") != std::string::npos);

  std::string text = group_doc_text(sample());
  std::string v2 = text;
  v2.replace(v2.find("version='1'"), 11, "version='2'");
  auto r = parse_group_doc(v2);
  REQUIRE_FALSE(r.is_ok());
  CHECK(r.status().code() == Errc::unsupported);
  CHECK_FALSE(parse_group_doc(text.substr(0, text.size() / 2)).is_ok());
  std::string two = text;
  auto at = two.find("</vm>");
  two.insert(at, "<domain/>");
  CHECK(parse_group_doc(two).status().message().find("not one") != std::string::npos);
}
