// Private to transport/: the OpenSSL side of tls.h, shared by tls.cc and connection.cc.
#pragma once

#include <utility>  // before Asio: GCC 12 needs it for Asio's coroutine support headers

#include <boost/asio/ssl.hpp>

#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include <memory>
#include <string>

#include "ferry/transport/tls.h"

namespace ferry::transport::tls_detail {

// RAII owners for the OpenSSL handles we create ourselves.
struct BioFree { void operator()(BIO* b) const { BIO_free(b); } };
struct X509Free { void operator()(X509* x) const { X509_free(x); } };
struct PkeyFree { void operator()(EVP_PKEY* k) const { EVP_PKEY_free(k); } };
struct CrlFree { void operator()(X509_CRL* c) const { X509_CRL_free(c); } };
struct StoreCtxFree { void operator()(X509_STORE_CTX* c) const { X509_STORE_CTX_free(c); } };
struct GeneralNamesFree {
  void operator()(GENERAL_NAMES* n) const { GENERAL_NAMES_free(n); }
};
using BioPtr = std::unique_ptr<BIO, BioFree>;
using X509Ptr = std::unique_ptr<X509, X509Free>;
using PkeyPtr = std::unique_ptr<EVP_PKEY, PkeyFree>;
using CrlPtr = std::unique_ptr<X509_CRL, CrlFree>;
using StoreCtxPtr = std::unique_ptr<X509_STORE_CTX, StoreCtxFree>;
using GeneralNamesPtr = std::unique_ptr<GENERAL_NAMES, GeneralNamesFree>;

// Drains OpenSSL's error queue of this thread into one line ("" when empty).
std::string take_openssl_errors();

// The Asio context behind a TlsConfig (its native()).
boost::asio::ssl::context& context_of(const TlsConfig& config);

// SSL ex_data slot of a client connection's "bool ticket_seen": set when the server's
// NewSessionTicket arrives. A Ferry server sends one only after it has accepted the client's
// certificate (TLS 1.3 gives the client no other positive signal), so a client can wait for
// it and report a refusal from connect() itself. The ticket is never used to resume.
int ticket_seen_index();

// The identity in a verified peer certificate.
PeerIdentity identity_of(X509* cert);
// "DNS:localhost, IP:127.0.0.1" (the subjectAltName entries), for refusals.
std::string san_text(X509* cert);

}  // namespace ferry::transport::tls_detail
