// The receiver: serves sources over the wire protocol and keeps one GroupStore per group.
//
// Per connection: hello -> hello_reply (the group's last committed RP) -> for each RP:
// rp_begin (checked against the store: C5) -> data frames, each checked (identity, sequence,
// bounds, decoded size, xxh3-128: C3) before it reaches the journal -> rp_end (totals checked)
// -> commit (durable) -> rp_ack -> apply to the replica. Any bad frame aborts the open RP,
// sends an error naming the problem and closes that connection; the receiver keeps serving.
#pragma once

#include <chrono>
#include <memory>
#include <string>

#include "ferry/base/status.h"
#include "ferry/engine/store.h"
#include "ferry/transport/connection.h"

namespace ferry::engine {

struct ReceiverOptions {
  StoreOptions store;  // store.root is the --store directory
  // How long a new session for a group waits while another session holds it.
  std::chrono::milliseconds group_wait{30000};
  // How long a session waits for the next frame before giving up on the peer.
  std::chrono::milliseconds idle_timeout{300000};
};

class Receiver {
 public:
  static Result<std::unique_ptr<Receiver>> create(const ReceiverOptions& options);
  ~Receiver();
  // Serves one connection until it ends; called on the connection's own thread.
  void serve(transport::Connection& conn);

  struct Impl;  // defined in receiver.cc

 private:
  explicit Receiver(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace ferry::engine
