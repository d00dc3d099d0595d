// Package registry is the provisioning service's record of the fleet:
// devices, every certificate issued, enrollment tokens, and an append-only
// audit log of every decision.
//
// One Store interface has three implementations: SQLite (pure Go, WAL, the
// embedded default), PostgreSQL (pgx, for several provisioning replicas)
// and memory (tests). One conformance suite, registrytest, runs against all
// of them.
//
// Two invariants matter more than the rest:
//
//   - RecordIssue is all or nothing. The token use, the certificate, the
//     device row and the audit event commit together, before the caller
//     returns the certificate. A crash can never leave a certificate out in
//     the world that the registry does not know, and a token use is never
//     spent on a certificate that was not recorded.
//   - Revocations get a strictly increasing sequence number in commit order,
//     so a gateway that follows the feed from "everything after N" never
//     misses one, even with several replicas writing.
package registry

import (
	"context"
	"errors"
	"fmt"
	"time"
)

// Errors every Store returns, for callers to branch on with errors.Is.
var (
	ErrNotFound = errors.New("not found")
	ErrExists   = errors.New("already exists")
	// ErrTokenSpent: the token has no uses left.
	ErrTokenSpent = errors.New("enrollment token has no uses left")
	// ErrTokenExpired: the token is past its expiry.
	ErrTokenExpired = errors.New("enrollment token has expired")
	// ErrTokenDisabled: an operator disabled the token.
	ErrTokenDisabled = errors.New("enrollment token is disabled")
	// ErrConflict: the write lost a race or broke a rule the caller checked
	// too early (the device changed under it); the caller may retry.
	ErrConflict = errors.New("conflicting change")
)

// DeviceStatus is the state of a device.
type DeviceStatus string

// Device states. A revoked device cannot enroll or renew again.
const (
	DeviceActive  DeviceStatus = "active"
	DeviceRevoked DeviceStatus = "revoked"
)

// Device is one device of the fleet.
type Device struct {
	ID     string
	Status DeviceStatus
	// Serial (lowercase hex) and Fingerprint (SHA-256 of the DER, lowercase
	// hex) of the current certificate.
	Serial      string
	Fingerprint string
	NotAfter    time.Time
	TPMBound    bool
	// EKHash is the SHA-256 of the TPM's EK public area when TPMBound.
	EKHash    []byte
	Labels    map[string]string
	CreatedAt time.Time
	UpdatedAt time.Time
}

// Certificate is one issued certificate.
type Certificate struct {
	Serial      string // lowercase hex, no separators
	DeviceID    string
	Fingerprint string // SHA-256 of DER, lowercase hex
	// PublicKeyHash is the SHA-256 of the SubjectPublicKeyInfo (hex): the
	// same key gives the same hash, whatever certificate carries it.
	PublicKeyHash string
	// RequestHash is the SHA-256 of the CSR DER (hex), for the record.
	// Retries are recognised by PublicKeyHash: a retried ECDSA CSR is never
	// the same bytes.
	RequestHash string
	// TokenID is the token that paid for it; empty for renewals.
	TokenID   string
	Issuer    string // the issuing CA's subject CN
	NotBefore time.Time
	NotAfter  time.Time
	DER       []byte
	TPMBound  bool
	CreatedAt time.Time
	// Revocation; zero RevokedAt means not revoked.
	RevokedAt        time.Time
	RevocationReason int   // RFC 5280 reason code
	RevocationSeq    int64 // > 0 once revoked; the feed's cursor
}

// Revoked reports whether the certificate is revoked.
func (c *Certificate) Revoked() bool { return !c.RevokedAt.IsZero() }

// Token is an enrollment token. The secret is never stored: Hash is its
// SHA-256, compared in constant time.
type Token struct {
	ID   string
	Hash []byte
	// Prefix every device id enrolled with this token must start with
	// (may be empty: any id).
	Prefix string
	// MaxUses is how many certificates the token may pay for; Uses counts
	// them. An idempotent retry does not count.
	MaxUses    int
	Uses       int
	ExpiresAt  time.Time
	RequireTPM bool
	// AllowReprovision lets the token re-enroll an existing id with a new
	// key, revoking the old certificate.
	AllowReprovision bool
	Disabled         bool
	Labels           map[string]string
	CreatedAt        time.Time
	CreatedBy        string
}

// AuditEvent is one decision. Every enrollment, renewal, revocation and
// token change is recorded, refusals included, with the reason.
type AuditEvent struct {
	Seq     int64 // assigned by the store, increasing
	At      time.Time
	Actor   string // "token:<id>", "device:<id>", "admin:<name>", "cli"
	Action  string // "enroll", "reenroll", "revoke", "token.create", ...
	Subject string // usually a device id
	// Outcome is "allowed" or "refused".
	Outcome    string
	Reason     string
	RemoteAddr string
	// Serial of the certificate concerned, if any.
	Serial string
}

// Audit outcomes.
const (
	Allowed = "allowed"
	Refused = "refused"
)

// IssueRecord is everything RecordIssue commits at once.
type IssueRecord struct {
	Cert Certificate
	// Device is the device's new state; its Serial, Fingerprint and
	// NotAfter must be the new certificate's. CreatedAt is kept from the
	// existing row if there is one.
	Device Device
	// TokenID, if set, spends one use of that token; the write fails with
	// ErrTokenSpent, ErrTokenExpired or ErrTokenDisabled (judged at
	// Cert.CreatedAt) and nothing is written.
	TokenID string
	// ExpectSerial is the device's current serial the caller saw ("" for a
	// new device). If the device's serial is different when the write
	// happens, RecordIssue fails with ErrConflict and writes nothing. A
	// revoked device also fails with ErrConflict.
	ExpectSerial string
	// RevokePrevious revokes the certificate ExpectSerial names (reason
	// superseded, 4), as re-provisioning with a new key must.
	RevokePrevious bool
	Audit          AuditEvent
}

// ListOptions pages through devices in id order.
type ListOptions struct {
	After  string // return ids greater than this
	Limit  int    // 0 means 100; at most 1000
	Status DeviceStatus
}

// AuditQuery pages through the audit log in Seq order.
type AuditQuery struct {
	AfterSeq int64
	Limit    int    // 0 means 100; at most 1000
	Subject  string // only events about this subject
}

// Store is the registry. Implementations are safe for concurrent use by
// many goroutines (and, for PostgreSQL, many processes). Every method
// honours ctx. Not-found is ErrNotFound; a duplicate key is ErrExists.
// EKEntry is a TPM endorsement key the fleet trusts for attestation,
// named by the SHA-256 of its public key's SubjectPublicKeyInfo.
type EKEntry struct {
	Hash    []byte // 32 bytes
	Label   string
	AddedAt time.Time
	AddedBy string
}

// checkEK refuses an entry that is not a SHA-256.
func checkEK(e EKEntry) error {
	if len(e.Hash) != 32 {
		return fmt.Errorf("an EK hash is 32 bytes (SHA-256), not %d", len(e.Hash))
	}
	if len(e.Label) > 256 {
		return errors.New("an EK label is at most 256 bytes")
	}
	return nil
}

type Store interface {
	CreateToken(ctx context.Context, t Token) error
	GetToken(ctx context.Context, id string) (Token, error)
	ListTokens(ctx context.Context) ([]Token, error)
	DisableToken(ctx context.Context, id string, audit AuditEvent) error

	GetDevice(ctx context.Context, id string) (Device, error)
	ListDevices(ctx context.Context, opts ListOptions) ([]Device, error)
	GetCertificate(ctx context.Context, serial string) (Certificate, error)
	// ListCertificates returns a device's certificates, oldest first.
	ListCertificates(ctx context.Context, deviceID string) ([]Certificate, error)

	// RecordIssue commits an issued certificate; see IssueRecord.
	RecordIssue(ctx context.Context, rec IssueRecord) error

	// RevokeDevice marks the device revoked and revokes every certificate
	// of it that is not yet revoked, each with the next revocation
	// sequence number. It returns the certificates it revoked (none if the
	// device was already revoked: revoking twice is not an error).
	RevokeDevice(ctx context.Context, id string, reason int, at time.Time, audit AuditEvent) ([]Certificate, error)
	// RevokeCertificate revokes one certificate by serial. Revoking a
	// revoked certificate changes nothing and is not an error.
	RevokeCertificate(ctx context.Context, serial string, reason int, at time.Time, audit AuditEvent) (Certificate, error)
	// RevocationsSince returns revoked certificates with RevocationSeq >
	// seq, in sequence order, at most limit of them.
	RevocationsSince(ctx context.Context, seq int64, limit int) ([]Certificate, error)
	// RevokedUnexpired returns every revoked certificate whose NotAfter is
	// after now: the content of the CRL.
	RevokedUnexpired(ctx context.Context, now time.Time) ([]Certificate, error)

	// Audit appends an event (refusals, mostly; RecordIssue and the
	// revocations append their own in the same transaction).
	Audit(ctx context.Context, e AuditEvent) error
	ListAudit(ctx context.Context, q AuditQuery) ([]AuditEvent, error)

	// AddEKs puts EKs on the attestation allowlist (an entry already
	// there keeps its first label and time), with one audit event.
	AddEKs(ctx context.Context, eks []EKEntry, audit AuditEvent) error
	// HasEK reports whether an EK hash is on the allowlist.
	HasEK(ctx context.Context, hash []byte) (bool, error)
	// ListEKs returns the allowlist, oldest first.
	ListEKs(ctx context.Context) ([]EKEntry, error)
	// RemoveEK takes an EK off the allowlist (ErrNotFound if absent).
	RemoveEK(ctx context.Context, hash []byte, audit AuditEvent) error

	// Ping checks that the store can serve (for /readyz).
	Ping(ctx context.Context) error
	Close() error
}
