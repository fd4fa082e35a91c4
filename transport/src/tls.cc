// TlsConfig: loads and checks the certificate files once, into an Asio SSL context (OpenSSL 3).
//
// Everything that can be checked before a peer connects is checked here, so a bad file is a
// start-up error naming the file, not a handshake failure later: the key's mode (no group or
// other bits), that key and certificate parse and match, that our certificate is valid now and
// chains to the CA bundle, and that the CRL parses. No crypto of our own: OpenSSL verifies
// chains, dates, names and revocation during the handshake.
#include "tls_internal.h"

#include <openssl/pem.h>
#include <sys/stat.h>

#include <cerrno>
#include <cstring>

#include <fmt/format.h>

namespace ferry::transport {

namespace asio = boost::asio;
using namespace tls_detail;

namespace tls_detail {

std::string take_openssl_errors() {
  std::string out;
  // Bounded: the queue holds at most ERR_NUM_ERRORS entries, but do not trust that.
  for (int i = 0; i < 16; ++i) {
    unsigned long e = ERR_get_error();
    if (e == 0) break;
    char buf[256];
    ERR_error_string_n(e, buf, sizeof buf);
    if (!out.empty()) out += "; ";
    out += buf;
  }
  ERR_clear_error();
  return out;
}

namespace {

std::string asn1_string_text(const ASN1_STRING* s) {
  return std::string(reinterpret_cast<const char*>(ASN1_STRING_get0_data(s)),
                     static_cast<std::size_t>(ASN1_STRING_length(s)));
}

std::string ip_text(const ASN1_OCTET_STRING* ip) {
  const unsigned char* p = ASN1_STRING_get0_data(ip);
  int n = ASN1_STRING_length(ip);
  if (n == 4) return fmt::format("{}.{}.{}.{}", p[0], p[1], p[2], p[3]);
  if (n == 16) {
    boost::asio::ip::address_v6::bytes_type b;
    std::memcpy(b.data(), p, 16);
    return boost::asio::ip::address_v6(b).to_string();
  }
  return "(bad IP)";
}

std::string time_text(const ASN1_TIME* t) {
  BioPtr bio(BIO_new(BIO_s_mem()));
  if (!bio || ASN1_TIME_print(bio.get(), t) != 1) return "?";
  char* data = nullptr;
  long n = BIO_get_mem_data(bio.get(), &data);
  return std::string(data, static_cast<std::size_t>(n));
}

}  // namespace

PeerIdentity identity_of(X509* cert) {
  FERRY_ASSERT(cert != nullptr);
  PeerIdentity id;
  {
    BioPtr bio(BIO_new(BIO_s_mem()));
    if (bio && X509_NAME_print_ex(bio.get(), X509_get_subject_name(cert), 0, XN_FLAG_RFC2253) >= 0) {
      char* data = nullptr;
      long n = BIO_get_mem_data(bio.get(), &data);
      id.subject.assign(data, static_cast<std::size_t>(n));
    }
  }
  GeneralNamesPtr names(static_cast<GENERAL_NAMES*>(
      X509_get_ext_d2i(cert, NID_subject_alt_name, nullptr, nullptr)));
  // Bounded: a certificate with thousands of names is not a Ferry peer.
  constexpr int kMaxNames = 64;
  int count = names ? std::min(sk_GENERAL_NAME_num(names.get()), kMaxNames) : 0;
  for (int i = 0; i < count; ++i) {
    const GENERAL_NAME* gn = sk_GENERAL_NAME_value(names.get(), i);
    if (gn->type == GEN_DNS) id.dns_names.push_back(asn1_string_text(gn->d.dNSName));
    if (gn->type == GEN_URI)
      id.uris.push_back(asn1_string_text(gn->d.uniformResourceIdentifier));
    if (gn->type == GEN_IPADD) id.ips.push_back(ip_text(gn->d.iPAddress));
  }
  // sha256 of the DER SubjectPublicKeyInfo: stable across re-issues with the same key.
  unsigned char* der = nullptr;
  int der_len = i2d_PUBKEY(X509_get0_pubkey(cert), &der);
  if (der_len > 0) {
    unsigned char md[32];
    unsigned int md_len = 0;
    if (EVP_Digest(der, static_cast<std::size_t>(der_len), md, &md_len, EVP_sha256(), nullptr) == 1) {
      id.spki_sha256 = "sha256:";
      for (unsigned int i = 0; i < md_len; ++i) id.spki_sha256 += fmt::format("{:02x}", md[i]);
    }
    OPENSSL_free(der);
  }
  return id;
}

std::string san_text(X509* cert) {
  if (cert == nullptr) return "no certificate";
  PeerIdentity id = identity_of(cert);
  std::string out;
  auto add = [&](const char* kind, const std::string& v) {
    if (!out.empty()) out += ", ";
    out += kind;
    out += v;
  };
  for (const auto& d : id.dns_names) add("DNS:", d);
  for (const auto& u : id.uris) add("URI:", u);
  for (const auto& ip : id.ips) add("IP:", ip);
  return out.empty() ? "no subjectAltName" : out;
}

}  // namespace tls_detail

std::optional<PeerIdentity> verified_peer(void* native_ssl) {
  FERRY_ASSERT(native_ssl != nullptr);
  SSL* ssl = static_cast<SSL*>(native_ssl);
  X509* cert = SSL_get0_peer_certificate(ssl);
  if (cert == nullptr || SSL_get_verify_result(ssl) != X509_V_OK) return std::nullopt;
  return tls_detail::identity_of(cert);
}

std::string PeerIdentity::to_string() const {
  std::string san;
  auto add = [&](const char* kind, const std::string& v) {
    if (!san.empty()) san += ", ";
    san += kind;
    san += v;
  };
  for (const auto& d : dns_names) add("dns:", d);
  for (const auto& u : uris) add("uri:", u);
  for (const auto& ip : ips) add("ip:", ip);
  return fmt::format("{} (SAN {}; {})", subject, san.empty() ? "none" : san, spki_sha256);
}

namespace {

// The client's NewSessionTicket hook: notes the ticket, keeps no session (returns 0).
int on_new_session(SSL* ssl, SSL_SESSION*) {
  if (auto* seen = static_cast<bool*>(SSL_get_ex_data(ssl, tls_detail::ticket_seen_index())))
    *seen = true;
  return 0;
}

class TlsConfigImpl final : public TlsConfig {
 public:
  TlsConfigImpl(Role role, TlsFiles files)
      : role_(role), files_(std::move(files)), ctx_(asio::ssl::context::tls) {}
  Role role() const override { return role_; }
  const TlsFiles& files() const override { return files_; }
  void* native() const override { return &ctx_; }
  Status setup();

 private:
  Status use_own_certificate(SSL_CTX* ctx);
  Status load_crl(SSL_CTX* ctx);

  const Role role_;
  const TlsFiles files_;
  mutable asio::ssl::context ctx_;  // immutable after setup(); OpenSSL needs non-const handles
};

Status file_error(const std::string& what, const std::string& file, const std::string& why) {
  return Status::error(Errc::invalid_argument, fmt::format("TLS {} {}: {}", what, file, why));
}

// Reads a PEM file into a memory BIO, so "cannot read" and "does not parse" are told apart.
Result<BioPtr> open_pem(const std::string& what, const std::string& file) {
  if (file.empty()) return Status::error(Errc::invalid_argument, fmt::format("TLS {} file not given", what));
  BioPtr bio(BIO_new_file(file.c_str(), "r"));
  if (!bio) {
    ERR_clear_error();
    return Status::error(errno == ENOENT ? Errc::not_found : Errc::invalid_argument,
                         fmt::format("TLS {} {}: {}", what, file, std::strerror(errno)));
  }
  return bio;
}

// A private key readable or writable by group or others is refused outright: the operator
// fixes the mode rather than Ferry running with a leaked key.
Status check_key_mode(const std::string& file) {
  struct stat st {};
  if (::stat(file.c_str(), &st) != 0)
    return Status::from_errno(errno, "TLS private key " + file);
  if ((st.st_mode & 077) != 0)
    return Status::error(Errc::invalid_argument,
                         fmt::format("key file {} is readable by others (mode {:04o}); chmod 600 {}",
                                     file, st.st_mode & 07777, file));
  return Status::ok();
}

Status TlsConfigImpl::setup() {
  SSL_CTX* ctx = ctx_.native_handle();
  // TLS 1.3 only: nothing older is offered or accepted.
  if (SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION) != 1 ||
      SSL_CTX_set_max_proto_version(ctx, TLS1_3_VERSION) != 1)
    return Status::error(Errc::unsupported, "TLS: OpenSSL refuses TLS 1.3 only: " + take_openssl_errors());
  SSL_CTX_set_options(ctx, SSL_OP_NO_COMPRESSION | SSL_OP_NO_RENEGOTIATION);
  // No resumption: every connection presents and verifies certificates (a resumed session
  // would let a peer revoked since skip the CRL check). The server still sends one ticket,
  // as the client's sign that its certificate was accepted (ticket_seen_index()); it is a
  // stateful ticket (SSL_OP_NO_TICKET) whose session is never cached (SSL_SESS_CACHE_OFF), so
  // presenting it can only lead to a full handshake.
  if (role_ == Role::server) {
    SSL_CTX_set_options(ctx, SSL_OP_NO_TICKET);
    SSL_CTX_set_num_tickets(ctx, 1);
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
  } else {
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_CLIENT | SSL_SESS_CACHE_NO_INTERNAL_STORE);
    SSL_CTX_sess_set_new_cb(ctx, on_new_session);
  }

  if (files_.ca.empty()) return Status::error(Errc::invalid_argument, "TLS CA bundle file not given");
  {
    FERRY_ASSIGN_OR_RETURN(BioPtr probe, open_pem("CA bundle", files_.ca));
    (void)probe;
  }
  if (SSL_CTX_load_verify_locations(ctx, files_.ca.c_str(), nullptr) != 1)
    return file_error("CA bundle", files_.ca, "no CA certificate loaded: " + take_openssl_errors());
  FERRY_TRY(use_own_certificate(ctx));
  if (!files_.crl.empty()) FERRY_TRY(load_crl(ctx));

  int mode = SSL_VERIFY_PEER;
  if (role_ == Role::server) mode |= SSL_VERIFY_FAIL_IF_NO_PEER_CERT;
  SSL_CTX_set_verify(ctx, mode, nullptr);
  SSL_CTX_set_verify_depth(ctx, 8);
  return Status::ok();
}

Status TlsConfigImpl::use_own_certificate(SSL_CTX* ctx) {
  FERRY_TRY(check_key_mode(files_.key));
  FERRY_ASSIGN_OR_RETURN(BioPtr key_bio, open_pem("private key", files_.key));
  PkeyPtr key(PEM_read_bio_PrivateKey(key_bio.get(), nullptr, nullptr, nullptr));
  if (!key) return file_error("private key", files_.key, "not a PEM private key: " + take_openssl_errors());
  FERRY_ASSIGN_OR_RETURN(BioPtr cert_bio, open_pem("certificate", files_.cert));
  X509Ptr cert(PEM_read_bio_X509(cert_bio.get(), nullptr, nullptr, nullptr));
  if (!cert) return file_error("certificate", files_.cert, "not a PEM certificate: " + take_openssl_errors());
  if (X509_check_private_key(cert.get(), key.get()) != 1) {
    ERR_clear_error();
    return Status::error(Errc::invalid_argument,
                         fmt::format("TLS private key {} does not match certificate {}", files_.key,
                                     files_.cert));
  }
  if (X509_cmp_current_time(X509_get0_notBefore(cert.get())) >= 0)
    return file_error("certificate", files_.cert,
                      "not valid yet (notBefore " + time_text(X509_get0_notBefore(cert.get())) + ")");
  if (X509_cmp_current_time(X509_get0_notAfter(cert.get())) <= 0)
    return file_error("certificate", files_.cert,
                      "expired (notAfter " + time_text(X509_get0_notAfter(cert.get())) + ")");
  if (SSL_CTX_use_certificate_chain_file(ctx, files_.cert.c_str()) != 1)
    return file_error("certificate", files_.cert, take_openssl_errors());
  if (SSL_CTX_use_PrivateKey(ctx, key.get()) != 1 || SSL_CTX_check_private_key(ctx) != 1)
    return Status::error(Errc::invalid_argument,
                         fmt::format("TLS private key {} does not match certificate {}: {}",
                                     files_.key, files_.cert, take_openssl_errors()));

  // Our own chain against the CA bundle (dates and signatures, not revocation): a
  // certificate from another CA is a configuration error found here, not by every peer.
  STACK_OF(X509)* chain = nullptr;
  SSL_CTX_get0_chain_certs(ctx, &chain);
  StoreCtxPtr sctx(X509_STORE_CTX_new());
  if (!sctx || X509_STORE_CTX_init(sctx.get(), SSL_CTX_get_cert_store(ctx), cert.get(), chain) != 1)
    return Status::error(Errc::internal, "TLS: X509_STORE_CTX: " + take_openssl_errors());
  X509_STORE_CTX_set_flags(sctx.get(), 0);
  if (X509_verify_cert(sctx.get()) != 1) {
    int err = X509_STORE_CTX_get_error(sctx.get());
    ERR_clear_error();
    return file_error("certificate", files_.cert,
                      fmt::format("does not chain to the CA bundle {}: {}", files_.ca,
                                  X509_verify_cert_error_string(err)));
  }
  return Status::ok();
}

Status TlsConfigImpl::load_crl(SSL_CTX* ctx) {
  FERRY_ASSIGN_OR_RETURN(BioPtr bio, open_pem("CRL", files_.crl));
  X509_STORE* store = SSL_CTX_get_cert_store(ctx);
  int loaded = 0;
  constexpr int kMaxCrls = 256;  // a bundle of CRLs, one per CA; bounded
  while (loaded < kMaxCrls) {
    CrlPtr crl(PEM_read_bio_X509_CRL(bio.get(), nullptr, nullptr, nullptr));
    if (!crl) break;
    // An expired CRL would refuse every peer ("CRL has expired"): say so at load instead.
    const ASN1_TIME* next = X509_CRL_get0_nextUpdate(crl.get());
    if (next != nullptr && X509_cmp_current_time(next) <= 0)
      return file_error("CRL", files_.crl, "expired (nextUpdate " + time_text(next) + "); fetch a fresh one");
    if (X509_STORE_add_crl(store, crl.get()) != 1)
      return file_error("CRL", files_.crl, take_openssl_errors());
    ++loaded;
  }
  // The loop ends at end of file (PEM "no start line") or on a broken entry.
  unsigned long last = ERR_peek_last_error();
  bool at_end = loaded > 0 && ERR_GET_LIB(last) == ERR_LIB_PEM &&
                ERR_GET_REASON(last) == PEM_R_NO_START_LINE;
  if (loaded == 0 || (last != 0 && !at_end))
    return file_error("CRL", files_.crl,
                      loaded == 0 ? "no CRL in file: " + take_openssl_errors()
                                  : "bad CRL entry: " + take_openssl_errors());
  ERR_clear_error();
  // The leaf and every CA of the chain must be covered by a CRL of its issuer.
  X509_STORE_set_flags(store, X509_V_FLAG_CRL_CHECK | X509_V_FLAG_CRL_CHECK_ALL);
  return Status::ok();
}

}  // namespace

namespace tls_detail {
int ticket_seen_index() {
  static const int index = SSL_get_ex_new_index(0, nullptr, nullptr, nullptr, nullptr);
  FERRY_ASSERT(index >= 0);
  return index;
}

asio::ssl::context& context_of(const TlsConfig& config) {
  return *static_cast<asio::ssl::context*>(config.native());
}
}  // namespace tls_detail

Result<std::shared_ptr<const TlsConfig>> TlsConfig::load(Role role, const TlsFiles& files) {
  ERR_clear_error();
  std::shared_ptr<TlsConfigImpl> config;
  try {
    config = std::make_shared<TlsConfigImpl>(role, files);
  } catch (const boost::system::system_error& e) {  // SSL_CTX_new failed: the module edge
    return Status::error(Errc::internal, std::string("TLS: cannot create an SSL context: ") + e.what());
  }
  FERRY_TRY(config->setup());
  return std::shared_ptr<const TlsConfig>(std::move(config));
}

}  // namespace ferry::transport
