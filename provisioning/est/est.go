// Package est serves Enrollment over Secure Transport (RFC 7030) under
// /.well-known/est/: cacerts, simpleenroll, simplereenroll and csrattrs.
//
// Bodies are exactly what the RFC says, so curl + openssl and other EST
// clients work unchanged: requests carry a base64 DER PKCS#10
// (application/pkcs10), and certificates come back as a base64 DER PKCS#7
// certs-only SignedData (application/pkcs7-mime; smime-type=certs-only),
// with Content-Transfer-Encoding: base64 (RFC 7030, 4.2.3; RFC 8951).
//
// simpleenroll authenticates with an enrollment token, as HTTP Bearer or as
// the password of HTTP Basic (RFC 7030, 3.2.3). simplereenroll
// authenticates with the device's current certificate over mTLS (3.3.2).
package est

import (
	"bytes"
	"context"
	"crypto/x509"
	"encoding/asn1"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"mime"
	"net"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/smallstep/pkcs7"

	"fleetkey.dev/certs/authority"
	"fleetkey.dev/certs/identity"
	"fleetkey.dev/certs/trust"
	"fleetkey.dev/provisioning/enroll"
	"fleetkey.dev/provisioning/token"
)

// PathPrefix is where EST lives (RFC 7030, 3.2.2).
const PathPrefix = "/.well-known/est/"

// MaxBody bounds a request body: a base64 CSR is a few hundred bytes, an
// RSA-8192 one about 2 KiB.
const MaxBody = 32 << 10

// Content types of RFC 7030, 4.
const (
	ContentTypePKCS10   = "application/pkcs10"
	ContentTypeCerts    = "application/pkcs7-mime; smime-type=certs-only"
	ContentTypeCSRAttrs = "application/csrattrs"
)

// Limiter decides whether a request may go ahead; when not, it says how
// long to wait. Handler asks it once per token and once per client address.
type Limiter interface {
	Allow(key string) (ok bool, retryAfter time.Duration)
}

// Observer counts outcomes, for metrics. Nil methods are fine.
type Observer interface {
	Outcome(endpoint, outcome string)
}

// Handler serves EST. Build it with New.
type Handler struct {
	svc       *enroll.Service
	bundle    *trust.Bundle
	cacerts   []byte
	limitTok  Limiter
	limitIP   Limiter
	obs       Observer
	isRevoked func(*x509.Certificate) bool
	log       *slog.Logger
	now       func() time.Time
}

// Options configures New.
type Options struct {
	// TokenLimiter and AddrLimiter rate-limit enrollment per token and per
	// client address; nil means no limit.
	TokenLimiter, AddrLimiter Limiter
	Observer                  Observer
	Log                       *slog.Logger
	Now                       func() time.Time
	// IsRevoked reports certificates revoked outside the registry (the
	// offline CRLs of `certs crl`); the registry's own are checked by the
	// enrollment service.
	IsRevoked func(*x509.Certificate) bool
}

// New builds the EST handler. The CA certificates it serves are the
// bundle's: the issuing CAs, then the roots.
func New(svc *enroll.Service, bundle *trust.Bundle, opts Options) (*Handler, error) {
	var der []byte
	for _, c := range append(bundle.Issuing(), bundle.Roots()...) {
		der = append(der, c.Raw...)
	}
	p7, err := pkcs7.DegenerateCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("encoding CA certificates: %w", err)
	}
	h := &Handler{svc: svc, bundle: bundle, cacerts: encodeBase64(p7), limitTok: opts.TokenLimiter, limitIP: opts.AddrLimiter,
		obs: opts.Observer, isRevoked: opts.IsRevoked, log: opts.Log, now: opts.Now}
	if h.log == nil {
		h.log = slog.New(slog.DiscardHandler)
	}
	if h.now == nil {
		h.now = time.Now
	}
	return h, nil
}

// Register adds the EST routes to mux.
func (h *Handler) Register(mux *http.ServeMux) {
	mux.HandleFunc("GET "+PathPrefix+"cacerts", h.cacertsHandler)
	mux.HandleFunc("GET "+PathPrefix+"csrattrs", h.csrattrsHandler)
	mux.HandleFunc("POST "+PathPrefix+"simpleenroll", h.enrollHandler)
	mux.HandleFunc("POST "+PathPrefix+"simplereenroll", h.reenrollHandler)
}

func (h *Handler) observe(endpoint, outcome string) {
	if h.obs != nil {
		h.obs.Outcome(endpoint, outcome)
	}
}

func (h *Handler) cacertsHandler(w http.ResponseWriter, r *http.Request) {
	writeBase64(w, ContentTypeCerts, h.cacerts)
	h.observe("cacerts", "ok")
}

// csrAttrs is the CsrAttrs of RFC 7030, 4.5.2 that tells clients what the
// policy wants: an EC key on P-256 (id-ecPublicKey with secp256r1), signed
// with ecdsa-with-SHA256. Built once; it does not change.
var csrAttrs = mustCSRAttrs()

func (h *Handler) csrattrsHandler(w http.ResponseWriter, r *http.Request) {
	writeBase64(w, ContentTypeCSRAttrs, csrAttrs)
	h.observe("csrattrs", "ok")
}

func (h *Handler) enrollHandler(w http.ResponseWriter, r *http.Request) {
	const endpoint = "simpleenroll"
	remote := ClientAddr(r)
	actor := "token:?"
	tok, hasTok := BearerOrBasic(r)
	if id, _, err := token.Parse(tok); hasTok && err == nil {
		actor = "token:" + id
	}
	if ref := h.limit(h.limitIP, "addr:"+remote); ref != nil {
		h.refuse(w, r, endpoint, actor, ref)
		return
	}
	if !hasTok {
		h.refuse(w, r, endpoint, actor, enroll.NewRefusal(http.StatusUnauthorized, "no-credential",
			"enrollment needs a token: send it as 'Authorization: Bearer <token>' or as the password of HTTP Basic"))
		return
	}
	if actor != "token:?" {
		if ref := h.limit(h.limitTok, actor); ref != nil {
			h.refuse(w, r, endpoint, actor, ref)
			return
		}
	}
	csr, ref := readCSR(w, r)
	if ref != nil {
		h.refuse(w, r, endpoint, actor, ref)
		return
	}
	res, err := h.svc.Enroll(r.Context(), tok, enroll.Request{CSR: csr, RemoteAddr: remote})
	h.respond(w, r, endpoint, res, err)
}

func (h *Handler) reenrollHandler(w http.ResponseWriter, r *http.Request) {
	const endpoint = "simplereenroll"
	remote := ClientAddr(r)
	if ref := h.limit(h.limitIP, "addr:"+remote); ref != nil {
		h.refuse(w, r, endpoint, "device:?", ref)
		return
	}
	peer, err := PeerOf(r, h.bundle, h.now(), h.isRevoked, identity.RoleDevice)
	if err != nil {
		h.refuse(w, r, endpoint, "device:?", enroll.NewRefusal(http.StatusForbidden, "bad-client-certificate", "%s", err.Error()))
		return
	}
	csr, ref := readCSR(w, r)
	if ref != nil {
		h.refuse(w, r, endpoint, "device:"+peer.ID.Name, ref)
		return
	}
	res, err := h.svc.Reenroll(r.Context(), peer, enroll.Request{CSR: csr, RemoteAddr: remote})
	h.respond(w, r, endpoint, res, err)
}

// refuse audits a refusal made here, before the enrollment decision, and
// answers it.
func (h *Handler) refuse(w http.ResponseWriter, r *http.Request, endpoint, actor string, ref *enroll.Refusal) {
	h.svc.Refuse(r.Context(), strings.TrimPrefix(endpoint, "simple"), actor, ClientAddr(r), ref)
	h.writeRefusal(w, endpoint, ref)
}

func (h *Handler) writeRefusal(w http.ResponseWriter, endpoint string, ref *enroll.Refusal) {
	if ref.Status == http.StatusUnauthorized {
		challenge(w)
	}
	if ref.RetryAfter > 0 {
		w.Header().Set("Retry-After", strconv.Itoa(ref.RetryAfter))
	}
	http.Error(w, ref.Message, ref.Status)
	h.observe(endpoint, ref.Reason)
}

func (h *Handler) respond(w http.ResponseWriter, r *http.Request, endpoint string, res *enroll.Result, err error) {
	if ref, ok := enroll.AsRefusal(err); ok {
		h.writeRefusal(w, endpoint, ref) // Enroll and Reenroll audit their own
		return
	}
	if err != nil {
		if errors.Is(err, context.Canceled) {
			h.observe(endpoint, "canceled")
			return
		}
		h.log.Error("enrollment failed", "endpoint", endpoint, "err", err, "remote", ClientAddr(r))
		http.Error(w, "internal error; the request was not completed and can be retried", http.StatusInternalServerError)
		h.observe(endpoint, "error")
		return
	}
	p7, err := pkcs7.DegenerateCertificate(res.Cert.Raw)
	if err != nil {
		h.log.Error("encoding certificate", "err", err)
		http.Error(w, "internal error", http.StatusInternalServerError)
		return
	}
	writeBase64(w, ContentTypeCerts, encodeBase64(p7))
	if res.Retry {
		h.observe(endpoint, "retry")
	} else {
		h.observe(endpoint, "issued")
	}
}

// readCSR checks the content type and size and decodes the body.
func readCSR(w http.ResponseWriter, r *http.Request) ([]byte, *enroll.Refusal) {
	mt, _, err := mime.ParseMediaType(r.Header.Get("Content-Type"))
	if err != nil || mt != ContentTypePKCS10 {
		return nil, enroll.NewRefusal(http.StatusUnsupportedMediaType, "bad-content-type",
			"Content-Type must be %s (a base64 DER PKCS#10 request)", ContentTypePKCS10)
	}
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, MaxBody))
	var tooBig *http.MaxBytesError
	if errors.As(err, &tooBig) {
		return nil, enroll.NewRefusal(http.StatusRequestEntityTooLarge, "too-large", "request body is larger than %d bytes", MaxBody)
	}
	if err != nil {
		return nil, enroll.NewRefusal(http.StatusBadRequest, "bad-body", "reading the request body: %v", err)
	}
	return ParseBody(body)
}

// ParseBody decodes an EST request body: base64 (RFC 7030, 4.2.1; RFC
// 8951, 3 allows line breaks) of a DER PKCS#10 no larger than
// authority.MaxCSRBytes. The CSR itself is then checked by the policy.
func ParseBody(body []byte) ([]byte, *enroll.Refusal) {
	der, err := decodeBase64(body)
	if err != nil || len(der) == 0 {
		return nil, enroll.NewRefusal(http.StatusBadRequest, "bad-base64", "the body must be a base64-encoded DER PKCS#10 request (RFC 7030, 4.2.1)")
	}
	if len(der) > authority.MaxCSRBytes {
		return nil, enroll.NewRefusal(http.StatusRequestEntityTooLarge, "too-large", "CSR is %d bytes; the limit is %d", len(der), authority.MaxCSRBytes)
	}
	return der, nil
}

// limit asks l about key and returns a 429 refusal with the wait when it
// says no.
func (h *Handler) limit(l Limiter, key string) *enroll.Refusal {
	if l == nil {
		return nil
	}
	ok, wait := l.Allow(key)
	if ok {
		return nil
	}
	secs := max(1, int(wait.Round(time.Second)/time.Second))
	ref := enroll.NewRefusal(http.StatusTooManyRequests, "rate-limited", "too many requests; retry in %d s", secs)
	ref.RetryAfter = secs
	return ref
}

// PeerOf verifies the request's TLS client certificate against the bundle
// (and isRevoked, if set) and requires one of roles. The error is safe to
// show the client.
func PeerOf(r *http.Request, bundle *trust.Bundle, now time.Time, isRevoked func(*x509.Certificate) bool, roles ...identity.Role) (*trust.Peer, error) {
	if r.TLS == nil || len(r.TLS.PeerCertificates) == 0 {
		return nil, errors.New("this endpoint needs a client certificate (mutual TLS)")
	}
	return bundle.Verify(r.TLS.PeerCertificates, trust.VerifyOptions{Now: now, Roles: roles, IsRevoked: isRevoked})
}

// BearerOrBasic returns the token from "Bearer <t>" or from the password
// of "Basic base64(user:t)".
func BearerOrBasic(r *http.Request) (string, bool) {
	auth := r.Header.Get("Authorization")
	if len(auth) > 1024 {
		return "", false
	}
	if scheme, rest, ok := strings.Cut(auth, " "); ok && strings.EqualFold(scheme, "Bearer") {
		t := strings.TrimSpace(rest)
		return t, t != ""
	}
	if _, pass, ok := r.BasicAuth(); ok && pass != "" {
		return pass, true
	}
	return "", false
}

func challenge(w http.ResponseWriter) {
	w.Header().Add("WWW-Authenticate", `Bearer realm="fleetkey-est"`)
	w.Header().Add("WWW-Authenticate", `Basic realm="fleetkey-est"`)
}

// ClientAddr is the peer's IP (no port); fleetkey is reached directly, so
// X-Forwarded-For is not trusted.
func ClientAddr(r *http.Request) string {
	host, _, err := net.SplitHostPort(r.RemoteAddr)
	if err != nil {
		return r.RemoteAddr
	}
	return host
}

func writeBase64(w http.ResponseWriter, contentType string, body []byte) {
	w.Header().Set("Content-Type", contentType)
	w.Header().Set("Content-Transfer-Encoding", "base64")
	w.Header().Set("Content-Length", strconv.Itoa(len(body)))
	w.WriteHeader(http.StatusOK)
	_, _ = w.Write(body)
}

// encodeBase64 wraps at 64 characters, as PEM and most EST servers do.
func encodeBase64(der []byte) []byte {
	s := base64.StdEncoding.EncodeToString(der)
	var b bytes.Buffer
	for len(s) > 64 {
		b.WriteString(s[:64])
		b.WriteString("\r\n")
		s = s[64:]
	}
	b.WriteString(s)
	b.WriteString("\r\n")
	return b.Bytes()
}

func decodeBase64(body []byte) ([]byte, error) {
	clean := bytes.Map(func(r rune) rune {
		if r == '\r' || r == '\n' || r == ' ' || r == '\t' {
			return -1
		}
		return r
	}, body)
	return base64.StdEncoding.DecodeString(string(clean))
}

func mustCSRAttrs() []byte {
	type attribute struct {
		Type   asn1.ObjectIdentifier
		Values []asn1.ObjectIdentifier `asn1:"set"`
	}
	der, err := asn1.Marshal([]any{
		asn1.ObjectIdentifier{1, 2, 840, 10045, 4, 3, 2}, // ecdsa-with-SHA256
		attribute{Type: asn1.ObjectIdentifier{1, 2, 840, 10045, 2, 1}, // id-ecPublicKey
			Values: []asn1.ObjectIdentifier{{1, 2, 840, 10045, 3, 1, 7}}}, // secp256r1
	})
	if err != nil {
		panic(err)
	}
	return encodeBase64(der)
}
