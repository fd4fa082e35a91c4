// The source side of one group: capture -> extents -> read -> hash -> zero/compress -> frame ->
// send -> wait for the durable acknowledgement -> finish the capture.
//
// Reads are asynchronous (the reader's own API, libnbd's aio for NBD views) with the number
// and bytes in flight bounded; hashing and compression run on a small worker pool; frames go
// out through one Connection whose bounded send queue pushes back on the workers.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "ferry/base/status.h"
#include "ferry/cbt/reader.h"
#include "ferry/cbt/source.h"
#include "ferry/transport/connection.h"
#include "ferry/transport/rules.h"

namespace ferry::source {

// The sender's block (the unit it reads, hashes and frames): a block size the wire carries
// (transport::block_bytes_valid, the owner of the rule) of at least 4 KiB.
inline constexpr std::uint32_t kMinSendBlockBytes = 4096;

struct RpStats;

struct SenderOptions {
  transport::Endpoint to;
  std::string group;
  std::string source_name;              // for the receiver's logs
  std::vector<std::string> disk_names;  // in the order of the group
  std::uint32_t block_bytes = 64u << 10;
  int zstd_level = transport::kDefaultZstdLevel;
  unsigned workers = 0;                  // hash/compress threads; 0: one per core, at most 4
  std::size_t max_inflight_reads = 64;   // reads submitted and not completed
  std::size_t max_buffer_bytes = 16u << 20;  // read buffers (in flight + being compressed)
  std::chrono::milliseconds ack_timeout{600000};
  transport::ConnectionOptions connection;
  // Opens the reader of a captured view; defaults to cbt::open_nbd_reader.
  std::function<Result<std::unique_ptr<cbt::BlockReader>>(const cbt::DiskView&)> open_reader;
  // Called now and then with (bytes done, bytes total) of the RP, for a progress line: the
  // bytes of the disks' ranges gone through (read or found zero) out of the disks' sizes.
  std::function<void(std::uint64_t, std::uint64_t)> progress;
  // Called after the handshake with the receiver's last committed RP and its time (0: none),
  // so that a restarted agent knows its RPO before its first RP completes.
  std::function<void(std::uint64_t rp_id, std::uint64_t unix_ns)> on_receiver_state;
  // Called once the RP's disks and their modes are known, before rp_begin is sent (the
  // event log's rp_started and bitmap_lost: sender_events.h).
  std::function<void(const RpStats&)> on_started;
  // Take the group over from the source that wrote it (`--take-over`): the receiver's rule
  // C5.source is lifted and every disk is sent as a resync or a full copy.
  bool take_over = false;
  // Set to true to stop (SIGTERM): the RP in flight is abandoned safely.
  const std::atomic<bool>* stop = nullptr;
};

struct DiskStats {
  std::string name;
  std::uint64_t size_bytes = 0;
  cbt::FullReason full_reason = cbt::FullReason::none;
  // How the disk was sent: incremental (change tracking), full, or resync (change tracking
  // lost but the receiver holds the disk: only blocks whose digests differ were sent; C4).
  transport::DiskMode mode = transport::DiskMode::full;
  std::uint64_t extent_bytes = 0;   // bytes covered by the extents to send
  std::uint64_t read_bytes = 0;     // bytes read from the view
  std::uint64_t zero_bytes = 0;     // sent as zero records (unread or found zero)
  std::uint64_t data_bytes = 0;     // sent as data records (uncompressed size)
  std::uint64_t payload_bytes = 0;  // data records' payload on the wire (compressed)
  std::uint64_t frames = 0;
  std::uint64_t resync_compared_blocks = 0;  // blocks compared with the receiver's digests
  std::uint64_t resync_sent_blocks = 0;      // of which differed and were sent
  std::uint64_t resync_hash_bytes = 0;       // hash_list frame bytes received for the disk
};

struct RpStats {
  std::uint64_t rp_id = 0;
  std::uint64_t base_rp = 0;
  std::vector<DiskStats> disks;
  std::uint64_t wire_bytes = 0;  // every byte sent on the connection for this RP
  // Resync traffic: hash_request frames sent plus hash_list frames received (0 without resync).
  std::uint64_t hash_bytes = 0;
  // Where the RP's time went (explainable RPO, docs/operations.md): the stages in order. The
  // transfer is pipelined, so its wall time is attributed: send is the time the one send
  // channel spent handing frames to a full connection (the link's backpressure) plus the
  // final flush; hash_compress the workers' busy time divided by their number; read the rest
  // (waiting for reads and extent queries). They add up to transfer_seconds + the flush.
  double slot_seconds = 0;           // connect + hello: waiting for the group's slot
  double read_seconds = 0;
  double hash_compress_seconds = 0;
  double send_seconds = 0;
  double durable_seconds = 0;        // rp_end flushed until the acknowledgement arrived
  std::uint64_t created_unix_ns = 0; // the capture's start: the RP's point in time (upper bound)
  double capture_seconds = 0;    // bitmap transaction + fleecing + exports
  double transfer_seconds = 0;   // extents, reads, compression, sending
  double commit_seconds = 0;     // from rp_end until the acknowledgement
  double finish_seconds = 0;     // views torn down, bitmaps cleaned up
  double total_seconds = 0;      // capture start to acknowledgement
  double cpu_seconds = 0;        // process CPU time spent during the RP
  // A group of several VMs: how long they were paused for the cross-VM instant.
  bool vms_paused = false;
  std::uint64_t pause_us = 0;
};

// Takes one recovery point: connects, learns the receiver's last committed RP, captures every
// disk of the group at one instant, sends the changes, waits until the RP is durable on the
// receiver, then finishes the capture (acknowledged: old bitmap dropped; otherwise merged back).
Result<RpStats> take_recovery_point(cbt::ChangeSource& source, const SenderOptions& options);

std::string describe(const RpStats& stats);  // a short human summary

// Splits a pipelined transfer's wall time (stats.transfer_seconds) by the stage that held it:
// send = the send channel's blocked time (at most the wall time), hash_compress = the
// workers' busy time per worker (at most what is left), read = the rest. Pure.
void attribute_transfer(RpStats& stats, double send_channel_seconds, double hash_compress_seconds);

}  // namespace ferry::source
