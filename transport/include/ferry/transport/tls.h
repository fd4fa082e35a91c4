// Mutual TLS 1.3 for Ferry's connections (OpenSSL 3 through Boost.Asio's SSL streams).
//
// A TlsConfig is loaded once from files (certificate chain, private key, CA bundle, optional
// CRL) and is immutable; a reload (SIGHUP) loads a new one and hands it to the Server, whose
// next handshakes use it while connections in flight keep theirs. Both ends verify the peer's
// chain against the CA, its validity dates, revocation (when a CRL is given: the leaf and
// every CA of the chain must be covered by a CRL of its issuer) and, on the client, the
// server's name (DNS SAN or IP SAN, never the subject CN). Only TLS 1.3 is offered and
// accepted. Private keys must not be readable or writable by group or others (a clear error
// names the file and its mode).
//
// This header does not include Asio or OpenSSL.
#pragma once

#include <chrono>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "ferry/base/status.h"

namespace ferry::transport {

struct TlsFiles {
  std::string cert;  // PEM: the leaf certificate, then any intermediates
  std::string key;   // PEM private key matching cert; mode must deny group/other access
  std::string ca;    // PEM bundle of the CA certificates that sign peers
  std::string crl;   // optional PEM CRL(s); empty: no revocation check
  bool any() const { return !cert.empty() || !key.empty() || !ca.empty() || !crl.empty(); }
};

// Who is at the other end of a verified TLS connection.
struct PeerIdentity {
  std::string subject;                 // RFC 2253 subject, for logs only
  std::vector<std::string> dns_names;  // subjectAltName DNS entries
  std::vector<std::string> uris;       // subjectAltName URI entries (e.g. spiffe://...)
  std::vector<std::string> ips;        // subjectAltName IP entries, text form
  std::string spki_sha256;             // "sha256:" + 64 lowercase hex of the DER SPKI
  // "subject (SAN dns:a, uri:b, ip:c; sha256:...)", for log lines and refusals.
  std::string to_string() const;
};

class TlsConfig {
 public:
  enum class Role { server, client };
  // Loads and checks the files: the key is private (mode), parses, matches the certificate;
  // the certificate is currently valid and chains to the CA; the CRL parses. Every error
  // names the file and what is wrong with it.
  static Result<std::shared_ptr<const TlsConfig>> load(Role role, const TlsFiles& files);
  virtual ~TlsConfig() = default;
  virtual Role role() const = 0;
  virtual const TlsFiles& files() const = 0;
  // Implementation handle (an asio::ssl::context*), for connection.cc and the management
  // API's HTTPS server (metrics/http_server.cc) only.
  virtual void* native() const = 0;
};

// The verified identity of the peer of a finished server handshake, given the connection's
// OpenSSL SSL* (an ssl stream's native_handle()); nullopt when the peer presented no
// certificate or its chain did not verify. For servers outside transport (the HTTP API).
std::optional<PeerIdentity> verified_peer(void* native_ssl);

}  // namespace ferry::transport
