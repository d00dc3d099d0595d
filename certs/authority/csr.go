package authority

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rsa"
	"crypto/x509"
	"encoding/asn1"
	"encoding/pem"
	"errors"
	"fmt"
	"slices"
	"strings"

	"golang.org/x/crypto/cryptobyte"
	cbasn1 "golang.org/x/crypto/cryptobyte/asn1"

	"fleetkey.dev/certs/identity"
)

// MaxCSRBytes bounds a CSR before it is parsed. A P-256 CSR is about 250
// bytes and an RSA-8192 one about 1.2 KB; 16 KiB leaves room for attributes.
const MaxCSRBytes = 16 << 10

// Reason classifies why a CSR was refused, for metrics, audit records and
// callers that branch. The message of a CSRError says the same for a person.
type Reason string

// The reasons a CSR is refused.
const (
	ReasonTooLarge     Reason = "too-large"
	ReasonMalformed    Reason = "malformed"
	ReasonKeyType      Reason = "key-type"
	ReasonSignature    Reason = "bad-signature"
	ReasonCARequested  Reason = "ca-requested"
	ReasonExtraSAN     Reason = "extra-san"
	ReasonKeyUsage     Reason = "key-usage"
	ReasonExtKeyUsage  Reason = "ext-key-usage"
	ReasonBadID        Reason = "bad-id"
	ReasonIDMismatch   Reason = "id-mismatch"
	ReasonSubject      Reason = "subject"
	ReasonCAExpired    Reason = "ca-expired"
	ReasonBadHostNames Reason = "host-names"
)

// CSRError is returned when a CSR is refused. Its message is safe to show
// to the client: it names what the CSR asked for and why that is refused.
type CSRError struct {
	Reason Reason
	Detail string
}

func (e *CSRError) Error() string { return "CSR refused: " + e.Detail }

func refuse(r Reason, format string, args ...any) error {
	return &CSRError{Reason: r, Detail: fmt.Sprintf(format, args...)}
}

// Request is a checked request for a leaf certificate: the only two things
// taken from a CSR (the public key and the name) plus what the caller adds.
type Request struct {
	Role      identity.Role
	Name      string
	PublicKey crypto.PublicKey
	// DNSNames and IPAddresses are for gateway and service certificates.
	DNSNames    []string
	IPAddresses []string
	// TPMEKHash, when set, marks the certificate TPM-bound to the EK whose
	// public area hashes (SHA-256) to it. Only attestation may set it.
	TPMEKHash []byte
}

// DecodeCSR accepts a CSR as PEM ("CERTIFICATE REQUEST" or "NEW CERTIFICATE
// REQUEST") or DER and returns the DER, bounded by MaxCSRBytes.
func DecodeCSR(in []byte) ([]byte, error) {
	if len(in) > MaxCSRBytes*2 {
		return nil, refuse(ReasonTooLarge, "CSR is %d bytes; the limit is %d", len(in), MaxCSRBytes)
	}
	if block, _ := pem.Decode(in); block != nil {
		if block.Type != "CERTIFICATE REQUEST" && block.Type != "NEW CERTIFICATE REQUEST" {
			return nil, refuse(ReasonMalformed, "PEM block is %q; want \"CERTIFICATE REQUEST\"", block.Type)
		}
		in = block.Bytes
	}
	if len(in) > MaxCSRBytes {
		return nil, refuse(ReasonTooLarge, "CSR is %d bytes; the limit is %d", len(in), MaxCSRBytes)
	}
	return in, nil
}

// CheckCSR checks a DER CSR for a leaf of the given role and returns the
// Request it makes. If name is empty the name comes from the CSR's subject
// CN (or its SPIFFE URI SAN); otherwise the CSR must not name anyone else.
//
// In order, it refuses: an oversized or malformed CSR, a key type the policy
// does not accept, a signature that does not verify, CA:true, any SAN other
// than the SPIFFE ID being issued, CA key usages, extended key usages the
// role's profile does not grant, and a name outside the id grammar. Every
// refusal is a *CSRError.
func (p *Policy) CheckCSR(der []byte, role identity.Role, name string) (*Request, error) {
	if len(der) > MaxCSRBytes {
		return nil, refuse(ReasonTooLarge, "CSR is %d bytes; the limit is %d", len(der), MaxCSRBytes)
	}
	profile, ok := Profiles[role]
	if !ok {
		return nil, fmt.Errorf("no certificate profile for role %q", role)
	}
	csr, err := x509.ParseCertificateRequest(der)
	if err != nil {
		return nil, refuse(ReasonMalformed, "cannot parse the PKCS#10 request: %s", strings.TrimPrefix(err.Error(), "x509: "))
	}
	// The key type before the signature: the policy bounds what a check
	// may cost (no RSA-16384 signature checks for a hostile client).
	if err := p.checkKey(csr.PublicKey); err != nil {
		return nil, err
	}
	if err := csr.CheckSignature(); err != nil {
		return nil, refuse(ReasonSignature, "signature does not verify with the CSR's own key (%s)", strings.TrimPrefix(err.Error(), "x509: "))
	}
	if err := checkExtensions(csr, profile); err != nil {
		return nil, err
	}
	csrName, err := csrSubjectName(csr)
	if err != nil {
		return nil, err
	}
	if len(csr.URIs) > 0 {
		id, err := identity.FromURL(csr.URIs[0])
		if err != nil {
			return nil, refuse(ReasonBadID, "URI SAN %q: %s", csr.URIs[0].String(), reasonOf(err))
		}
		if id.TrustDomain != p.TrustDomain || id.Role != role {
			return nil, refuse(ReasonIDMismatch, "URI SAN %q is not a %s of trust domain %q", id.String(), role, p.TrustDomain)
		}
		if csrName != "" && csrName != id.Name {
			return nil, refuse(ReasonIDMismatch, "subject CN %q and URI SAN %q name different identities", csrName, id.String())
		}
		csrName = id.Name
	}
	switch {
	case name == "" && csrName == "":
		return nil, refuse(ReasonBadID, "CSR names no identity: put the id in the subject CN")
	case name == "":
		name = csrName
	case csrName != "" && csrName != name:
		return nil, refuse(ReasonIDMismatch, "CSR names %q but the request is for %q", csrName, name)
	}
	if err := identity.ValidateID(name); err != nil {
		return nil, refuse(ReasonBadID, "%s", reasonOf(err))
	}
	return &Request{Role: role, Name: name, PublicKey: csr.PublicKey}, nil
}

// reasonOf strips the sentinel prefix from an identity error, leaving the
// part a person acts on.
func reasonOf(err error) string {
	return strings.TrimPrefix(err.Error(), identity.ErrInvalid.Error()+": ")
}

// KeyTypeOf names the kind of a public key, or returns an error saying why
// it is not one fleetkey knows.
func KeyTypeOf(pub crypto.PublicKey) (KeyType, error) {
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		switch k.Curve {
		case elliptic.P256():
			return KeyP256, nil
		case elliptic.P384():
			return KeyP384, nil
		}
		return "", refuse(ReasonKeyType, "unsupported curve %s: use P-256 (or P-384)", k.Curve.Params().Name)
	case ed25519.PublicKey:
		return KeyEd25519, nil
	case *rsa.PublicKey:
		return KeyRSA, nil
	}
	return "", refuse(ReasonKeyType, "unsupported public key type %T: use ECDSA P-256", pub)
}

func (p *Policy) checkKey(pub crypto.PublicKey) error {
	kt, err := KeyTypeOf(pub)
	if err != nil {
		return err
	}
	if !p.allows(kt) {
		return refuse(ReasonKeyType, "key type %s is not allowed by policy (allowed: %s)", kt, p.allowedKeyTypes())
	}
	if k, ok := pub.(*rsa.PublicKey); ok {
		if bits := k.N.BitLen(); bits < MinRSABits || bits > MaxRSABits {
			return refuse(ReasonKeyType, "RSA key is %d bits; allowed are %d to %d", bits, MinRSABits, MaxRSABits)
		}
	}
	return nil
}

var (
	oidExtBasicConstraints = asn1.ObjectIdentifier{2, 5, 29, 19}
	oidExtKeyUsage         = asn1.ObjectIdentifier{2, 5, 29, 15}
	oidExtExtKeyUsage      = asn1.ObjectIdentifier{2, 5, 29, 37}
	oidExtSubjectAltName   = asn1.ObjectIdentifier{2, 5, 29, 17}
	oidCommonName          = asn1.ObjectIdentifier{2, 5, 4, 3}
)

var extKeyUsageOIDs = map[x509.ExtKeyUsage]asn1.ObjectIdentifier{
	x509.ExtKeyUsageServerAuth: {1, 3, 6, 1, 5, 5, 7, 3, 1},
	x509.ExtKeyUsageClientAuth: {1, 3, 6, 1, 5, 5, 7, 3, 2},
}

// checkExtensions refuses a CSR that asks for powers the profile does not
// give. Requests the profile grants anyway (digitalSignature, clientAuth for
// a device) are accepted and ignored: the leaf is built from the profile.
func checkExtensions(csr *x509.CertificateRequest, profile Profile) error {
	for _, ext := range csr.Extensions {
		switch {
		case ext.Id.Equal(oidExtBasicConstraints):
			var bc struct {
				IsCA       bool `asn1:"optional"`
				MaxPathLen int  `asn1:"optional,default:-1"`
			}
			if rest, err := asn1.Unmarshal(ext.Value, &bc); err != nil || len(rest) > 0 {
				return refuse(ReasonMalformed, "cannot parse the basicConstraints extension")
			}
			if bc.IsCA {
				return refuse(ReasonCARequested, "it requests CA:true; a %s certificate is never a CA", profile.Role)
			}
		case ext.Id.Equal(oidExtSubjectAltName):
			if err := checkSAN(csr, ext.Value); err != nil {
				return err
			}
		case ext.Id.Equal(oidExtKeyUsage):
			var bits asn1.BitString
			if rest, err := asn1.Unmarshal(ext.Value, &bits); err != nil || len(rest) > 0 {
				return refuse(ReasonMalformed, "cannot parse the keyUsage extension")
			}
			// keyCertSign is bit 5, cRLSign bit 6 (RFC 5280, 4.2.1.3).
			if bits.At(5) == 1 || bits.At(6) == 1 {
				return refuse(ReasonKeyUsage, "it requests the CA key usages keyCertSign/cRLSign")
			}
		case ext.Id.Equal(oidExtExtKeyUsage):
			var oids []asn1.ObjectIdentifier
			if rest, err := asn1.Unmarshal(ext.Value, &oids); err != nil || len(rest) > 0 {
				return refuse(ReasonMalformed, "cannot parse the extendedKeyUsage extension")
			}
			for _, oid := range oids {
				granted := slices.ContainsFunc(profile.ExtKeyUsage, func(u x509.ExtKeyUsage) bool { return extKeyUsageOIDs[u].Equal(oid) })
				if !granted {
					return refuse(ReasonExtKeyUsage, "it requests extended key usage %s, which the %s profile does not grant", oid, profile.Role)
				}
			}
		}
	}
	return nil
}

// checkSAN allows at most one SAN, a URI (the SPIFFE ID, checked by the
// caller). Go's parser drops name types it does not know (otherName,
// directoryName, ...), so the raw GeneralNames are counted here.
func checkSAN(csr *x509.CertificateRequest, raw []byte) error {
	var extra []string
	for _, n := range csr.DNSNames {
		extra = append(extra, "DNS:"+n)
	}
	for _, n := range csr.EmailAddresses {
		extra = append(extra, "email:"+n)
	}
	for _, ip := range csr.IPAddresses {
		extra = append(extra, "IP:"+ip.String())
	}
	for _, u := range csr.URIs[min(1, len(csr.URIs)):] {
		extra = append(extra, "URI:"+u.String())
	}
	if len(extra) > 0 {
		return refuse(ReasonExtraSAN, "it requests subject alternative names %s; only the identity's SPIFFE ID is allowed", strings.Join(extra, ", "))
	}
	in := cryptobyte.String(raw)
	var names cryptobyte.String
	if !in.ReadASN1(&names, cbasn1.SEQUENCE) || !in.Empty() {
		return refuse(ReasonMalformed, "cannot parse the subjectAltName extension")
	}
	count := 0
	for !names.Empty() {
		var name cryptobyte.String
		var tag cbasn1.Tag
		if !names.ReadAnyASN1(&name, &tag) {
			return refuse(ReasonMalformed, "cannot parse the subjectAltName extension")
		}
		count++
		if tag != cbasn1.Tag(6).ContextSpecific() { // uniformResourceIdentifier [6]
			return refuse(ReasonExtraSAN, "it requests a subject alternative name of type [%d]; only the identity's SPIFFE ID is allowed", uint8(tag)&0x1f)
		}
	}
	if count != len(csr.URIs) {
		return refuse(ReasonExtraSAN, "it requests %d subject alternative names; only the identity's SPIFFE ID is allowed", count)
	}
	return nil
}

// csrSubjectName returns the subject's single CN, or "" when there is none.
// Other subject attributes are ignored; they are never copied.
func csrSubjectName(csr *x509.CertificateRequest) (string, error) {
	var cns []string
	for _, atv := range csr.Subject.Names {
		if atv.Type.Equal(oidCommonName) {
			s, ok := atv.Value.(string)
			if !ok {
				return "", refuse(ReasonSubject, "subject CN is not a string")
			}
			cns = append(cns, s)
		}
	}
	switch len(cns) {
	case 0:
		return "", nil
	case 1:
		if err := identity.ValidateID(cns[0]); err != nil {
			return "", refuse(ReasonBadID, "subject CN: %s", reasonOf(err))
		}
		return cns[0], nil
	}
	return "", refuse(ReasonSubject, "subject has %d common names; want exactly one, the id", len(cns))
}

// IsCSRError reports whether err is a CSR refusal and returns it.
func IsCSRError(err error) (*CSRError, bool) {
	var ce *CSRError
	ok := errors.As(err, &ce)
	return ce, ok
}
