package authority

import (
	"bytes"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"

	"golang.org/x/crypto/cryptobyte"
	cbasn1 "golang.org/x/crypto/cryptobyte/asn1"
)

// TPM binding.
//
// The design asked for a private extension under 2.25.<uuid>. Go's
// crypto/x509 cannot parse a certificate whose extension OID has an arc
// wider than an int ("x509: malformed extension OID field"), and every UUID
// arc is 128 bits, so such a certificate would be refused by every Go peer,
// crypto/tls included. Certificate policies, however, are parsed into
// x509.OID, which has no such limit. So a TPM-bound certificate carries the
// certificate policy TPMBoundPolicy, and the SHA-256 of the TPM's endorsement
// key (EK) public area travels in that policy's user notice
// (RFC 5280, 4.2.1.4) as "ek-sha256:<64 hex digits>". openssl x509 -text
// shows both; Go exposes the policy in Certificate.Policies.

// TPMBoundPolicy is the certificate policy of a key that a TPM attested as
// fixedTPM; UUID c4680137-51d2-4b3a-aa80-38cfbbc4d61c, under 2.25
// (ITU-T X.667), so it needs no registration.
var TPMBoundPolicy = mustOID("2.25.261068710712412190576053623465621902876")

var (
	oidCertificatePolicies = asn1.ObjectIdentifier{2, 5, 29, 32}
	oidQualifierUserNotice = asn1.ObjectIdentifier{1, 3, 6, 1, 5, 5, 7, 2, 2}
)

const ekNoticePrefix = "ek-sha256:"

func mustOID(s string) x509.OID {
	oid, err := x509.ParseOID(s)
	if err != nil {
		panic(err)
	}
	return oid
}

func oidBytes(oid x509.OID) []byte {
	b, err := oid.MarshalBinary()
	if err != nil {
		panic(err) // only for the constant above
	}
	return b
}

// tpmBindingExtension builds the certificate policies extension that marks a
// certificate TPM-bound to the EK whose public-area SHA-256 is ekHash.
func tpmBindingExtension(ekHash []byte) (pkix.Extension, error) {
	if len(ekHash) != 32 {
		return pkix.Extension{}, fmt.Errorf("EK hash is %d bytes; want a 32-byte SHA-256", len(ekHash))
	}
	var b cryptobyte.Builder
	b.AddASN1(cbasn1.SEQUENCE, func(b *cryptobyte.Builder) { // CertificatePolicies
		b.AddASN1(cbasn1.SEQUENCE, func(b *cryptobyte.Builder) { // PolicyInformation
			b.AddASN1(cbasn1.OBJECT_IDENTIFIER, func(b *cryptobyte.Builder) { b.AddBytes(oidBytes(TPMBoundPolicy)) })
			b.AddASN1(cbasn1.SEQUENCE, func(b *cryptobyte.Builder) { // policyQualifiers
				b.AddASN1(cbasn1.SEQUENCE, func(b *cryptobyte.Builder) { // PolicyQualifierInfo
					b.AddASN1ObjectIdentifier(oidQualifierUserNotice)
					b.AddASN1(cbasn1.SEQUENCE, func(b *cryptobyte.Builder) { // UserNotice
						b.AddASN1(cbasn1.UTF8String, func(b *cryptobyte.Builder) {
							b.AddBytes([]byte(ekNoticePrefix + hex.EncodeToString(ekHash)))
						})
					})
				})
			})
		})
	})
	der, err := b.Bytes()
	if err != nil {
		return pkix.Extension{}, fmt.Errorf("encoding TPM binding: %w", err)
	}
	return pkix.Extension{Id: oidCertificatePolicies, Value: der}, nil
}

// TPMBinding reports whether cert is TPM-bound and, if so, returns the
// SHA-256 of the bound EK's public area. A certificate that carries
// TPMBoundPolicy without a well-formed EK hash is an error, not "unbound".
func TPMBinding(cert *x509.Certificate) (ekHash []byte, bound bool, err error) {
	marked := false
	for _, p := range cert.Policies {
		if p.Equal(TPMBoundPolicy) {
			marked = true
		}
	}
	if !marked {
		return nil, false, nil
	}
	for _, ext := range cert.Extensions {
		if ext.Id.Equal(oidCertificatePolicies) {
			h, err := parseTPMBinding(ext.Value)
			if err != nil {
				return nil, true, fmt.Errorf("certificate %q: malformed TPM binding: %w", cert.Subject.CommonName, err)
			}
			return h, true, nil
		}
	}
	return nil, true, errors.New("TPM-bound policy without a policies extension")
}

func parseTPMBinding(der []byte) ([]byte, error) {
	want := oidBytes(TPMBoundPolicy)
	in := cryptobyte.String(der)
	var policies cryptobyte.String
	if !in.ReadASN1(&policies, cbasn1.SEQUENCE) || !in.Empty() {
		return nil, errors.New("bad certificate policies encoding")
	}
	for !policies.Empty() {
		var info, oid, quals cryptobyte.String
		if !policies.ReadASN1(&info, cbasn1.SEQUENCE) || !info.ReadASN1(&oid, cbasn1.OBJECT_IDENTIFIER) {
			return nil, errors.New("bad policy information")
		}
		if !bytes.Equal(oid, want) {
			continue
		}
		if !info.ReadASN1(&quals, cbasn1.SEQUENCE) || !info.Empty() {
			return nil, errors.New("TPM-bound policy has no qualifiers")
		}
		for !quals.Empty() {
			var q, notice, text cryptobyte.String
			var qid asn1.ObjectIdentifier
			if !quals.ReadASN1(&q, cbasn1.SEQUENCE) || !q.ReadASN1ObjectIdentifier(&qid) {
				return nil, errors.New("bad policy qualifier")
			}
			if !qid.Equal(oidQualifierUserNotice) {
				continue
			}
			if !q.ReadASN1(&notice, cbasn1.SEQUENCE) || !notice.ReadASN1(&text, cbasn1.UTF8String) || !notice.Empty() || !q.Empty() {
				return nil, errors.New("bad user notice")
			}
			h, ok := strings.CutPrefix(string(text), ekNoticePrefix)
			if !ok || len(h) != 64 {
				return nil, fmt.Errorf("user notice %q is not %s<64 hex digits>", string(text), ekNoticePrefix)
			}
			sum, err := hex.DecodeString(h)
			if err != nil {
				return nil, fmt.Errorf("user notice %q: %w", string(text), err)
			}
			return sum, nil
		}
		return nil, errors.New("TPM-bound policy has no EK user notice")
	}
	return nil, errors.New("TPM-bound policy not in the policies extension")
}
