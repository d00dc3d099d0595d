// Package trust verifies fleet certificates against a trust bundle and
// extracts the identity they carry.
//
// A bundle holds the fleet's root CA and every issuing CA that is still
// trusted. Several issuing CAs live side by side so that the issuing CA can
// be rolled over without cutting off the devices whose certificates the old
// one signed; an issuing CA is retired by dropping it from the bundle.
// Chains are built only through the bundle's issuing CAs: an intermediate
// that a peer sends but the bundle does not list is ignored, so a retired
// issuing CA stays retired even if the root once signed it.
package trust

import (
	"bytes"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"time"
)

// MaxBundleBytes bounds a bundle file before it is parsed.
const MaxBundleBytes = 1 << 20

// Bundle is a fleet's trust anchors. Build one with NewBundle or
// ParseBundle; it is immutable and safe for concurrent use.
type Bundle struct {
	trustDomain string
	roots       []*x509.Certificate
	issuing     []*x509.Certificate
	rootPool    *x509.CertPool
	// anchors holds the issuing CAs, each checked against its root once,
	// here. Leaves are verified against them directly, so a handshake pays
	// one P-256 signature check instead of also re-checking the root's
	// P-384 signature on the issuing CA every time (about 10x the cost).
	anchors *x509.CertPool
	// rootOf maps an issuing CA (by raw DER) to the root that signed it, so
	// Verify can still refuse a chain whose root has expired.
	rootOf map[string]*x509.Certificate
}

// NewBundle checks and assembles a bundle. Every root must be a
// self-signed CA; every issuing CA must be signed by one of the roots and be
// name-constrained to a single trust domain, the same for all of them.
func NewBundle(roots, issuing []*x509.Certificate) (*Bundle, error) {
	if len(roots) == 0 {
		return nil, errors.New("trust bundle has no root CA")
	}
	if len(issuing) == 0 {
		return nil, errors.New("trust bundle has no issuing CA")
	}
	b := &Bundle{rootPool: x509.NewCertPool(), anchors: x509.NewCertPool(), rootOf: map[string]*x509.Certificate{}}
	for _, r := range roots {
		if !r.IsCA || !bytes.Equal(r.RawIssuer, r.RawSubject) || r.CheckSignatureFrom(r) != nil {
			return nil, fmt.Errorf("trust bundle: %q is not a self-signed root CA", r.Subject.CommonName)
		}
		b.rootPool.AddCert(r)
	}
	for _, c := range issuing {
		if !c.IsCA {
			return nil, fmt.Errorf("trust bundle: %q is not a CA certificate", c.Subject.CommonName)
		}
		for _, r := range roots {
			if bytes.Equal(c.RawIssuer, r.RawSubject) && c.CheckSignatureFrom(r) == nil {
				b.rootOf[string(c.Raw)] = r
			}
		}
		if b.rootOf[string(c.Raw)] == nil {
			return nil, fmt.Errorf("trust bundle: issuing CA %q is not signed by any root in the bundle", c.Subject.CommonName)
		}
		if len(c.PermittedURIDomains) != 1 {
			return nil, fmt.Errorf("trust bundle: issuing CA %q is not constrained to one trust domain", c.Subject.CommonName)
		}
		td := c.PermittedURIDomains[0]
		if b.trustDomain != "" && td != b.trustDomain {
			return nil, fmt.Errorf("trust bundle: issuing CAs of different trust domains (%q and %q)", b.trustDomain, td)
		}
		b.trustDomain = td
		b.anchors.AddCert(c)
	}
	b.roots, b.issuing = roots, issuing
	return b, nil
}

// ParseBundle reads PEM certificates: self-signed ones are roots, the other
// CAs are issuing CAs. Anything else in the file is an error.
func ParseBundle(data []byte) (*Bundle, error) {
	if len(data) > MaxBundleBytes {
		return nil, fmt.Errorf("trust bundle is %d bytes; the limit is %d", len(data), MaxBundleBytes)
	}
	certs, err := ParseCertificatesPEM(data)
	if err != nil {
		return nil, fmt.Errorf("reading trust bundle: %w", err)
	}
	var roots, issuing []*x509.Certificate
	for _, c := range certs {
		switch {
		case !c.IsCA:
			return nil, fmt.Errorf("trust bundle holds %q, which is not a CA certificate", c.Subject.CommonName)
		case bytes.Equal(c.RawIssuer, c.RawSubject):
			roots = append(roots, c)
		default:
			issuing = append(issuing, c)
		}
	}
	return NewBundle(roots, issuing)
}

// ParseCertificatesPEM reads every "CERTIFICATE" block of a PEM file. It
// refuses other block types and a file with no certificate.
func ParseCertificatesPEM(data []byte) ([]*x509.Certificate, error) {
	var out []*x509.Certificate
	for {
		var block *pem.Block
		block, data = pem.Decode(data)
		if block == nil {
			break
		}
		if block.Type != "CERTIFICATE" {
			return nil, fmt.Errorf("PEM block %q where a CERTIFICATE was expected", block.Type)
		}
		c, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return nil, fmt.Errorf("certificate %d: %w", len(out)+1, err)
		}
		out = append(out, c)
	}
	if len(out) == 0 {
		return nil, errors.New("no PEM certificate found")
	}
	return out, nil
}

// EncodePEM writes certificates as consecutive PEM blocks.
func EncodePEM(certs ...*x509.Certificate) []byte {
	var buf bytes.Buffer
	for _, c := range certs {
		_ = pem.Encode(&buf, &pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})
	}
	return buf.Bytes()
}

// TrustDomain is the one trust domain the bundle's issuing CAs vouch for.
func (b *Bundle) TrustDomain() string { return b.trustDomain }

// Roots returns the root CAs.
func (b *Bundle) Roots() []*x509.Certificate { return append([]*x509.Certificate(nil), b.roots...) }

// Issuing returns the trusted issuing CAs.
func (b *Bundle) Issuing() []*x509.Certificate {
	return append([]*x509.Certificate(nil), b.issuing...)
}

// RootPool returns a pool of the roots, for tls.Config.RootCAs.
func (b *Bundle) RootPool() *x509.CertPool { return b.rootPool.Clone() }

// PEM returns the bundle as a PEM file: roots first, then issuing CAs.
func (b *Bundle) PEM() []byte { return EncodePEM(append(b.Roots(), b.issuing...)...) }

// WithoutExpired returns a bundle without the issuing CAs that expired
// before now, or an error if none would remain.
func (b *Bundle) WithoutExpired(now time.Time) (*Bundle, error) {
	var live []*x509.Certificate
	for _, c := range b.issuing {
		if now.Before(c.NotAfter) {
			live = append(live, c)
		}
	}
	return NewBundle(b.roots, live)
}
