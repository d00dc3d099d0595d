// Package enroll decides enrollments and renewals: it checks the
// credential (an enrollment token, or the device's current certificate),
// the CSR and the registry's state, issues the certificate, and records it
// before handing it back. The HTTP side (EST) lives in package est; this
// package knows nothing of HTTP except the status a refusal maps to.
//
// Every decision, a refusal included, lands in the registry's audit log.
package enroll

import (
	"context"
	"crypto"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"strings"
	"time"

	"fleetkey.dev/certs/authority"
	"fleetkey.dev/certs/identity"
	"fleetkey.dev/certs/trust"
	"fleetkey.dev/provisioning/registry"
	"fleetkey.dev/provisioning/token"
)

// Refusal is a decision against the caller. Message is safe to send to the
// client; Reason is a short code for metrics and the audit log.
type Refusal struct {
	Status  int
	Reason  string
	Message string
	// RetryAfter, in seconds, for 429 and 503 answers.
	RetryAfter int
}

func (r *Refusal) Error() string { return r.Message }

func refuse(status int, reason, format string, args ...any) *Refusal {
	return &Refusal{Status: status, Reason: reason, Message: fmt.Sprintf(format, args...)}
}

// AsRefusal returns the *Refusal in err's chain, if any.
func AsRefusal(err error) (*Refusal, bool) {
	var r *Refusal
	ok := errors.As(err, &r)
	return r, ok
}

// Service makes enrollment decisions. It is safe for concurrent use.
type Service struct {
	Store  registry.Store
	Issuer *authority.Issuer
	Bundle *trust.Bundle
	Log    *slog.Logger
	// Now is the clock; default time.Now.
	Now func() time.Time
}

func (s *Service) now() time.Time {
	if s.Now != nil {
		return s.Now()
	}
	return time.Now()
}

// Request is one enrollment or renewal as the HTTP layer received it.
type Request struct {
	CSR        []byte // DER
	RemoteAddr string
}

// Result is an issued (or, for a retry, re-sent) certificate.
type Result struct {
	Cert *x509.Certificate
	// Retry is set when an identical earlier request already paid for
	// this certificate and nothing new was issued.
	Retry bool
}

// Enroll handles simpleenroll (RFC 7030, 4.2.1) with an enrollment token:
// the token must be valid and have uses left, the CSR must pass the device
// policy, and the requested id must start with the token's prefix. The same
// token, id and key again return the same certificate without spending a
// use. An id already enrolled with another key is a conflict (409) unless
// the token allows re-provisioning, which revokes the old certificate.
func (s *Service) Enroll(ctx context.Context, presented string, req Request) (*Result, error) {
	return s.enroll(ctx, presented, req, nil)
}

// Attested is what TPM attestation proved: the EK (by hash) and the key
// the AK certified, which the CSR must carry.
type Attested struct {
	EKHash []byte
	Key    crypto.PublicKey
	// Name is the device id the attestation session was opened for.
	Name string
}

// EnrollAttested enrolls after TPM attestation: as Enroll, except that a
// token that requires TPM is satisfied, the CSR's key must be the
// certified key, and the certificate is TPM-bound to the EK.
func (s *Service) EnrollAttested(ctx context.Context, presented string, req Request, att *Attested) (*Result, error) {
	return s.enroll(ctx, presented, req, att)
}

func (s *Service) enroll(ctx context.Context, presented string, req Request, att *Attested) (*Result, error) {
	ev := registry.AuditEvent{Action: "enroll", RemoteAddr: req.RemoteAddr, Actor: "token:?"}
	if att != nil {
		ev.Action = "attest-enroll"
	}
	tokenID, presentedHash, err := token.Parse(presented)
	if err != nil {
		return nil, s.refused(ctx, ev, refuse(http.StatusUnauthorized, "bad-token", "the enrollment token is malformed"))
	}
	ev.Actor = "token:" + tokenID
	tok, ref, err := s.checkToken(ctx, tokenID, presentedHash, att != nil)
	if err != nil {
		return nil, err
	}
	if ref != nil {
		return nil, s.refused(ctx, ev, ref)
	}
	creq, err := s.checkCSR(req.CSR, "")
	if err != nil {
		return nil, s.refused(ctx, ev, err)
	}
	if att != nil && creq.Name != att.Name {
		return nil, s.refused(ctx, ev, refuse(http.StatusBadRequest, "csr-id-mismatch", "the CSR asks for %q, but the attestation session is for %q", creq.Name, att.Name))
	}
	if att != nil {
		if k, ok := creq.PublicKey.(interface{ Equal(crypto.PublicKey) bool }); !ok || !k.Equal(att.Key) {
			return nil, s.refused(ctx, ev, refuse(http.StatusBadRequest, "csr-key-not-certified", "the CSR's key is not the key the TPM certified"))
		}
		creq.TPMEKHash = att.EKHash
	}
	ev.Subject = creq.Name
	if !strings.HasPrefix(creq.Name, tok.Prefix) {
		return nil, s.refused(ctx, ev, refuse(http.StatusForbidden, "id-not-allowed", "device id %q does not start with this token's prefix %q", creq.Name, tok.Prefix))
	}
	keyHash, err := publicKeyHash(creq)
	if err != nil {
		return nil, err
	}
	dev, err := s.Store.GetDevice(ctx, creq.Name)
	exists := err == nil
	if err != nil && !errors.Is(err, registry.ErrNotFound) {
		return nil, fmt.Errorf("looking up device: %w", err)
	}
	rec := registry.IssueRecord{TokenID: tok.ID}
	if exists {
		if dev.Status == registry.DeviceRevoked {
			return nil, s.refused(ctx, ev, refuse(http.StatusForbidden, "device-revoked", "device %q is revoked and cannot enroll again", dev.ID))
		}
		cur, err := s.Store.GetCertificate(ctx, dev.Serial)
		if err != nil {
			return nil, fmt.Errorf("looking up current certificate of %q: %w", dev.ID, err)
		}
		if cur.PublicKeyHash == keyHash && cur.TokenID == tok.ID && !cur.Revoked() {
			cert, err := x509.ParseCertificate(cur.DER)
			if err != nil {
				return nil, fmt.Errorf("parsing stored certificate %s: %w", cur.Serial, err)
			}
			ev.Outcome, ev.Reason, ev.Serial = registry.Allowed, "retry: same token, id and key; certificate re-sent", cur.Serial
			s.audit(ctx, ev)
			return &Result{Cert: cert, Retry: true}, nil
		}
		if !tok.AllowReprovision {
			return nil, s.refused(ctx, ev, refuse(http.StatusConflict, "id-taken", "device %q is already enrolled with another key or token; renew with simplereenroll, or use a token that allows re-provisioning", dev.ID))
		}
		rec.ExpectSerial, rec.RevokePrevious = dev.Serial, true
	}
	ev.Reason = "enrolled"
	if rec.RevokePrevious {
		ev.Reason = "re-provisioned; previous certificate " + dev.Serial + " revoked (superseded)"
	}
	return s.issue(ctx, creq, req.CSR, keyHash, dev, exists, rec, ev)
}

// Reenroll handles simplereenroll (RFC 7030, 4.2.2): the client proves
// itself with its current certificate over mTLS (peer, already verified
// against the bundle); the identity stays the same, a new key is allowed.
// A revoked device, or a certificate that is no longer the device's
// current one, is refused.
func (s *Service) Reenroll(ctx context.Context, peer *trust.Peer, req Request) (*Result, error) {
	ev := registry.AuditEvent{Action: "reenroll", RemoteAddr: req.RemoteAddr, Actor: "device:" + peer.ID.Name, Subject: peer.ID.Name}
	if peer.ID.Role != identity.RoleDevice {
		return nil, s.refused(ctx, ev, refuse(http.StatusForbidden, "wrong-role", "only device certificates renew here; %s is a %s", peer.ID, peer.ID.Role))
	}
	serial := SerialHex(peer.Leaf)
	cur, err := s.Store.GetCertificate(ctx, serial)
	if errors.Is(err, registry.ErrNotFound) {
		return nil, s.refused(ctx, ev, refuse(http.StatusForbidden, "unknown-certificate", "certificate %s is not in the registry", serial))
	}
	if err != nil {
		return nil, fmt.Errorf("looking up certificate: %w", err)
	}
	if cur.Revoked() {
		return nil, s.refused(ctx, ev, refuse(http.StatusForbidden, "revoked", "certificate %s is revoked", serial))
	}
	dev, err := s.Store.GetDevice(ctx, peer.ID.Name)
	if err != nil {
		return nil, fmt.Errorf("looking up device: %w", err)
	}
	if dev.Status == registry.DeviceRevoked {
		return nil, s.refused(ctx, ev, refuse(http.StatusForbidden, "device-revoked", "device %q is revoked and cannot renew", dev.ID))
	}
	if dev.Serial != serial {
		return nil, s.refused(ctx, ev, refuse(http.StatusForbidden, "not-current", "certificate %s is no longer the current certificate of %q; renew with the newest one", serial, dev.ID))
	}
	creq, err := s.checkCSR(req.CSR, peer.ID.Name)
	if err != nil {
		return nil, s.refused(ctx, ev, err)
	}
	keyHash, err := publicKeyHash(creq)
	if err != nil {
		return nil, err
	}
	if dev.TPMBound && keyHash != cur.PublicKeyHash {
		return nil, s.refused(ctx, ev, refuse(http.StatusForbidden, "tpm-key-changed", "device %q is TPM-bound: renew with the attested key, or attest the new key (/attest/v1)", dev.ID))
	}
	if dev.TPMBound {
		creq.TPMEKHash = dev.EKHash
	}
	ev.Reason = "renewed; previous certificate " + serial
	return s.issue(ctx, creq, req.CSR, keyHash, dev, true, registry.IssueRecord{ExpectSerial: serial}, ev)
}

// CheckToken checks an enrollment token before an attestation session
// starts (the session is bound to it; Enroll checks it again at the end,
// and spends a use then). deviceID must fit the token's prefix.
func (s *Service) CheckToken(ctx context.Context, presented, deviceID, remote string) error {
	ev := registry.AuditEvent{Action: "attest-start", RemoteAddr: remote, Actor: "token:?", Subject: deviceID}
	tokenID, presentedHash, err := token.Parse(presented)
	if err != nil {
		return s.refused(ctx, ev, refuse(http.StatusUnauthorized, "bad-token", "the enrollment token is malformed"))
	}
	ev.Actor = "token:" + tokenID
	tok, ref, err := s.checkToken(ctx, tokenID, presentedHash, true)
	if err != nil {
		return err
	}
	if ref == nil && !strings.HasPrefix(deviceID, tok.Prefix) {
		ref = refuse(http.StatusForbidden, "id-not-allowed", "device id %q does not start with this token's prefix %q", deviceID, tok.Prefix)
	}
	if ref == nil && tok.Uses >= tok.MaxUses && tok.MaxUses > 0 {
		ref = refuse(http.StatusForbidden, "token-spent", "the enrollment token has no uses left")
	}
	if ref != nil {
		return s.refused(ctx, ev, ref)
	}
	return nil
}

// checkToken looks a token up and checks it is usable now; attested says
// whether TPM attestation backs the request.
func (s *Service) checkToken(ctx context.Context, tokenID string, presentedHash []byte, attested bool) (registry.Token, *Refusal, error) {
	tok, err := s.Store.GetToken(ctx, tokenID)
	if errors.Is(err, registry.ErrNotFound) || (err == nil && !token.Matches(presentedHash, tok.Hash)) {
		return tok, refuse(http.StatusUnauthorized, "bad-token", "the enrollment token is not valid"), nil
	}
	if err != nil {
		return tok, nil, fmt.Errorf("looking up token: %w", err)
	}
	now := s.now()
	switch {
	case tok.Disabled:
		return tok, refuse(http.StatusUnauthorized, "token-disabled", "the enrollment token was disabled by an operator"), nil
	case !now.Before(tok.ExpiresAt):
		return tok, refuse(http.StatusUnauthorized, "token-expired", "the enrollment token expired at %s", tok.ExpiresAt.UTC().Format(time.RFC3339)), nil
	case tok.RequireTPM && !attested:
		return tok, refuse(http.StatusForbidden, "tpm-required", "this enrollment token requires TPM attestation (/attest/v1); plain EST enrollment is refused"), nil
	}
	return tok, nil, nil
}

func (s *Service) checkCSR(der []byte, name string) (*authority.Request, error) {
	creq, err := s.Issuer.Policy.CheckCSR(der, identity.RoleDevice, name)
	if ce, ok := authority.IsCSRError(err); ok {
		return nil, refuse(http.StatusBadRequest, "csr-"+string(ce.Reason), "%s", ce.Error())
	}
	return creq, err
}

// issue signs, records and returns. The certificate leaves this function
// only once the registry has committed it.
func (s *Service) issue(ctx context.Context, creq *authority.Request, csr []byte, keyHash string, dev registry.Device, exists bool, rec registry.IssueRecord, ev registry.AuditEvent) (*Result, error) {
	cert, err := s.Issuer.Issue(creq)
	if ce, ok := authority.IsCSRError(err); ok {
		return nil, s.refused(ctx, ev, refuse(http.StatusServiceUnavailable, "ca-"+string(ce.Reason), "the CA cannot issue now: %s", ce.Detail))
	}
	if err != nil {
		return nil, fmt.Errorf("issuing: %w", err)
	}
	now := s.now()
	reqHash := sha256.Sum256(csr)
	serial := SerialHex(cert)
	rec.Cert = registry.Certificate{
		Serial: serial, DeviceID: creq.Name, Fingerprint: Fingerprint(cert), PublicKeyHash: keyHash,
		RequestHash: hex.EncodeToString(reqHash[:]), TokenID: rec.TokenID, Issuer: cert.Issuer.CommonName,
		NotBefore: cert.NotBefore, NotAfter: cert.NotAfter, DER: cert.Raw, TPMBound: creq.TPMEKHash != nil, CreatedAt: now,
	}
	if !exists {
		dev = registry.Device{ID: creq.Name, CreatedAt: now}
	}
	dev.Status, dev.Serial, dev.Fingerprint, dev.NotAfter, dev.UpdatedAt = registry.DeviceActive, serial, rec.Cert.Fingerprint, cert.NotAfter, now
	dev.TPMBound, dev.EKHash = creq.TPMEKHash != nil, creq.TPMEKHash
	rec.Device = dev
	ev.At, ev.Outcome, ev.Serial, ev.Subject = now, registry.Allowed, serial, creq.Name
	rec.Audit = ev
	switch err := s.Store.RecordIssue(ctx, rec); {
	case err == nil:
	case errors.Is(err, registry.ErrTokenSpent):
		return nil, s.refused(ctx, ev, refuse(http.StatusForbidden, "token-spent", "the enrollment token has no uses left"))
	case errors.Is(err, registry.ErrTokenExpired):
		return nil, s.refused(ctx, ev, refuse(http.StatusUnauthorized, "token-expired", "the enrollment token has expired"))
	case errors.Is(err, registry.ErrTokenDisabled):
		return nil, s.refused(ctx, ev, refuse(http.StatusUnauthorized, "token-disabled", "the enrollment token was disabled by an operator"))
	case errors.Is(err, registry.ErrConflict):
		return nil, s.refused(ctx, ev, refuse(http.StatusConflict, "concurrent-change", "device %q changed while this request was being handled; retry", creq.Name))
	default:
		return nil, fmt.Errorf("recording certificate %s: %w", serial, err)
	}
	s.log().Info("certificate issued", "action", ev.Action, "device", creq.Name, "serial", serial, "not_after", cert.NotAfter, "actor", ev.Actor)
	return &Result{Cert: cert}, nil
}

// Refuse records a refusal decided before the request reached Enroll or
// Reenroll (wrong content type, oversized body, no credential, rate
// limit), so that every refusal is in the audit log.
func (s *Service) Refuse(ctx context.Context, action, actor, remote string, r *Refusal) {
	_ = s.refused(ctx, registry.AuditEvent{Action: action, Actor: actor, RemoteAddr: remote}, r)
}

// NewRefusal makes a Refusal for callers outside this package.
func NewRefusal(status int, reason, format string, args ...any) *Refusal {
	return refuse(status, reason, format, args...)
}

// refused records a refusal in the audit log and returns it.
func (s *Service) refused(ctx context.Context, ev registry.AuditEvent, err error) error {
	r, ok := AsRefusal(err)
	if !ok {
		return err
	}
	ev.Outcome, ev.Reason = registry.Refused, r.Reason+": "+r.Message
	s.audit(ctx, ev)
	s.log().Info("request refused", "action", ev.Action, "actor", ev.Actor, "subject", ev.Subject, "reason", r.Reason, "status", r.Status, "remote", ev.RemoteAddr)
	return r
}

func (s *Service) audit(ctx context.Context, ev registry.AuditEvent) {
	if ev.At.IsZero() {
		ev.At = s.now()
	}
	// A refusal is often caused by the request ending (a read deadline, a
	// client that hung up), which cancels ctx; the decision must still be
	// recorded, under a deadline of its own.
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer cancel()
	if err := s.Store.Audit(ctx, ev); err != nil {
		s.log().Error("writing audit event", "err", err, "action", ev.Action, "subject", ev.Subject)
	}
}

func (s *Service) log() *slog.Logger {
	if s.Log != nil {
		return s.Log
	}
	return slog.New(slog.DiscardHandler)
}

// SerialHex is the registry's spelling of a serial number.
func SerialHex(c *x509.Certificate) string { return c.SerialNumber.Text(16) }

// Fingerprint is the SHA-256 of a certificate's DER, in lowercase hex.
func Fingerprint(c *x509.Certificate) string {
	sum := sha256.Sum256(c.Raw)
	return hex.EncodeToString(sum[:])
}

func publicKeyHash(req *authority.Request) (string, error) {
	spki, err := x509.MarshalPKIXPublicKey(req.PublicKey)
	if err != nil {
		return "", fmt.Errorf("encoding public key: %w", err)
	}
	sum := sha256.Sum256(spki)
	return hex.EncodeToString(sum[:]), nil
}
