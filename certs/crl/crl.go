// Package crl builds and parses the fleet's certificate revocation lists
// (RFC 5280, section 5).
//
// Each issuing CA signs the CRL of the certificates it issued. A CRL is a
// fallback for gateways that cannot reach the provisioning service's
// revocation feed, so Parse is strict: the signature must come from one of
// the trusted issuing CAs, the list must be current, and its size is
// bounded before it is parsed.
package crl

import (
	"bytes"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"sort"
	"time"

	"fleetkey.dev/certs/authority"
)

// MaxBytes bounds a CRL before it is parsed: about 20,000 entries.
const MaxBytes = 1 << 20

// DefaultLifetime is how long a CRL is valid when the caller does not say.
const DefaultLifetime = 7 * 24 * time.Hour

// Reason codes of RFC 5280, 5.3.1, by the names operators type.
var Reasons = map[string]int{
	"unspecified":          0,
	"keyCompromise":        1,
	"cACompromise":         2,
	"affiliationChanged":   3,
	"superseded":           4,
	"cessationOfOperation": 5,
	"certificateHold":      6,
	"privilegeWithdrawn":   9,
}

// ReasonName returns the RFC 5280 name of a reason code.
func ReasonName(code int) string {
	for name, c := range Reasons {
		if c == code {
			return name
		}
	}
	return fmt.Sprintf("reason(%d)", code)
}

// Entry is one revoked certificate.
type Entry struct {
	Serial    *big.Int
	RevokedAt time.Time
	Reason    int
}

// Build signs a CRL with ca. number must increase with every CRL the CA
// issues (RFC 5280, 5.2.3). Entries are sorted by serial so that the same
// input gives the same list.
func Build(ca *authority.CA, entries []Entry, number *big.Int, thisUpdate, nextUpdate time.Time) ([]byte, error) {
	if number == nil || number.Sign() < 0 {
		return nil, errors.New("building CRL: the CRL number must be a non-negative integer")
	}
	if !nextUpdate.After(thisUpdate) {
		return nil, errors.New("building CRL: nextUpdate must be after thisUpdate")
	}
	revoked := make([]x509.RevocationListEntry, 0, len(entries))
	for _, e := range entries {
		if e.Serial == nil || e.Serial.Sign() <= 0 {
			return nil, errors.New("building CRL: a revoked serial must be a positive integer")
		}
		revoked = append(revoked, x509.RevocationListEntry{SerialNumber: e.Serial, RevocationTime: e.RevokedAt.UTC(), ReasonCode: e.Reason})
	}
	sort.Slice(revoked, func(i, j int) bool { return revoked[i].SerialNumber.Cmp(revoked[j].SerialNumber) < 0 })
	der, err := x509.CreateRevocationList(rand.Reader, &x509.RevocationList{
		Number:                    number,
		ThisUpdate:                thisUpdate.UTC(),
		NextUpdate:                nextUpdate.UTC(),
		RevokedCertificateEntries: revoked,
	}, ca.Cert, ca.Signer)
	if err != nil {
		return nil, fmt.Errorf("signing CRL: %w", err)
	}
	return der, nil
}

// EncodePEM wraps a DER CRL as PEM ("X509 CRL").
func EncodePEM(der []byte) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "X509 CRL", Bytes: der})
}

// List is a parsed, verified CRL.
type List struct {
	*x509.RevocationList
	Issuer  *x509.Certificate
	revoked map[string]struct{}
}

// Revokes reports whether the list revokes cert: the list's issuer issued
// it and its serial is on the list.
func (l *List) Revokes(cert *x509.Certificate) bool {
	if !bytes.Equal(cert.RawIssuer, l.Issuer.RawSubject) {
		return false
	}
	_, ok := l.revoked[string(cert.SerialNumber.Bytes())]
	return ok
}

// Parse reads a DER or PEM CRL, checks its signature against the issuing CAs
// in issuers, and refuses a list that has expired (nextUpdate before now) or
// is not yet valid.
func Parse(data []byte, issuers []*x509.Certificate, now time.Time) (*List, error) {
	if len(data) > MaxBytes {
		return nil, fmt.Errorf("CRL is %d bytes; the limit is %d", len(data), MaxBytes)
	}
	if block, _ := pem.Decode(data); block != nil {
		if block.Type != "X509 CRL" {
			return nil, fmt.Errorf("PEM block %q where an X509 CRL was expected", block.Type)
		}
		data = block.Bytes
	}
	rl, err := x509.ParseRevocationList(data)
	if err != nil {
		return nil, fmt.Errorf("parsing CRL: %w", err)
	}
	var issuer *x509.Certificate
	for _, c := range issuers {
		if bytes.Equal(c.RawSubject, rl.RawIssuer) && rl.CheckSignatureFrom(c) == nil {
			issuer = c
			break
		}
	}
	if issuer == nil {
		return nil, fmt.Errorf("CRL from %q is not signed by a trusted issuing CA", rl.Issuer.CommonName)
	}
	if now.Before(rl.ThisUpdate) {
		return nil, fmt.Errorf("CRL from %q is not valid before %s", rl.Issuer.CommonName, rl.ThisUpdate.Format(time.RFC3339))
	}
	if !rl.NextUpdate.IsZero() && now.After(rl.NextUpdate) {
		return nil, fmt.Errorf("CRL from %q is stale: its nextUpdate was %s", rl.Issuer.CommonName, rl.NextUpdate.Format(time.RFC3339))
	}
	l := &List{RevocationList: rl, Issuer: issuer, revoked: make(map[string]struct{}, len(rl.RevokedCertificateEntries))}
	for _, e := range rl.RevokedCertificateEntries {
		l.revoked[string(e.SerialNumber.Bytes())] = struct{}{}
	}
	return l, nil
}
