package trust

import (
	"crypto/x509"
	"testing"

	"fleetkey.dev/certs/identity"
)

// BenchmarkVerify measures Bundle.Verify, which every gateway handshake
// runs. Its floor is crypto/x509's verification of the leaf against the
// issuing CA as the anchor: one P-256 signature check plus path checks.
// Goal: fleetkey/floor <= 1.1. The full-chain row is the naive way (root as
// anchor, the issuing CA as intermediate), which re-checks the root's P-384
// signature on every handshake; the bundle checks it once, at load.
func BenchmarkVerify(b *testing.B) {
	f := newFleet(b, td)
	leaf := f.leaf(b, identity.RoleDevice, "bench-1", nil)
	anchors := x509.NewCertPool()
	anchors.AddCert(f.iss.Cert)
	inter := x509.NewCertPool()
	inter.AddCert(f.iss.Cert)
	verify := func(b *testing.B, opts x509.VerifyOptions) {
		b.ReportAllocs()
		for b.Loop() {
			if _, err := leaf.Verify(opts); err != nil {
				b.Fatal(err)
			}
		}
	}
	usage := []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}
	b.Run("floor", func(b *testing.B) {
		verify(b, x509.VerifyOptions{Roots: anchors, CurrentTime: now, KeyUsages: usage})
	})
	b.Run("full-chain", func(b *testing.B) {
		verify(b, x509.VerifyOptions{Roots: f.bundle.RootPool(), Intermediates: inter, CurrentTime: now, KeyUsages: usage})
	})
	b.Run("fleetkey", func(b *testing.B) {
		b.ReportAllocs()
		vo := VerifyOptions{Now: now, Roles: []identity.Role{identity.RoleDevice}}
		for b.Loop() {
			if _, err := f.bundle.Verify([]*x509.Certificate{leaf}, vo); err != nil {
				b.Fatal(err)
			}
		}
	})
}
