// Package authority is fleetkey's certificate authority: the root and issuing
// CAs, the certificate profiles of each role, and issuance from a CSR under a
// policy.
//
// The hierarchy is root CA (ECDSA P-384, long-lived, its key can stay
// offline) → issuing CA (ECDSA P-256, rolled over by creating a new one that
// is trusted beside the old) → leaves. Every key is used through
// crypto.Signer, so a CA key held in a TPM or a KMS can replace the software
// key without changing this package.
//
// Issuance takes exactly two things from a CSR: the public key and the
// requested name. Everything else in a leaf comes from the role's profile
// and the policy; a CSR that asks for more (CA:true, extra SANs, other
// EKUs) is refused with a reason rather than silently trimmed, so a
// misconfigured factory station is noticed.
package authority

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"io"
	"math/big"
	"time"

	"fleetkey.dev/certs/identity"
)

// CA is a certificate authority: its certificate and the signer that holds
// its private key. A CA is safe for concurrent use if its Signer is.
type CA struct {
	Cert   *x509.Certificate
	Signer crypto.Signer
}

// NewCA pairs a CA certificate with its signer after checking that they
// belong together and that the certificate is a CA.
func NewCA(cert *x509.Certificate, signer crypto.Signer) (*CA, error) {
	if cert == nil || signer == nil {
		return nil, errors.New("CA needs both a certificate and a signer")
	}
	if !cert.BasicConstraintsValid || !cert.IsCA {
		return nil, fmt.Errorf("certificate %q is not a CA certificate", cert.Subject.CommonName)
	}
	if cert.KeyUsage&x509.KeyUsageCertSign == 0 {
		return nil, fmt.Errorf("CA certificate %q does not allow certificate signing", cert.Subject.CommonName)
	}
	if !samePublicKey(cert.PublicKey, signer.Public()) {
		return nil, fmt.Errorf("private key does not match CA certificate %q", cert.Subject.CommonName)
	}
	return &CA{Cert: cert, Signer: signer}, nil
}

func samePublicKey(a, b crypto.PublicKey) bool {
	ka, ok := a.(interface{ Equal(crypto.PublicKey) bool })
	return ok && ka.Equal(b)
}

// Defaults for the CA hierarchy.
const (
	DefaultRootValidity    = 20 * 365 * 24 * time.Hour
	DefaultIssuingValidity = 3 * 365 * 24 * time.Hour
)

// CAOptions configures the creation of a root or issuing CA. The zero value
// gives the defaults.
type CAOptions struct {
	// TrustDomain names the fleet. It appears in the CA's subject and, on
	// issuing CAs, as a URI name constraint so that the CA can only vouch
	// for SPIFFE IDs of this trust domain.
	TrustDomain string
	// Validity of the new CA; default DefaultRootValidity or
	// DefaultIssuingValidity. An issuing CA never outlives its root.
	Validity time.Duration
	// Now is the clock; default time.Now.
	Now func() time.Time
	// Rand is the source of serial numbers; default crypto/rand.Reader.
	Rand io.Reader
}

func (o *CAOptions) now() time.Time {
	if o.Now != nil {
		return o.Now()
	}
	return time.Now()
}

func (o *CAOptions) rand() io.Reader {
	if o.Rand != nil {
		return o.Rand
	}
	return rand.Reader
}

// NewRoot makes a self-signed root CA with a new ECDSA P-384 key.
func NewRoot(opts CAOptions) (*CA, error) {
	if err := identity.ValidateTrustDomain(opts.TrustDomain); err != nil {
		return nil, fmt.Errorf("creating root CA: %w", err)
	}
	key, err := ecdsa.GenerateKey(elliptic.P384(), opts.rand())
	if err != nil {
		return nil, fmt.Errorf("creating root CA key: %w", err)
	}
	validity := opts.Validity
	if validity == 0 {
		validity = DefaultRootValidity
	}
	now := opts.now()
	serial, err := NewSerial(opts.rand())
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{Organization: []string{opts.TrustDomain}, CommonName: opts.TrustDomain + " fleetkey root CA"},
		NotBefore:             now.Add(-Backdate),
		NotAfter:              now.Add(validity),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLen:            1,
	}
	return createCA(tmpl, nil, key)
}

// NewIssuing makes an issuing CA with a new ECDSA P-256 key, signed by root.
// Its subject carries the creation time, so that the issuing CAs trusted
// side by side during a rollover have distinct names.
func NewIssuing(root *CA, opts CAOptions) (*CA, error) {
	if err := identity.ValidateTrustDomain(opts.TrustDomain); err != nil {
		return nil, fmt.Errorf("creating issuing CA: %w", err)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), opts.rand())
	if err != nil {
		return nil, fmt.Errorf("creating issuing CA key: %w", err)
	}
	validity := opts.Validity
	if validity == 0 {
		validity = DefaultIssuingValidity
	}
	now := opts.now()
	if !now.Before(root.Cert.NotAfter) {
		return nil, fmt.Errorf("creating issuing CA: root CA expired at %s", root.Cert.NotAfter.UTC().Format(time.RFC3339))
	}
	notAfter := now.Add(validity)
	if notAfter.After(root.Cert.NotAfter) {
		notAfter = root.Cert.NotAfter
	}
	serial, err := NewSerial(opts.rand())
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject: pkix.Name{
			Organization: []string{opts.TrustDomain},
			CommonName:   opts.TrustDomain + " fleetkey issuing CA " + now.UTC().Format("2006-01-02T15:04:05Z"),
		},
		NotBefore:             now.Add(-Backdate),
		NotAfter:              notAfter,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLen:            0,
		MaxPathLenZero:        true,
		// RFC 5280, 4.2.1.10: a URI constraint is a host; the SPIFFE ID's
		// host is the trust domain. It must be marked critical.
		PermittedURIDomains:         []string{opts.TrustDomain},
		PermittedDNSDomainsCritical: true,
	}
	return createCA(tmpl, root, key)
}

func createCA(tmpl *x509.Certificate, parent *CA, key crypto.Signer) (*CA, error) {
	parentCert, parentSigner := tmpl, key
	if parent != nil {
		parentCert, parentSigner = parent.Cert, parent.Signer
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parentCert, key.Public(), parentSigner)
	if err != nil {
		return nil, fmt.Errorf("signing CA certificate: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("parsing new CA certificate: %w", err)
	}
	return NewCA(cert, key)
}

// Backdate is how far before "now" every new certificate becomes valid, to
// absorb clock skew between the CA and the devices.
const Backdate = time.Minute

// NewSerial returns a random, positive serial number of at most 127 bits,
// which encodes in 16 bytes or fewer (RFC 5280, 4.1.2.2 allows 20) and keeps
// well over the 64 bits of entropy that CA/Browser Forum rules ask for.
func NewSerial(r io.Reader) (*big.Int, error) {
	var b [16]byte
	for {
		if _, err := io.ReadFull(r, b[:]); err != nil {
			return nil, fmt.Errorf("reading randomness for a serial number: %w", err)
		}
		b[0] &= 0x7f
		if b != ([16]byte{}) {
			return new(big.Int).SetBytes(b[:]), nil
		}
	}
}
