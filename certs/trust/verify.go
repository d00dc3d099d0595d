package trust

import (
	"crypto/x509"
	"errors"
	"fmt"
	"slices"
	"time"

	"fleetkey.dev/certs/authority"
	"fleetkey.dev/certs/identity"
)

// MaxChainLength bounds the certificates a peer may present: leaf, issuing
// CA and perhaps the root.
const MaxChainLength = 4

// Reason classifies why a certificate was refused, for metrics and logs.
type Reason string

// The reasons Verify refuses a certificate.
const (
	ReasonNoCertificate   Reason = "no-certificate"
	ReasonUnknownCA       Reason = "unknown-ca"
	ReasonExpired         Reason = "expired"
	ReasonNotYetValid     Reason = "not-yet-valid"
	ReasonWrongEKU        Reason = "wrong-eku"
	ReasonCAAsLeaf        Reason = "ca-certificate"
	ReasonBadIdentity     Reason = "bad-spiffe-id"
	ReasonWrongRole       Reason = "wrong-role"
	ReasonWrongDomain     Reason = "wrong-trust-domain"
	ReasonRevoked         Reason = "revoked"
	ReasonNotTPMBound     Reason = "not-tpm-bound"
	ReasonChainTooLong    Reason = "chain-too-long"
	ReasonInvalidChain    Reason = "invalid-chain"
	ReasonBadTPMExtension Reason = "bad-tpm-binding"
)

// VerifyError says why a certificate was refused. Its message names the
// certificate and the rule; it carries no secret.
type VerifyError struct {
	Reason Reason
	Detail string
}

func (e *VerifyError) Error() string { return "certificate refused: " + e.Detail }

func refuse(r Reason, format string, args ...any) *VerifyError {
	return &VerifyError{Reason: r, Detail: fmt.Sprintf(format, args...)}
}

// ReasonOf returns the Reason of a *VerifyError in err's chain, or "".
func ReasonOf(err error) Reason {
	var ve *VerifyError
	if errors.As(err, &ve) {
		return ve.Reason
	}
	return ""
}

// VerifyOptions says what Verify expects of a certificate.
type VerifyOptions struct {
	// Now is the time of the check; zero means time.Now().
	Now time.Time
	// Usage is the extended key usage the leaf must allow: ClientAuth for a
	// TLS client, ServerAuth for a server. Zero means ClientAuth.
	Usage x509.ExtKeyUsage
	// Roles the leaf may have; empty means any role.
	Roles []identity.Role
	// RequireTPM refuses certificates that are not TPM-bound.
	RequireTPM bool
	// IsRevoked, if set, is asked about the leaf once its chain verifies.
	IsRevoked func(leaf *x509.Certificate) bool
}

// Peer is a verified certificate holder.
type Peer struct {
	ID    identity.ID
	Leaf  *x509.Certificate
	Chain []*x509.Certificate // leaf first, root last
	// TPMBound is set when the leaf carries the TPM binding; EKHash is then
	// the SHA-256 of the TPM's endorsement key public area.
	TPMBound bool
	EKHash   []byte
}

// Verify checks a presented chain (leaf first; any other certificates in it
// are ignored) against the bundle and returns the holder's identity. Every
// refusal is a *VerifyError.
func (b *Bundle) Verify(presented []*x509.Certificate, opts VerifyOptions) (*Peer, error) {
	if len(presented) == 0 || presented[0] == nil {
		return nil, refuse(ReasonNoCertificate, "no certificate presented")
	}
	if len(presented) > MaxChainLength {
		return nil, refuse(ReasonChainTooLong, "%d certificates presented; the limit is %d", len(presented), MaxChainLength)
	}
	leaf := presented[0]
	now := opts.Now
	if now.IsZero() {
		now = time.Now()
	}
	usage := opts.Usage
	if usage == 0 {
		usage = x509.ExtKeyUsageClientAuth
	}
	if leaf.IsCA {
		return nil, refuse(ReasonCAAsLeaf, "%q is a CA certificate, not a leaf", leaf.Subject.CommonName)
	}
	if now.Before(leaf.NotBefore) {
		return nil, refuse(ReasonNotYetValid, "%q is not valid before %s", leaf.Subject.CommonName, leaf.NotBefore.UTC().Format(time.RFC3339))
	}
	if now.After(leaf.NotAfter) {
		return nil, refuse(ReasonExpired, "%q expired at %s", leaf.Subject.CommonName, leaf.NotAfter.UTC().Format(time.RFC3339))
	}
	chains, err := leaf.Verify(x509.VerifyOptions{
		Roots:       b.anchors,
		CurrentTime: now,
		KeyUsages:   []x509.ExtKeyUsage{usage},
	})
	if err != nil {
		return nil, classify(leaf, err)
	}
	issuer := chains[0][1]
	root := b.rootOf[string(issuer.Raw)]
	if now.After(root.NotAfter) || now.Before(root.NotBefore) {
		return nil, refuse(ReasonExpired, "the root CA %q of %q is not valid at %s", root.Subject.CommonName, leaf.Subject.CommonName, now.UTC().Format(time.RFC3339))
	}
	id, err := leafIdentity(leaf)
	if err != nil {
		return nil, err
	}
	if id.TrustDomain != b.trustDomain {
		return nil, refuse(ReasonWrongDomain, "%q belongs to trust domain %q, not %q", id.String(), id.TrustDomain, b.trustDomain)
	}
	if len(opts.Roles) > 0 && !slices.Contains(opts.Roles, id.Role) {
		return nil, refuse(ReasonWrongRole, "%q has role %s; want %v", id.String(), id.Role, opts.Roles)
	}
	ekHash, bound, err := authority.TPMBinding(leaf)
	if err != nil {
		return nil, refuse(ReasonBadTPMExtension, "%s", err)
	}
	if opts.RequireTPM && !bound {
		return nil, refuse(ReasonNotTPMBound, "%q is not TPM-bound and this endpoint requires it", id.String())
	}
	if opts.IsRevoked != nil && opts.IsRevoked(leaf) {
		return nil, refuse(ReasonRevoked, "%q (serial %x) is revoked", id.String(), leaf.SerialNumber)
	}
	return &Peer{ID: id, Leaf: leaf, Chain: []*x509.Certificate{leaf, issuer, root}, TPMBound: bound, EKHash: ekHash}, nil
}

// leafIdentity reads the one SPIFFE ID of a leaf and, for devices, checks
// that CN = id.
func leafIdentity(leaf *x509.Certificate) (identity.ID, error) {
	if len(leaf.URIs) != 1 {
		return identity.ID{}, refuse(ReasonBadIdentity, "%q carries %d URI SANs; want exactly one SPIFFE ID", leaf.Subject.CommonName, len(leaf.URIs))
	}
	id, err := identity.FromURL(leaf.URIs[0])
	if err != nil {
		return identity.ID{}, refuse(ReasonBadIdentity, "%q: %s", leaf.Subject.CommonName, err)
	}
	if id.Role == identity.RoleDevice && leaf.Subject.CommonName != id.Name {
		return identity.ID{}, refuse(ReasonBadIdentity, "device certificate CN %q differs from its id %q", leaf.Subject.CommonName, id.Name)
	}
	return id, nil
}

// Identity extracts (trust domain, role, name) from a chain that crypto/tls
// or Bundle.Verify has already verified.
func Identity(verifiedChain []*x509.Certificate) (identity.ID, error) {
	if len(verifiedChain) == 0 {
		return identity.ID{}, refuse(ReasonNoCertificate, "no certificate")
	}
	return leafIdentity(verifiedChain[0])
}

// classify maps crypto/x509's verification errors to reasons.
func classify(leaf *x509.Certificate, err error) error {
	var unknown x509.UnknownAuthorityError
	if errors.As(err, &unknown) {
		return refuse(ReasonUnknownCA, "%q is not signed by a CA of this fleet's trust bundle", leaf.Subject.CommonName)
	}
	var invalid x509.CertificateInvalidError
	if errors.As(err, &invalid) {
		switch invalid.Reason {
		case x509.Expired:
			return refuse(ReasonExpired, "the chain of %q has expired or is not yet valid (%s)", leaf.Subject.CommonName, invalid.Detail)
		case x509.IncompatibleUsage:
			return refuse(ReasonWrongEKU, "%q does not allow this key usage", leaf.Subject.CommonName)
		case x509.CANotAuthorizedForThisName:
			return refuse(ReasonWrongDomain, "%q names an identity its CA may not vouch for", leaf.Subject.CommonName)
		}
	}
	return refuse(ReasonInvalidChain, "chain of %q does not verify: %v", leaf.Subject.CommonName, err)
}
