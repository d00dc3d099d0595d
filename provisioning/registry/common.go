package registry

import (
	"errors"
	"fmt"
	"maps"
	"slices"
	"time"
)

// What every implementation shares: limits, normalisation of what goes in
// and comes out, and the validation of an IssueRecord. Keeping it in one
// place is what lets the conformance suite demand identical behaviour.

// Page sizes of ListDevices, ListAudit and RevocationsSince.
const (
	defaultLimit = 100
	maxLimit     = 1000
)

// Hard caps of the queries the interface gives no limit. They are not
// pages: a result larger than the cap is an error, never silently cut
// short (a CRL missing a revoked certificate would be worse than no CRL).
const (
	maxTokens          = 10_000
	maxDeviceCerts     = 10_000
	maxRevokedUnexpire = 100_000
)

// reasonSuperseded is the RFC 5280 reason code RecordIssue uses when it
// revokes the previous certificate (RevokePrevious).
const reasonSuperseded = 4

// errTooMany reports a result over one of the hard caps.
var errTooMany = errors.New("too many rows")

// clampLimit turns a caller's limit into the page size: 0 (or less) means
// defaultLimit, and no page is larger than maxLimit.
func clampLimit(limit int) int {
	switch {
	case limit <= 0:
		return defaultLimit
	case limit > maxLimit:
		return maxLimit
	}
	return limit
}

// normTime is how every store keeps a time: UTC, microsecond precision
// (PostgreSQL's), no monotonic reading. The zero time stays zero.
func normTime(t time.Time) time.Time {
	if t.IsZero() {
		return time.Time{}
	}
	return t.UTC().Truncate(time.Microsecond)
}

// normBytes returns a copy of b, nil when empty.
func normBytes(b []byte) []byte {
	if len(b) == 0 {
		return nil
	}
	return slices.Clone(b)
}

// normLabels returns a copy of m, nil when empty.
func normLabels(m map[string]string) map[string]string {
	if len(m) == 0 {
		return nil
	}
	return maps.Clone(m)
}

func normToken(t Token) Token {
	t.Hash = normBytes(t.Hash)
	t.Labels = normLabels(t.Labels)
	t.ExpiresAt, t.CreatedAt = normTime(t.ExpiresAt), normTime(t.CreatedAt)
	return t
}

func normDevice(d Device) Device {
	d.EKHash = normBytes(d.EKHash)
	d.Labels = normLabels(d.Labels)
	d.NotAfter, d.CreatedAt, d.UpdatedAt = normTime(d.NotAfter), normTime(d.CreatedAt), normTime(d.UpdatedAt)
	return d
}

func normCert(c Certificate) Certificate {
	c.DER = normBytes(c.DER)
	c.NotBefore, c.NotAfter, c.CreatedAt, c.RevokedAt = normTime(c.NotBefore), normTime(c.NotAfter), normTime(c.CreatedAt), normTime(c.RevokedAt)
	return c
}

// newCert is the certificate RecordIssue stores: whatever revocation
// fields the caller left set are ignored, a new certificate is not revoked.
func newCert(c Certificate) Certificate {
	c = normCert(c)
	c.RevokedAt, c.RevocationReason, c.RevocationSeq = time.Time{}, 0, 0
	return c
}

func normAudit(e AuditEvent) AuditEvent {
	e.Seq = 0
	e.At = normTime(e.At)
	return e
}

// checkToken validates a token before CreateToken stores it.
func checkToken(t Token) error {
	if t.ID == "" {
		// "" means "no token" in IssueRecord.TokenID.
		return errors.New("creating token: empty id")
	}
	return nil
}

// checkIssue validates an IssueRecord before any store looks at its own
// state. A record that breaks these rules is a bug in the caller, not a
// race, so the error is none of the package's sentinel errors.
func checkIssue(rec IssueRecord) error {
	c, d := rec.Cert, rec.Device
	var problem string
	switch {
	case c.Serial == "":
		problem = "empty serial"
	case c.DeviceID == "":
		problem = "empty device id"
	case c.CreatedAt.IsZero():
		problem = "zero Cert.CreatedAt (the token is judged at it)"
	case d.ID != c.DeviceID:
		problem = fmt.Sprintf("Device.ID %q is not Cert.DeviceID %q", d.ID, c.DeviceID)
	case d.Serial != c.Serial || d.Fingerprint != c.Fingerprint || !d.NotAfter.Equal(c.NotAfter):
		problem = "Device.Serial, Fingerprint and NotAfter must be the new certificate's"
	case d.Status != DeviceActive:
		problem = fmt.Sprintf("new device status %q, want %q", d.Status, DeviceActive)
	case rec.TokenID != c.TokenID:
		problem = fmt.Sprintf("TokenID %q is not Cert.TokenID %q", rec.TokenID, c.TokenID)
	default:
		return nil
	}
	return issueErr(c.Serial, fmt.Errorf("invalid issue record: %s", problem))
}

// checkRevocationTime refuses a zero revocation time: a zero RevokedAt
// means "not revoked", so the certificate would look valid while holding a
// revocation sequence number.
func checkRevocationTime(at time.Time) error {
	if at.IsZero() {
		return errors.New("zero revocation time")
	}
	return nil
}

// Error wrapping, identical in every store so messages match too. None of
// them carries a token hash.

func issueErr(serial string, err error) error {
	return fmt.Errorf("recording certificate %q: %w", serial, err)
}

func tokenErr(id string, err error) error { return fmt.Errorf("token %q: %w", id, err) }

func deviceErr(id string, err error) error { return fmt.Errorf("device %q: %w", id, err) }

func certErr(serial string, err error) error { return fmt.Errorf("certificate %q: %w", serial, err) }

func revokeDeviceErr(id string, err error) error {
	return fmt.Errorf("revoking device %q: %w", id, err)
}

func revokeCertErr(serial string, err error) error {
	return fmt.Errorf("revoking certificate %q: %w", serial, err)
}

// tokenRefusal is the reason a token cannot pay for a certificate at at,
// or nil if it can. Order matters and is the same everywhere: disabled,
// then expired, then spent.
func tokenRefusal(t Token, at time.Time) error {
	switch {
	case t.Disabled:
		return ErrTokenDisabled
	case !at.Before(t.ExpiresAt):
		return ErrTokenExpired
	case t.Uses >= t.MaxUses:
		return ErrTokenSpent
	}
	return nil
}
