package authority

import (
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"net/url"
	"testing"

	"fleetkey.dev/certs/identity"
)

// BenchmarkIssueFromCSR compares fleetkey's issuance from a CSR with its
// floor: parsing and checking the CSR's signature plus x509.CreateCertificate
// on the same template, which is the crypto no CA can skip. The goal is
// fleetkey/floor <= 1.25.
func BenchmarkIssueFromCSR(b *testing.B) {
	is := testIssuer(b, Policy{})
	csr := makeCSR(b, p256(b), &x509.CertificateRequest{Subject: pkix.Name{CommonName: "bench-device-0001"}})

	b.Run("floor", func(b *testing.B) {
		ref, err := is.IssueCSR(csr, identity.RoleDevice, "")
		if err != nil {
			b.Fatal(err)
		}
		tmpl := &x509.Certificate{
			SerialNumber: ref.SerialNumber, Subject: ref.Subject, NotBefore: ref.NotBefore, NotAfter: ref.NotAfter,
			KeyUsage: ref.KeyUsage, ExtKeyUsage: ref.ExtKeyUsage, BasicConstraintsValid: true,
			URIs: []*url.URL{ref.URIs[0]},
		}
		b.ReportAllocs()
		for b.Loop() {
			req, err := x509.ParseCertificateRequest(csr)
			if err != nil {
				b.Fatal(err)
			}
			if err := req.CheckSignature(); err != nil {
				b.Fatal(err)
			}
			if _, err := x509.CreateCertificate(rand.Reader, tmpl, is.CA.Cert, req.PublicKey, is.CA.Signer); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("fleetkey", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if _, err := is.IssueCSR(csr, identity.RoleDevice, ""); err != nil {
				b.Fatal(err)
			}
		}
	})
}
