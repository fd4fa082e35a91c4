#include "ferry/site/receiver.h"
#include "ferry/site/rp_times.h"

#include <sys/stat.h>

#include <condition_variable>
#include <filesystem>
#include <map>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

#include "capacity.h"
#include "receiver_events.h"
#include "receiver_probe.h"
#include "ferry/base/fd.h"
#include "ferry/base/hash.h"
#include "ferry/base/kill_point.h"
#include "ferry/base/log.h"
#include "ferry/transport/codec.h"
#include "ferry/transport/rules.h"
#include "ferry/transport/wire.h"
#include "ferry/site/failover_state.h"
#include "ferry/site/vm_config.h"

namespace ferry::site {

using transport::Decompressor;
using transport::wire_status_of;  // the one Errc -> wire status mapping (rules.h)
using transport::MsgType;
using transport::WireStatus;
using Clock = std::chrono::steady_clock;

static_assert(kMaxStoredPayloadBytes >= transport::kMaxBlockBytes &&
                  kMaxStoredPayloadBytes < transport::kMaxPayloadBytes,
              "a payload between the journal's and the wire's limit is refused as a bad frame");
static_assert(kMaxStoredZeroBytes == transport::kMaxZeroRangeBytes,
              "a zero range of the wire is one journal record");

const char* group_state_name(GroupState s) {
  switch (s) {
    case GroupState::ok: return "ok";
    case GroupState::failing: return "failing";
    case GroupState::apply_pending: return "apply_pending";
    case GroupState::failed_over: return "failed_over";
  }
  return "?";
}

const char* access_right_name(AccessRight r) {
  return r == AccessRight::write ? "write" : "manage";
}

Result<std::uint64_t> group_usage_bytes(const std::string& root, const std::string& group) {
  FERRY_ASSERT(valid_store_name(group));
  const std::filesystem::path dir = std::filesystem::path(root) / group;
  std::error_code ec;
  if (!std::filesystem::exists(dir, ec)) return std::uint64_t{0};
  std::uint64_t bytes = 0;
  std::size_t entries = 0;
  auto it = std::filesystem::recursive_directory_iterator(
      dir, std::filesystem::directory_options::skip_permission_denied, ec);
  for (; !ec && it != std::filesystem::recursive_directory_iterator(); it.increment(ec)) {
    if (++entries > kMaxUsageEntries)
      return Status::error(Errc::internal, "group '" + group + "': more than " +
                                               std::to_string(kMaxUsageEntries) +
                                               " files in its store; usage not measured");
    struct stat st {};
    if (::lstat(it->path().c_str(), &st) != 0) continue;  // removed meanwhile (pruning)
    if (S_ISREG(st.st_mode)) bytes += std::uint64_t(st.st_blocks) * 512;  // allocated: thin images
  }
  if (ec && ec != std::errc::no_such_file_or_directory)
    return Status::from_errno(ec.value(), "measure the store of group '" + group + "'");
  return bytes;
}

namespace {

std::uint64_t unix_now_ns() {
  return static_cast<std::uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                        std::chrono::system_clock::now().time_since_epoch())
                                        .count());
}

// What failed decides what ends the failure episode: a failed open is cured by a
// successful re-open; a failed RP write only by an RP that commits (a re-open proves nothing
// about a full disk). A failed apply is not a failure episode (the store stays open and keeps
// committing RPs: R19) but an apply episode (ApplyEpisode), unless the store itself failed.
enum class FailedStep : std::uint8_t { rp, apply, open };

// The replica is behind the journal because applying failed (GroupStore::apply_error, R19):
// RPs are still accepted and acknowledged; the apply is retried once the back-off has run
// out, by the next commit or by the re-opener, whichever comes first. Logged like a failure
// episode: once at the start, one line when it ends.
struct ApplyEpisode {
  std::string cause;       // the first apply error; empty: none
  std::string last_error;  // the latest
  std::uint64_t failures = 0;
  std::uint64_t since_unix_ns = 0;
  Clock::time_point since;
  std::chrono::milliseconds backoff{0};
  Clock::time_point next_retry{};

  bool pending() const { return !cause.empty(); }
};

// How a group is doing. Guarded by Receiver::Impl::mu (short sections, never across I/O).
//
// The storage failure episode of the group: from the first failure until it ends (above).
// Its cause is logged once at error level; the retries of the source (every second against a
// full disk) only at debug; a different kind of failure (ENOSPC -> EIO) is a new cause and
// logged again; the commit that ends it logs one "storage resumed" line.
struct Health {
  bool must_reopen = false;  // the store was dropped after a failure
  std::string cause;         // the first failure of the episode; empty: no episode
  std::string last_error;    // the latest failure of the episode
  Errc code = Errc::ok;      // of the latest failure
  FailedStep step = FailedStep::rp;
  std::uint64_t failures = 0;  // refused RPs and failed re-opens in the episode
  std::uint64_t since_unix_ns = 0;
  Clock::time_point since;
  std::chrono::milliseconds backoff{0};  // grows per failure in the episode
  Clock::time_point next_reopen{};
  // What the last successful open of the store took (its recovery scan): the price of one
  // re-open, which the back-off after a failed RP is measured against.
  std::chrono::milliseconds last_open_cost{0};
  std::uint64_t committed = 0, applied = 0, last_commit_unix_ns = 0;
  std::string source;
  ApplyEpisode apply;  // outlives failure episodes: only a successful apply ends it

  bool failing() const { return !cause.empty(); }
};

struct GroupSlot {
  std::timed_mutex busy;  // held by the session (or the re-opener) that uses the store
  std::unique_ptr<GroupStore> store;  // guarded by busy; null: not open (yet, or after a failure)
  Health health;                      // guarded by Impl::mu
  std::uint64_t retention_gen = 0;    // guarded by busy: the policy generation the store has
  // guarded by busy: the VM definition of the group's newest RP, copied into an RP whose
  // source sent none (vm_config.h); read from the store once per process (nullopt: not yet).
  std::optional<std::string> vm_config;
};

std::string seconds_text(Clock::duration d) {
  const double s = std::chrono::duration<double>(d).count();
  return s < 1 ? fmt::format("{:.0f} ms", s * 1000) : fmt::format("{:.1f} s", s);
}

}  // namespace

struct Receiver::Impl {
  ReceiverOptions options;
  std::unique_ptr<ReceiverEvents> events;  // the groups' event logs (receiver_events.h)
  mutable std::mutex mu;
  std::map<std::string, std::unique_ptr<GroupSlot>> groups;  // slots are never removed
  CapacityProbe capacity;
  std::condition_variable wake;
  bool stopping = false;  // guarded by mu
  std::thread reopener;
  // Retention per group (ReceiverOptions::retention_for), replaced by set_retention (a
  // SIGHUP reload); each store takes the new policy before its next retention pass.
  std::function<RetentionPolicy(const std::string&)> retention_for;  // guarded by mu
  std::uint64_t retention_gen = 1;                                    // guarded by mu

  RetentionPolicy policy_for(const std::string& group, std::uint64_t* gen = nullptr) {
    std::lock_guard lock(mu);
    if (gen != nullptr) *gen = retention_gen;
    return retention_for ? retention_for(group) : options.store.retention;
  }

  StoreOptions store_options(const std::string& group, std::uint64_t* gen) {
    StoreOptions o = options.store;
    o.retention = policy_for(group, gen);
    return o;
  }

  // Before a retention pass: the store takes the policy of a reload it has not seen yet.
  // The caller holds g.busy.
  void refresh_retention(GroupSlot& g, const std::string& group) {
    std::uint64_t gen = 0;
    RetentionPolicy p = policy_for(group, &gen);
    if (!g.store || g.retention_gen == gen) return;
    g.store->set_retention(p);
    g.retention_gen = gen;
  }

  ~Impl() {
    {
      std::lock_guard lock(mu);
      stopping = true;
    }
    wake.notify_all();
    if (reopener.joinable()) reopener.join();
  }

  GroupSlot& slot(const std::string& group) {
    std::lock_guard lock(mu);
    auto& s = groups[group];
    if (!s) s = std::make_unique<GroupSlot>();
    return *s;
  }

  // A failed open or apply is retried no sooner than reopen_min, doubling per failure up to
  // reopen_max: retrying it sooner only repeats the failure. A failed RP on a store that
  // opened (ENOSPC, EIO on a journal write or sync) is different: the re-open that must
  // follow is a journal scan whose price is known, so the wait is that price times
  // kReopenCostFactor (capped at reopen_max). Re-scanning then takes at most about 1/20 of
  // the receiver's time however often the source retries, and a small group resumes within a
  // second of the cause going away (a full disk freed), as the disk-full harness measures.
  std::chrono::milliseconds next_backoff(const Health& h, FailedStep step) const {
    if (step == FailedStep::rp)
      return std::min(h.last_open_cost * kReopenCostFactor, options.reopen_max);
    return h.backoff < options.reopen_min ? options.reopen_min
                                          : std::min(h.backoff * 2, options.reopen_max);
  }
  static constexpr int kReopenCostFactor = 20;

  // Records a store failure of `group`: opens or continues its episode and schedules the
  // re-open after the back-off. The caller drops the store (if any) before releasing busy.
  void note_failure(GroupSlot& g, const std::string& group, FailedStep step, const Status& why,
                    const std::string& what) {
    FERRY_ASSERT(!why.is_ok());
    const std::string text = why.to_string();
    std::unique_lock lock(mu);
    Health& h = g.health;
    const bool same_cause = h.failing() && why.code() == h.code;
    if (!h.failing()) {
      h.failures = 0;
      h.since = Clock::now();
      h.since_unix_ns = unix_now_ns();
      h.backoff = std::chrono::milliseconds(0);
    }
    ++h.failures;
    h.backoff = next_backoff(h, step);
    h.next_reopen = Clock::now() + h.backoff;
    h.must_reopen = true;
    if (same_cause) {
      spdlog::debug("group '{}': {}, storage still failing ({} failed attempt(s)): {}", group, what,
                    h.failures, text);
    } else {
      spdlog::error("group '{}': {}: {} (the group is re-opened in {}; the receiver resumes once "
                    "the cause is gone)", group, what, text, seconds_text(h.backoff));
      if (!h.failing()) h.cause = what + ": " + text;
    }
    h.code = why.code();
    h.step = step;
    h.last_error = what + ": " + text;
    FERRY_ASSERT(h.failing() && h.failures > 0);
    lock.unlock();
    if (!same_cause) events->error(group, 0, what, why);  // once per cause, like the log
  }

  // After a successful open: the store is usable again. Ends an episode whose cause the
  // re-open cured (a failed open or apply); an RP failure's episode waits for a commit.
  void note_opened(GroupSlot& g, const std::string& group, const GroupStore& store,
                   Clock::duration open_cost) {
    std::lock_guard lock(mu);
    Health& h = g.health;
    h.must_reopen = false;
    h.last_open_cost = std::chrono::ceil<std::chrono::milliseconds>(open_cost);
    h.committed = store.last_committed_rp();
    h.applied = store.last_applied_rp();
    if (!h.failing()) return;
    if (h.step == FailedStep::rp) {
      spdlog::debug("group '{}': store re-opened; last committed RP {}, applied RP {}", group,
                    h.committed, h.applied);
      return;
    }
    spdlog::info("group '{}': store re-opened after {} failed attempt(s) over {}; last committed "
                 "RP {}, applied RP {} (cause: {})", group, h.failures,
                 seconds_text(Clock::now() - h.since), h.committed, h.applied, h.cause);
    h = Health{.committed = h.committed, .applied = h.applied,
               .last_commit_unix_ns = h.last_commit_unix_ns, .source = h.source,
               .apply = std::move(h.apply)};
  }

  // After anything that may have applied (an open, a commit, a retry): starts, continues or
  // ends the group's apply episode from the store's apply_error() (R19).
  void note_apply(GroupSlot& g, const std::string& group, const GroupStore& store,
                  const std::string& what) {
    const Status err = store.apply_error();
    std::lock_guard lock(mu);
    Health& h = g.health;
    ApplyEpisode& a = h.apply;
    h.committed = store.last_committed_rp();
    h.applied = store.last_applied_rp();
    if (err.is_ok()) {
      if (a.pending())
        spdlog::info("group '{}': replica caught up: applied RP {} after {} failed attempt(s) "
                     "over {} (cause: {})", group, h.applied, a.failures,
                     seconds_text(Clock::now() - a.since), a.cause);
      a = ApplyEpisode{};
      return;
    }
    const std::string text = err.to_string();
    if (!a.pending()) {
      a.since = Clock::now();
      a.since_unix_ns = unix_now_ns();
      a.cause = what + ": " + text;
      a.backoff = options.reopen_min;
      spdlog::error("group '{}': {}: {} (committed RPs are durable in the journal and still "
                    "acknowledged; the apply is retried in {})", group,
                    what, text, seconds_text(a.backoff));
    } else {
      a.backoff = std::min(a.backoff * 2, options.reopen_max);
      spdlog::debug("group '{}': apply still failing ({} failed attempt(s)): {}", group,
                    a.failures + 1, text);
    }
    ++a.failures;
    a.last_error = what + ": " + text;
    a.next_retry = Clock::now() + a.backoff;
    FERRY_ASSERT(a.pending() && a.failures > 0);
  }

  // Whether a commit must leave a pending apply to its back-off: a retry rewrites the whole
  // replica (it is untrusted, R19), too heavy to repeat at every RP of a large disk.
  bool apply_retry_waits(const GroupSlot& g) {
    std::lock_guard lock(mu);
    const ApplyEpisode& a = g.health.apply;
    return a.pending() && Clock::now() < a.next_retry;
  }

  // Retries the apply of a group whose store is open with an apply pending. A failure that
  // is not the apply's (the store failed: apply_error() is ok) drops the store like any
  // storage failure. The caller holds g.busy.
  void retry_apply(GroupSlot& g, const std::string& group) {
    FERRY_ASSERT(g.store);
    refresh_retention(g, group);
    Status s = g.store->apply_committed();
    if (!s.is_ok() && g.store->apply_error().is_ok()) {
      note_failure(g, group, FailedStep::apply, s, "applying committed RPs failed");
      g.store.reset();
      return;
    }
    note_apply(g, group, *g.store, "retrying the apply failed");
  }

  // Opens the group's store unless it is open; refuses while a failed group's back-off runs.
  // The caller holds g.busy.
  Status ensure_open(GroupSlot& g, const std::string& group, bool create) {
    if (g.store) return Status::ok();
    {
      std::lock_guard lock(mu);
      const Health& h = g.health;
      if (h.must_reopen && Clock::now() < h.next_reopen)
        return Status::error(h.code, "group '" + group + "' has been failing for " +
                                         seconds_text(Clock::now() - h.since) + " (" + h.cause +
                                         "); its store is re-opened in " +
                                         seconds_text(h.next_reopen - Clock::now()));
    }
    const auto t_open = Clock::now();
    std::uint64_t gen = 0;
    auto store = GroupStore::open(store_options(group, &gen), group, create);
    if (!store.is_ok()) {
      note_failure(g, group, FailedStep::open, store.status(), "cannot open the store");
      return store.status();
    }
    g.store = std::move(store).value();
    g.retention_gen = gen;
    note_opened(g, group, *g.store, Clock::now() - t_open);
    note_apply(g, group, *g.store, "applying committed RPs at open failed");
    return Status::ok();
  }

  // A group failed over (failover_state.h) is refused, and its store closed so that `ferry
  // failover` can take the group lock. The caller holds g.busy.
  std::optional<std::string> failover_refusal(GroupSlot& g, const std::string& group) {
    auto why = failover_refusal_for(options.store.root + "/" + group, group);
    if (why && g.store) {
      g.store.reset();
      spdlog::info("group '{}': {}; its store is closed", group, *why);
    }
    return why;
  }

  // Re-opens failed groups whose back-off has run out, so a group recovers without waiting
  // for its source (a group that failed at start-up or after an acknowledged RP), and retries
  // pending applies likewise (R19).
  void reopen_loop() {
    std::unique_lock lock(mu);
    while (!stopping) {
      wake.wait_for(lock, std::chrono::milliseconds(250));
      if (stopping) return;
      std::vector<std::pair<std::string, GroupSlot*>> due, failed_over_groups;
      const auto now = Clock::now();
      for (auto& [name, g] : groups) {
        const Health& h = g->health;
        if (failed_over(options.store.root + "/" + name)) {
          failed_over_groups.emplace_back(name, g.get());
          continue;
        }
        if ((h.must_reopen && now >= h.next_reopen) ||
            (h.apply.pending() && now >= h.apply.next_retry))
          due.emplace_back(name, g.get());
      }
      lock.unlock();
      for (auto& [name, g] : failed_over_groups) {
        std::unique_lock<std::timed_mutex> busy(g->busy, std::try_to_lock);
        if (busy.owns_lock()) (void)failover_refusal(*g, name);
      }
      for (auto& [name, g] : due) {
        std::unique_lock<std::timed_mutex> busy(g->busy, std::try_to_lock);
        if (!busy.owns_lock()) continue;  // a session serves it and re-opens it itself
        if (!g->store) {
          (void)ensure_open(*g, name, /*create=*/false);
        } else {
          bool pending;
          {
            std::lock_guard l(mu);
            pending = g->health.apply.pending();
          }
          if (pending) retry_apply(*g, name);
        }
      }
      lock.lock();
    }
  }
};

namespace {

// One connection's conversation. Every check that fails ends the connection with a message
// naming the peer, the RP and the field; the open RP is dropped, never committed.
class Session {
 public:
  Session(Receiver::Impl& impl, transport::Connection& conn) : impl_(impl), conn_(conn) {}

  void run() {
    auto hello = read_hello();
    if (!hello) return;
    // Before slot() and ensure_open(): a refused peer creates no group, no directory, no
    // journal byte (C7).
    if (Status a = authorize(hello->group, AccessRight::write); !a.is_ok()) {
      reply_refused(WireStatus::forbidden, a.message());
      return;
    }
    GroupSlot& slot = impl_.slot(hello->group);
    std::unique_lock<std::timed_mutex> lock(slot.busy, std::defer_lock);
    if (!lock.try_lock_for(impl_.options.group_wait)) {
      reply_refused(WireStatus::busy, "group '" + hello->group + "' is being served to another source");
      return;
    }
    if (auto why = impl_.failover_refusal(slot, hello->group)) {
      reply_refused(WireStatus::bad_request, *why);
      return;
    }
    if (Status open = impl_.ensure_open(slot, hello->group, /*create=*/true); !open.is_ok()) {
      // The cause is logged once per episode (note_failure), not at every retry of a source.
      spdlog::debug("{}: group '{}' refused: {}", conn_.peer(), hello->group, open.to_string());
      reply_refused(wire_status_of(open), open.message());
      return;
    }
    store_ = slot.store.get();
    slot_ = &slot;
    hello_ = std::move(*hello);
    group_id_ = transport::group_id_of(hello_.group);
    set_source(conn_.peer());
    Status s = reply_accepted() ? serve_rps() : Status::error(Errc::disconnected, "hello_reply");
    if (store_ && rp_open_) store_->abort_rp();
    if (storage_failed_) {
      // After a failed write or sync the store refuses everything until it is re-opened;
      // re-opening runs recovery (cuts what the failed RP left in the journal, re-applies
      // committed RPs). The next session or the re-opener does that after the back-off, so
      // the receiver resumes by itself once the fault is gone.
      slot.store.reset();
      store_ = nullptr;
      impl_.wake.notify_all();
    }
    set_source("");
    if (!s.is_ok() && s.code() != Errc::disconnected && s.code() != Errc::cancelled) {
      spdlog::error("{}: group '{}': {}", conn_.peer(), hello_.group, s.to_string());
      if (s.code() == Errc::protocol || s.code() == Errc::corrupt || s.code() == Errc::timeout)
        conn_.close_with_error(wire_status_of(s), s.message());
    }
  }

 private:
  std::optional<transport::Hello> read_hello() {
    auto f = conn_.receive(impl_.options.idle_timeout);
    if (!f.is_ok()) {
      log_receive_failure(f.status(), "before hello");
      return std::nullopt;
    }
    if (f->type == MsgType::points_request) {
      serve_points(f->payload);
      return std::nullopt;
    }
    if (f->type == MsgType::probe) {
      serve_probe(conn_, f->payload, impl_.options.test_clock_offset_ms);
      return std::nullopt;
    }
    if (f->type != MsgType::hello) {
      fail_early(std::string("expected hello, got ") + transport::msg_type_name(f->type));
      return std::nullopt;
    }
    auto h = transport::decode_hello(f->payload);
    if (!h.is_ok()) {
      fail_early("bad hello: " + h.status().message());
      return std::nullopt;
    }
    if (h->version != transport::kProtocolVersion) {
      std::string msg = "protocol version " + std::to_string(h->version) +
                        " is not supported (this receiver speaks version " +
                        std::to_string(transport::kProtocolVersion) + ")";
      spdlog::error("{}: {}", conn_.peer(), msg);
      reply_refused(WireStatus::bad_version, msg);
      return std::nullopt;
    }
    std::vector<std::string> names{h->group};
    for (const auto& d : h->disks) names.push_back(d.name);
    // The store's name rule, checked here: a name the store would refuse is the peer's
    // error, not a storage failure, and must not create a group slot (the re-opener would
    // retry it for ever).
    for (std::size_t i = 0; i < names.size(); ++i) {
      if (valid_store_name(names[i])) continue;
      std::string msg = std::string(i == 0 ? "group" : "disk") + " name '" +
                        names[i].substr(0, 64) + "' is not valid (" + kStoreNameRule + ")";
      spdlog::error("{}: {}", conn_.peer(), msg);
      reply_refused(WireStatus::bad_request, msg);
      return std::nullopt;
    }
    return std::move(h).value();
  }

  // The access map's verdict (ReceiverOptions::authorize); a refusal is logged here with the
  // peer's full identity, and its message goes to the peer.
  Status authorize(const std::string& group, AccessRight right) {
    if (!impl_.options.authorize) return Status::ok();  // plaintext mode: no identities
    const transport::PeerIdentity* id = conn_.peer_identity();
    Status a = impl_.options.authorize(id, group, right);
    if (!a.is_ok())
      spdlog::warn("{}: {} of group '{}' refused: {} (peer {})", conn_.peer(),
                   access_right_name(right), group, a.message(),
                   id != nullptr ? id->to_string() : std::string("without a verified identity"));
    return a;
  }

  // A management request (read-only): the kept RPs of a group, newest kMaxPointsPerReply, in
  // one reply; then the connection ends. Needs the manage right; never opens or creates the
  // group (explain_points reads the store without its lock).
  void serve_points(std::string_view payload) {
    auto q = transport::decode_points_request(payload);
    if (!q.is_ok()) {
      fail_early("bad points_request: " + q.status().message());
      return;
    }
    transport::PointsReply r;
    auto refuse = [&r](WireStatus st, const std::string& msg) {
      r.status = st;
      r.message = msg.substr(0, transport::kMaxMessageBytes);
    };
    if (!valid_store_name(q->group)) {
      refuse(WireStatus::bad_request, "group name '" + q->group.substr(0, 64) + "' is not valid (" +
                                          kStoreNameRule + ")");
    } else if (Status a = authorize(q->group, AccessRight::manage); !a.is_ok()) {
      refuse(WireStatus::forbidden, a.message());
    } else {
      auto rep = explain_points(impl_.options.store.root, q->group, unix_now_ns());
      if (!rep.is_ok()) {
        refuse(wire_status_of(rep.status()), "points of group '" + q->group + "': " +
                                                 rep.status().message());
      } else {
        const auto& pts = rep->points;
        const std::size_t skip = pts.size() > transport::kMaxPointsPerReply
                                     ? pts.size() - transport::kMaxPointsPerReply : 0;
        r.truncated = skip > 0;
        for (std::size_t i = skip; i < pts.size(); ++i)
          r.points.push_back({pts[i].info.rp_id, pts[i].info.created_unix_ns,
                              pts[i].info.committed_unix_ns,
                              pts[i].info.rp_id == rep->base_before ? 0 : pts[i].store_bytes});
        spdlog::info("{}: points of group '{}' sent ({} RP(s))", conn_.peer(), q->group,
                     r.points.size());
      }
    }
    (void)conn_.send(MsgType::points_reply, transport::encode(r));
    (void)conn_.flush();
  }

  // The quota (ReceiverOptions::quota_for): what the store takes plus what this RP may add
  // (every disk written in full, the most an RP can journal) must stay within it. Checked
  // before begin_rp, so a refused RP journals nothing.
  Status check_quota(const RpBeginInfo& info) const {
    const std::uint64_t quota = impl_.options.quota_for ? impl_.options.quota_for(hello_.group) : 0;
    if (quota == 0) return Status::ok();
    FERRY_ASSIGN_OR_RETURN(std::uint64_t used,
                           group_usage_bytes(impl_.options.store.root, hello_.group));
    std::uint64_t bound = 0;
    for (const RpBeginInfo::Disk& d : info.disks)
      bound = d.size_bytes > UINT64_MAX - bound ? UINT64_MAX : bound + d.size_bytes;
    if (bound <= quota && used <= quota - bound) return Status::ok();
    return Status::error(Errc::no_space,
        fmt::format("group '{}' is over its quota: its store uses {} bytes and RP {} may add up "
                    "to {} bytes (its disks' size), quota {} bytes (receive.toml: [group.{}] "
                    "quota or [quota] default)", hello_.group, used, info.rp_id, bound, quota,
                    hello_.group));
  }

  void log_receive_failure(const Status& s, const char* when) {
    if (s.code() == Errc::disconnected || s.code() == Errc::cancelled)
      spdlog::info("{}: connection closed {}", conn_.peer(), when);
    else
      spdlog::error("{}: {} ({})", conn_.peer(), s.to_string(), when);
  }

  void fail_early(const std::string& msg) {
    spdlog::error("{}: {}", conn_.peer(), msg);
    conn_.close_with_error(WireStatus::bad_request, msg);
  }

  void reply_refused(WireStatus status, const std::string& msg) {
    transport::HelloReply r;
    r.status = status;
    r.message = msg.substr(0, transport::kMaxMessageBytes);
    (void)conn_.send(MsgType::hello_reply, transport::encode(r));
    (void)conn_.flush();
  }

  bool reply_accepted() {
    transport::HelloReply r;
    r.features = hello_.features & transport::kKnownFeatures;
    features_ = r.features;
    r.last_committed_rp = store_->last_committed_rp();
    for (const RpInfo& p : store_->points())
      if (p.rp_id == r.last_committed_rp) r.last_committed_unix_ns = p.committed_unix_ns;
    for (const RpDiskInfo& d : store_->replica_disks())
      r.disks.push_back({d.name, d.size_bytes, {d.identity, d.identity_ephemeral}});
    if ((r.features & transport::kFeatureDiskIdentity) != 0)
      r.held_source = store_->last_source_name().substr(0, transport::kMaxNameBytes);
    else if (r.last_committed_rp != 0)
      spdlog::info("{}: source '{}' does not send disk identities (an older release): its disks "
                   "are matched by name alone", conn_.peer(), hello_.source_name);
    spdlog::info("{}: source '{}' for group '{}' ({} disk(s)); last committed RP {}", conn_.peer(),
                 hello_.source_name, hello_.group, hello_.disks.size(), r.last_committed_rp);
    Status s = conn_.send(MsgType::hello_reply, transport::encode(r));
    return s.is_ok();
  }

  Status serve_rps() {
    for (;;) {
      FERRY_ASSIGN_OR_RETURN(transport::Frame f, conn_.receive(impl_.options.idle_timeout));
      switch (f.type) {
        case MsgType::rp_begin: FERRY_TRY(on_rp_begin(f.payload)); break;
        case MsgType::data: FERRY_TRY(on_data(f.payload)); break;
        case MsgType::rp_end: FERRY_TRY(on_rp_end(f.payload)); break;
        case MsgType::hash_request: FERRY_TRY(on_hash_request(f.payload)); break;
        case MsgType::error: {
          auto e = transport::decode_error(f.payload);
          return Status::error(Errc::disconnected,
                               "source reported: " + (e.is_ok() ? e->message : "(undecodable)"));
        }
        default:
          return Status::error(Errc::protocol, std::string("unexpected ") +
                                                   transport::msg_type_name(f.type) + " frame");
      }
    }
  }

  // Refuses the open RP with a reason the source will read, then ends the connection.
  Status refuse_rp(std::uint64_t rp_id, const Status& why) {
    spdlog::error("{}: group '{}': RP {} refused: {}", conn_.peer(), hello_.group, rp_id,
                  why.to_string());
    impl_.events->rp_refused(hello_.group, rp_id, why);
    return send_refusal(rp_id, why);
  }

  // A failure of the receiver's own storage (EIO, ENOSPC, a failed sync, anything the store
  // reports that is not a refusal by rule): the RP is refused as retryable and the store is
  // dropped at the end of the session and re-opened after the back-off (Impl::note_failure).
  Status storage_failure(std::uint64_t rp_id, const Status& why) {
    storage_failed_ = true;
    impl_.note_failure(*slot_, hello_.group, FailedStep::rp, why,
                       "RP " + std::to_string(rp_id) + " not committed, the store failed");
    return send_refusal(rp_id, why);
  }

  void set_source(const std::string& peer) {
    std::lock_guard lock(impl_.mu);
    slot_->health.source = peer;
  }

  Status send_refusal(std::uint64_t rp_id, const Status& why) {
    if (rp_open_) store_->abort_rp();
    rp_open_ = false;
    if (impl_.options.on_rp_refused) impl_.options.on_rp_refused(hello_.group, why);
    transport::RpAck ack{rp_id, wire_status_of(why), why.message().substr(0, transport::kMaxMessageBytes)};
    (void)conn_.send(MsgType::rp_ack, transport::encode(ack));
    (void)conn_.flush();
    return Status::error(Errc::cancelled, "RP refused");
  }

  Status on_rp_begin(std::string_view payload) {
    if (rp_open_) return Status::error(Errc::protocol, "rp_begin while RP " + std::to_string(rp_.rp_id) + " is open");
    FERRY_ASSIGN_OR_RETURN(transport::RpBegin b, transport::decode_rp_begin(payload));
    RpBeginInfo info;
    info.rp_id = b.rp_id;
    info.base_rp = b.base_rp;
    info.created_unix_ns = b.created_unix_ns;
    info.flags = b.flags;
    info.source_name = hello_.source_name;
    if (b.disks.empty()) return Status::error(Errc::protocol, "rp_begin names no disk");
    if ((b.flags & transport::kRpFlagIdentities) != 0 &&
        (features_ & transport::kFeatureDiskIdentity) == 0)
      return Status::error(Errc::protocol, "rp_begin: identities without the disk_identity feature");
    if ((b.flags & transport::kRpFlagVmConfig) != 0 && (features_ & transport::kFeatureVmConfig) == 0)
      return Status::error(Errc::protocol, "rp_begin: a VM config without the vm_config feature");
    info.vm_config = carry_vm_config(std::move(b.vm_config));
    std::vector<bool> seen(hello_.disks.size(), false);
    for (const transport::RpDisk& d : b.disks) {
      if (d.disk_index >= hello_.disks.size() || seen[d.disk_index])
        return Status::error(Errc::protocol, "rp_begin names disk index " +
                                                 std::to_string(d.disk_index) + " twice or out of range");
      seen[d.disk_index] = true;
      if (d.mode == transport::DiskMode::resync) {
        if ((features_ & transport::kFeatureHashList) == 0)
          return Status::error(Errc::protocol, "rp_begin: resync mode without the hash_list feature");
        if (Status s = check_resync_disk(b, hello_.disks[d.disk_index].name, d); !s.is_ok())
          return refuse_rp(b.rp_id, s);
      }
      info.disks.push_back({hello_.disks[d.disk_index].name, d.size_bytes,
                            d.mode == transport::DiskMode::full,
                            d.mode == transport::DiskMode::resync, d.identity.id,
                            d.identity.ephemeral});
    }
    log_new_identities(info);
    // Frames name disks by their index in hello; map that to the RP's own disk order.
    disk_slot_.assign(hello_.disks.size(), -1);
    for (std::size_t i = 0; i < b.disks.size(); ++i) disk_slot_[b.disks[i].disk_index] = int(i);
    next_hash_offset_.assign(b.disks.size(), 0);
    hash_bytes_sent_ = 0;
    // Before anything is journalled: an RP the store could commit but never apply would be
    // acknowledged and then wedge the group.
    for (const RpBeginInfo::Disk& d : info.disks)
      if (Status s = check_disk_capacity(impl_.capacity, replica_dir(), hello_.group, d.name,
                                         d.size_bytes, impl_.options.max_disk_bytes);
          !s.is_ok())
        return refuse_rp(b.rp_id, s);
    if (Status s = check_quota(info); !s.is_ok()) return refuse_rp(b.rp_id, s);
    if (auto why = failover_refusal_for(impl_.options.store.root + "/" + hello_.group, hello_.group))
      return refuse_rp(b.rp_id, Status::error(Errc::invalid_argument, *why));
    // The disks were checked here and in hello (names, count, duplicates), so the store's
    // only refusal by rule is C5 (diverged); anything else is the store failing.
    if (Status s = store_->begin_rp(info); !s.is_ok()) {
      if (s.code() == Errc::diverged) return refuse_rp(b.rp_id, s);
      return storage_failure(b.rp_id, s);
    }
    rp_ = std::move(b);
    rp_open_ = true;
    next_seq_ = 0;
    logical_bytes_ = 0;
    t_begin_ = std::chrono::steady_clock::now();
    wire_at_begin_ = conn_.bytes_received();
    impl_.events->rp_started(hello_.group, info, conn_.peer());
    return Status::ok();
  }

  // The RP's VM definition: the one its source sent, else the group's newest RP's (so every
  // stored RP carries its own; vm_config.h). A store that cannot tell leaves it empty.
  std::string carry_vm_config(std::string sent) {
    static_assert(kMaxVmConfigBytes == transport::kMaxVmConfigBytes);
    if (!sent.empty()) return *(slot_->vm_config = std::move(sent));
    if (!slot_->vm_config) {
      auto v = vm_config_at(impl_.options.store.root, hello_.group, 0);
      slot_->vm_config = v.is_ok() ? std::move(v->xml) : std::string();
    }
    return *slot_->vm_config;
  }

  Status check_data(const transport::DataFrame& d) {
    auto bad = [&](const std::string& what) {
      return Status::error(Errc::corrupt, "bad frame: data frame seq " + std::to_string(d.seq) +
                                              " of RP " + std::to_string(d.rp_id) + ": " + what);
    };
    if (d.group_id != group_id_) return bad("belongs to another group");
    if (d.rp_id != rp_.rp_id) return bad("belongs to RP " + std::to_string(d.rp_id) +
                                         ", open RP is " + std::to_string(rp_.rp_id));
    if (d.seq != next_seq_) return bad("out of sequence (expected " + std::to_string(next_seq_) + ")");
    if (d.disk_index >= disk_slot_.size() || disk_slot_[d.disk_index] < 0)
      return bad("disk index " + std::to_string(d.disk_index) + " is not part of the RP");
    std::uint64_t size = rp_.disks[disk_slot_[d.disk_index]].size_bytes;
    if (d.offset_bytes > size || d.length_bytes > size - d.offset_bytes)
      return bad("range " + std::to_string(d.offset_bytes) + "+" + std::to_string(d.length_bytes) +
                 " is past the end of the disk (" + std::to_string(size) + " bytes)");
    if (d.kind == transport::BlockKind::zero) return Status::ok();
    std::string_view plain = d.payload;
    if (d.codec == transport::Codec::zstd) {
      // The wire allows 8 MiB frames, the journal 4 MiB + 64 KiB records: a larger payload is
      // the peer's fault, refused here rather than failing in the store (which would count as
      // a storage failure and make the receiver re-scan the group's journal).
      if (d.payload.size() > kMaxStoredPayloadBytes)
        return bad("compressed payload of " + std::to_string(d.payload.size()) +
                   " bytes is larger than a journal record holds (" +
                   std::to_string(kMaxStoredPayloadBytes) + ")");
      decoded_.resize(d.length_bytes);
      FERRY_TRY(decompressor_->decompress(d.payload.data(), d.payload.size(), decoded_.data(),
                                          d.length_bytes));
      plain = std::string_view(decoded_.data(), d.length_bytes);
    }
    if (plain.size() != d.length_bytes) return bad("payload length does not match");
    if (!(xxh3_128(plain.data(), plain.size()) == d.hash)) return bad("block checksum mismatch");
    return Status::ok();
  }

  Status on_data(std::string_view payload) {
    if (!rp_open_) return Status::error(Errc::protocol, "data frame outside an RP");
    FERRY_KILL_POINT("receiver.frame_received");
    auto d = transport::decode_data(payload, features_);
    if (!d.is_ok()) return refuse_rp(rp_.rp_id, d.status().with_context("bad frame"));
    if (!decompressor_) {
      FERRY_ASSIGN_OR_RETURN(Decompressor dc, Decompressor::create());
      decompressor_.emplace(std::move(dc));
    }
    if (Status s = check_data(*d); !s.is_ok()) return refuse_rp(rp_.rp_id, s);
    BlockRecord rec;
    rec.rp_id = d->rp_id;
    rec.seq = d->seq;
    rec.disk_index = static_cast<std::uint16_t>(disk_slot_[d->disk_index]);
    rec.kind = d->kind == transport::BlockKind::zero ? RecordKind::zero : RecordKind::data;
    rec.codec = d->codec == transport::Codec::zstd ? RecordCodec::zstd : RecordCodec::none;
    rec.offset_bytes = d->offset_bytes;
    rec.length_bytes = d->length_bytes;
    rec.hash = d->hash;
    rec.payload = d->payload;
    if (Status s = store_->append_block(rec); !s.is_ok()) return storage_failure(rp_.rp_id, s);
    ++next_seq_;
    logical_bytes_ += d->length_bytes;
    return Status::ok();
  }

  // A disk that comes back under a held name with another identity may only be a resync or a
  // full copy (the store refuses an incremental by C5.identity); it is accepted, and said.
  void log_new_identities(const RpBeginInfo& info) const {
    static_assert(kRpFlagTakeOver == transport::kRpFlagTakeOver);
    const std::vector<RpDiskInfo> held = store_->replica_disks();
    for (const RpBeginInfo::Disk& d : info.disks) {
      if (!d.full && !d.resync) continue;  // an incremental is refused by C5.identity, logged then
      for (const RpDiskInfo& h : held) {
        if (h.name != d.name || h.identity == Hash128{} || d.identity == Hash128{} ||
            h.identity == d.identity)
          continue;
        spdlog::warn("{}: group '{}': disk '{}' of RP {} has identity {}, the replica holds {}; "
                     "accepted as a {}{}", conn_.peer(), hello_.group, d.name, info.rp_id,
                     d.identity.hex(), h.identity.hex(), d.full ? "full copy" : "resync",
                     (info.flags & kRpFlagTakeOver) != 0 ? " (take-over)" : "");
      }
    }
  }

  // A resync disk is a delta on base_rp like an incremental one, so the replica must hold it
  // at base_rp, and at the same size: the digests describe the replica as it is, and a resize
  // is sent as a full copy by the source (docs/ARCHITECTURE.md, "Resync").
  Status check_resync_disk(const transport::RpBegin& b, const std::string& name,
                           const transport::RpDisk& d) const {
    auto refused = [&](const char* rule, const std::string& what) {
      return Status::error(Errc::diverged, "RP " + std::to_string(b.rp_id) + " refused by rule " +
                                               rule + ": resync disk " + name + " " + what);
    };
    if (b.base_rp != store_->last_committed_rp())
      return Status::ok();  // begin_rp refuses it by C5.base, naming both numbers
    for (const RpDiskInfo& held : store_->replica_disks()) {
      if (held.name != name) continue;
      if (held.size_bytes != d.size_bytes)
        return refused("C4.resync_size", "is " + std::to_string(d.size_bytes) +
                                              " bytes, the replica at base RP " +
                                              std::to_string(b.base_rp) + " has " +
                                              std::to_string(held.size_bytes));
      return Status::ok();
    }
    return refused("C4.resync_base", "is not held at base RP " + std::to_string(b.base_rp));
  }

  // Answers with the replica's digests of the range, in hash_lists of at most
  // kMaxHashesPerList. Requests of a disk must move forward (each starts at or after the end
  // of the previous one), so one RP hashes each replica at most once.
  Status on_hash_request(std::string_view payload) {
    if (!rp_open_) return Status::error(Errc::protocol, "hash_request outside an RP");
    FERRY_ASSIGN_OR_RETURN(transport::HashRequest q, transport::decode_hash_request(payload));
    auto bad = [&](const std::string& what) {
      return Status::error(Errc::protocol, "hash_request for disk index " +
                                               std::to_string(q.disk_index) + " of RP " +
                                               std::to_string(rp_.rp_id) + ": " + what);
    };
    if (q.disk_index >= disk_slot_.size() || disk_slot_[q.disk_index] < 0)
      return bad("the disk is not part of the RP");
    const int slot = disk_slot_[q.disk_index];
    const transport::RpDisk& d = rp_.disks[slot];
    if (d.mode != transport::DiskMode::resync) return bad("the disk is not in resync mode");
    if (q.block_bytes != hello_.disks[q.disk_index].block_bytes)
      return bad("block_bytes " + std::to_string(q.block_bytes) + " is not the disk's " +
                 std::to_string(hello_.disks[q.disk_index].block_bytes) + " from hello");
    if (q.offset_bytes >= d.size_bytes || q.length_bytes > d.size_bytes - q.offset_bytes)
      return bad("range past the end of the disk (" + std::to_string(d.size_bytes) + " bytes)");
    if (q.offset_bytes < next_hash_offset_[slot])
      return bad("range starts at " + std::to_string(q.offset_bytes) +
                 ", before the end of the previous request " +
                 std::to_string(next_hash_offset_[slot]));
    next_hash_offset_[slot] = q.offset_bytes + q.length_bytes;
    const std::string& name = hello_.disks[q.disk_index].name;
    const std::uint64_t end = q.offset_bytes + q.length_bytes;
    for (std::uint64_t at = q.offset_bytes; at < end;) {
      std::uint64_t blocks = (end - at + q.block_bytes - 1) / q.block_bytes;
      auto count = static_cast<std::uint32_t>(
          std::min<std::uint64_t>(blocks, transport::kMaxHashesPerList));
      transport::HashList list;
      list.disk_index = q.disk_index;
      list.block_bytes = q.block_bytes;
      list.offset_bytes = at;
      auto digests = store_->replica_digests(name, at, q.block_bytes, count);
      if (!digests.is_ok()) return storage_failure(rp_.rp_id, digests.status());
      list.hashes = std::move(digests).value();
      std::string out = transport::encode(list);
      hash_bytes_sent_ += transport::kFrameHeaderBytes + out.size();
      FERRY_TRY(conn_.send_owned(MsgType::hash_list, std::move(out)));
      at += std::uint64_t(count) * q.block_bytes;
    }
    return Status::ok();
  }

  Status on_rp_end(std::string_view payload) {
    if (!rp_open_) return Status::error(Errc::protocol, "rp_end outside an RP");
    FERRY_ASSIGN_OR_RETURN(transport::RpEnd e, transport::decode_rp_end(payload, features_));
    if (e.rp_id != rp_.rp_id || e.frame_count != next_seq_ || e.logical_bytes != logical_bytes_)
      return refuse_rp(rp_.rp_id, Status::error(Errc::corrupt,
          "rp_end totals do not match what arrived: " + std::to_string(e.frame_count) +
          " frames / " + std::to_string(e.logical_bytes) + " bytes announced, " +
          std::to_string(next_seq_) + " / " + std::to_string(logical_bytes_) + " received"));
    RpReceived seen{hello_.group, e.rp_id, e.frame_count, e.logical_bytes,
                    conn_.bytes_received() - wire_at_begin_, seconds_since(t_begin_)};
    auto t_step = std::chrono::steady_clock::now();
    auto info = store_->commit_rp(e.rp_id, e.frame_count, e.logical_bytes);
    if (!info.is_ok()) {
      // The totals were checked above; the store's own check (protocol) is a refusal, any
      // other failure is the store's.
      if (info.status().code() == Errc::protocol) return refuse_rp(e.rp_id, info.status());
      return storage_failure(e.rp_id, info.status());
    }
    rp_open_ = false;
    note_committed(e.rp_id);
    FERRY_KILL_POINT("receiver.before_ack");
    // The RP is committed whatever happens to the acknowledgement: a source that closes as
    // soon as it has read the ack can make flush() fail. Apply it all the same, so the replica
    // is never older than an acknowledged RP, then report the connection's state.
    seen.durable_seconds = seconds_since(t_step);
    t_step = std::chrono::steady_clock::now();
    transport::RpAck ok_ack{e.rp_id, WireStatus::ok, ""};
    if ((features_ & transport::kFeatureRpTimes) != 0)
      ok_ack.times = transport::RpTimes{std::uint64_t(seen.receive_seconds * 1e6),
                                        std::uint64_t(seen.durable_seconds * 1e6)};
    Status acked = conn_.send(MsgType::rp_ack, transport::encode(ok_ack));
    if (acked.is_ok()) acked = conn_.flush();
    FERRY_KILL_POINT("receiver.after_ack");
    seen.ack_seconds = seconds_since(t_step);
    seen.acknowledged = acked.is_ok();
    t_step = std::chrono::steady_clock::now();
    double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_begin_).count();
    spdlog::info("group '{}': RP {} committed{} ({} frames, {:.1f} MB, {:.2f} s{})", hello_.group,
                 e.rp_id, acked.is_ok() ? " and acknowledged" : ", acknowledgement not confirmed",
                 e.frame_count, e.logical_bytes / 1e6, secs,
                 hash_bytes_sent_ ? fmt::format("; resync: {:.2f} MB of digests sent",
                                                hash_bytes_sent_ / 1e6)
                                  : std::string());
    impl_.events->rp_committed(hello_.group, *info, e.frame_count, e.logical_bytes, secs,
                               acked.is_ok());
    // Applying is not needed for durability (the journal has it). A failed apply leaves the
    // store open with the apply pending (R19): later RPs are still committed, and the apply
    // is retried by the first commit after the back-off and by the re-opener; status shows it
    // with its cause. Only a failure of the store itself (apply_error() ok) drops it.
    impl_.refresh_retention(*slot_, hello_.group);
    if (impl_.apply_retry_waits(*slot_)) {
      spdlog::debug("group '{}': RP {} not applied: the apply is retried after its back-off",
                    hello_.group, e.rp_id);
    } else if (Status s = apply_and_report(); !s.is_ok() && store_->apply_error().is_ok()) {
      storage_failed_ = true;
      impl_.note_failure(*slot_, hello_.group, FailedStep::apply, s,
                         "applying RP " + std::to_string(e.rp_id) +
                             " to the replica failed (it is durable in the journal; retried)");
    } else {
      impl_.note_apply(*slot_, hello_.group, *store_,
                       "applying RP " + std::to_string(e.rp_id) + " to the replica failed");
    }
    seen.apply_seconds = seconds_since(t_step);
    seen.source_times = e.times;
    keep_rp_times(seen);
    if (impl_.options.on_rp_committed) impl_.options.on_rp_committed(seen);
    return acked;
  }

  // The RP's stages, kept with it in the group's side file (rp_times.h): monitoring data, so
  // a failure is logged and changes nothing else.
  void keep_rp_times(const RpReceived& r) {
    auto us = [](double s) { return std::uint64_t(s * 1e6); };
    RpTimesRecord rec;
    rec.rp_id = r.rp_id;
    if (r.source_times)
      rec.source = RpTimesRecord::Source{r.source_times->slot_us, r.source_times->capture_us,
                                         r.source_times->read_us, r.source_times->hash_compress_us,
                                         r.source_times->send_us};
    rec.receive_us = us(r.receive_seconds);
    rec.durable_us = us(r.durable_seconds);
    rec.ack_us = us(r.ack_seconds);
    rec.apply_us = us(r.apply_seconds);
    if (Status s = append_rp_times(impl_.options.store.root, r.group, rec); !s.is_ok())
      spdlog::warn("group '{}': RP {}'s stage times not kept: {}", r.group, r.rp_id, s.to_string());
  }

  // apply_committed() with its events: rp_applied and the RPs retention pruned, or the error.
  Status apply_and_report() {
    const auto before = ReceiverEvents::point_ids(*store_);
    const std::uint64_t base_before = store_->last_applied_rp();
    Status s = store_->apply_committed();
    impl_.events->applied(hello_.group, before, base_before, *store_, s);
    return s;
  }

  // An RP committed: the episode (if any) ends with one "storage resumed" line.
  void note_committed(std::uint64_t rp_id) {
    std::lock_guard lock(impl_.mu);
    Health& h = slot_->health;
    h.committed = rp_id;
    h.last_commit_unix_ns = unix_now_ns();
    if (!h.failing()) return;
    spdlog::info("group '{}': storage resumed: RP {} committed after {} failed attempt(s) over {} "
                 "(cause: {})", hello_.group, rp_id, h.failures, seconds_text(Clock::now() - h.since),
                 h.cause);
    h = Health{.committed = h.committed, .applied = h.applied,
               .last_commit_unix_ns = h.last_commit_unix_ns, .source = h.source,
               .apply = std::move(h.apply)};
  }

  std::string replica_dir() const {
    return impl_.options.store.root + "/" + hello_.group + "/replica";
  }

  Receiver::Impl& impl_;
  transport::Connection& conn_;
  GroupStore* store_ = nullptr;
  GroupSlot* slot_ = nullptr;
  bool storage_failed_ = false;
  transport::Hello hello_;
  std::uint64_t group_id_ = 0;
  transport::RpBegin rp_;
  bool rp_open_ = false;
  std::vector<int> disk_slot_;
  std::uint32_t features_ = 0;                  // accepted in hello_reply
  std::vector<std::uint64_t> next_hash_offset_;  // per RP disk: where the next request may start
  std::uint64_t hash_bytes_sent_ = 0;            // hash_list frames of the open RP
  std::uint64_t next_seq_ = 0;
  std::uint64_t logical_bytes_ = 0;
  std::optional<Decompressor> decompressor_;
  std::string decoded_;
  std::chrono::steady_clock::time_point t_begin_;
  std::uint64_t wire_at_begin_ = 0;  // conn_.bytes_received() at rp_begin

  static double seconds_since(std::chrono::steady_clock::time_point t) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
  }
};

}  // namespace

Receiver::Receiver(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Receiver::~Receiver() = default;

Result<std::unique_ptr<Receiver>> Receiver::create(const ReceiverOptions& options) {
  if (options.store.root.empty())
    return Status::error(Errc::invalid_argument, "no store directory given");
  FERRY_TRY(make_dirs(options.store.root));
  auto impl = std::make_unique<Impl>();
  impl->options = options;
  impl->events = std::make_unique<ReceiverEvents>(options.store.root, options.event_log_bytes);
  impl->retention_for = options.retention_for;
  // Recover every group now, not at its source's next hello: after a crash the replicas are
  // brought back to one committed RP (torn tail cut, committed RPs re-applied) at start-up.
  // A group that cannot be opened is reported and re-opened after the back-off.
  std::error_code ec;
  for (const auto& entry : std::filesystem::directory_iterator(options.store.root, ec)) {
    if (!entry.is_directory()) continue;
    const std::string group = entry.path().filename().string();
    std::error_code exists_ec;
    if (!std::filesystem::exists(entry.path() / "journal", exists_ec)) {
      // Not a group (lost+found at the root of a file system, an operator's directory).
      spdlog::info("store {}: '{}' is not a group (no journal): skipped", options.store.root, group);
      continue;
    }
    GroupSlot& slot = impl->slot(group);
    const auto t_open = Clock::now();
    std::uint64_t gen = 0;
    auto store = GroupStore::open(impl->store_options(group, &gen), group, /*create=*/false);
    if (!store.is_ok()) {
      impl->note_failure(slot, group, FailedStep::open, store.status(),
                         "recovery at start-up failed");
      continue;
    }
    spdlog::info("group '{}': recovered; last committed RP {}, applied RP {}", group,
                 (*store)->last_committed_rp(), (*store)->last_applied_rp());
    slot.store = std::move(store).value();
    slot.retention_gen = gen;
    {
      std::lock_guard lock(impl->mu);
      slot.health.last_open_cost =
          std::chrono::ceil<std::chrono::milliseconds>(Clock::now() - t_open);
    }
    impl->note_apply(slot, group, *slot.store, "applying committed RPs at start-up failed");
  }
  if (ec) return Status::from_errno(ec.value(), "list store directory " + options.store.root);
  Impl* raw = impl.get();
  impl->reopener = std::thread([raw] { raw->reopen_loop(); });
  return std::unique_ptr<Receiver>(new Receiver(std::move(impl)));
}

void Receiver::set_retention(std::function<RetentionPolicy(const std::string&)> retention_for) {
  std::lock_guard lock(impl_->mu);
  impl_->retention_for = std::move(retention_for);
  impl_->retention_gen += 1;
}

std::vector<GroupStatus> Receiver::status() const {
  std::vector<GroupStatus> out;
  const auto now = Clock::now();
  std::lock_guard lock(impl_->mu);
  for (const auto& [name, g] : impl_->groups) {
    const Health& h = g->health;
    GroupStatus st;
    st.group = name;
    st.last_committed_rp = h.committed;
    st.last_applied_rp = h.applied;
    st.last_commit_unix_ns = h.last_commit_unix_ns;
    st.source = h.source;
    if (h.failing()) {
      st.state = GroupState::failing;
      st.cause = h.cause;
      st.last_error = h.last_error;
      st.failing_since_unix_ns = h.since_unix_ns;
      st.failed_attempts = h.failures;
      if (h.must_reopen && h.next_reopen > now)
        st.next_reopen_in_ms = static_cast<std::uint64_t>(
            std::chrono::duration_cast<std::chrono::milliseconds>(h.next_reopen - now).count());
    } else if (h.apply.pending()) {  // R19: the apply failed; RPs are still accepted
      st.state = GroupState::apply_pending;
      st.cause = h.apply.cause;
      st.last_error = h.apply.last_error;
      st.failing_since_unix_ns = h.apply.since_unix_ns;
      st.failed_attempts = h.apply.failures;
      if (h.apply.next_retry > now)
        st.next_reopen_in_ms = static_cast<std::uint64_t>(
            std::chrono::duration_cast<std::chrono::milliseconds>(h.apply.next_retry - now)
                .count());
    }
    if (auto why = failover_refusal_for(impl_->options.store.root + "/" + name, name)) {
      st.state = GroupState::failed_over;
      st.cause = *why;
    }
    // Layout 2: the images hold the oldest kept RP, so applied < committed is the normal
    // state, not a pending apply.
    out.push_back(std::move(st));
  }
  return out;  // std::map: sorted by name
}

void Receiver::serve(transport::Connection& conn) {
  Session s(*impl_, conn);
  s.run();
}

}  // namespace ferry::site
