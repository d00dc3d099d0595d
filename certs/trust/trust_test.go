package trust

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"net/url"
	"strings"
	"testing"
	"time"

	"fleetkey.dev/certs/authority"
	"fleetkey.dev/certs/identity"
)

const td = "fleet.test"

var now = time.Date(2026, 11, 26, 12, 0, 0, 0, time.UTC)

type fleet struct {
	root, iss *authority.CA
	issuer    *authority.Issuer
	bundle    *Bundle
}

func newFleet(t testing.TB, domain string) *fleet {
	t.Helper()
	opts := authority.CAOptions{TrustDomain: domain, Now: func() time.Time { return now }}
	root, err := authority.NewRoot(opts)
	if err != nil {
		t.Fatal(err)
	}
	iss, err := authority.NewIssuing(root, opts)
	if err != nil {
		t.Fatal(err)
	}
	b, err := NewBundle([]*x509.Certificate{root.Cert}, []*x509.Certificate{iss.Cert})
	if err != nil {
		t.Fatal(err)
	}
	return &fleet{root: root, iss: iss, bundle: b, issuer: &authority.Issuer{CA: iss, Policy: authority.Policy{TrustDomain: domain}, Now: func() time.Time { return now }}}
}

func (f *fleet) leaf(t testing.TB, role identity.Role, name string, ekHash []byte) *x509.Certificate {
	t.Helper()
	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	c, err := f.issuer.Issue(&authority.Request{Role: role, Name: name, PublicKey: k.Public(), TPMEKHash: ekHash})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// forge signs an arbitrary template with the fleet's issuing CA: what a
// buggy or compromised issuance path could produce.
func (f *fleet) forge(t *testing.T, tmpl *x509.Certificate) *x509.Certificate {
	t.Helper()
	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if tmpl.SerialNumber == nil {
		tmpl.SerialNumber = big.NewInt(42)
	}
	if tmpl.NotBefore.IsZero() {
		tmpl.NotBefore, tmpl.NotAfter = now.Add(-time.Hour), now.Add(time.Hour)
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, f.iss.Cert, k.Public(), f.iss.Signer)
	if err != nil {
		t.Fatal(err)
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func mustURL(s string) *url.URL {
	u, err := url.Parse(s)
	if err != nil {
		panic(err)
	}
	return u
}

func TestVerify(t *testing.T) {
	t.Parallel()
	f := newFleet(t, td)
	other := newFleet(t, "other.test")
	dev := f.leaf(t, identity.RoleDevice, "sensor-1", nil)

	peer, err := f.bundle.Verify([]*x509.Certificate{dev}, VerifyOptions{Now: now, Roles: []identity.Role{identity.RoleDevice}})
	if err != nil {
		t.Fatal(err)
	}
	if peer.ID != (identity.ID{TrustDomain: td, Role: identity.RoleDevice, Name: "sensor-1"}) || peer.TPMBound {
		t.Fatalf("peer = %+v", peer)
	}
	if len(peer.Chain) != 3 {
		t.Fatalf("chain length %d, want leaf, issuing, root", len(peer.Chain))
	}
	gw := f.leaf(t, identity.RoleGateway, "gw", nil)
	if _, err := f.bundle.Verify([]*x509.Certificate{gw}, VerifyOptions{Now: now, Usage: x509.ExtKeyUsageServerAuth}); err != nil {
		t.Fatalf("gateway as server: %v", err)
	}
	ek := make([]byte, 32)
	tpm := f.leaf(t, identity.RoleDevice, "tpm-1", ek)
	if p, err := f.bundle.Verify([]*x509.Certificate{tpm}, VerifyOptions{Now: now, RequireTPM: true}); err != nil || !p.TPMBound {
		t.Fatalf("TPM-bound leaf: %+v %v", p, err)
	}

	wrongEKU := f.forge(t, &x509.Certificate{Subject: pkix.Name{CommonName: "d"}, URIs: []*url.URL{mustURL("spiffe://fleet.test/device/d")},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageCodeSigning}})
	noURI := f.forge(t, &x509.Certificate{Subject: pkix.Name{CommonName: "d"}, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}})
	twoURIs := f.forge(t, &x509.Certificate{Subject: pkix.Name{CommonName: "d"}, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
		URIs: []*url.URL{mustURL("spiffe://fleet.test/device/d"), mustURL("spiffe://fleet.test/admin/d")}})
	badID := f.forge(t, &x509.Certificate{Subject: pkix.Name{CommonName: "d"}, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
		URIs: []*url.URL{mustURL("spiffe://fleet.test/device/a+b")}})
	cnMismatch := f.forge(t, &x509.Certificate{Subject: pkix.Name{CommonName: "other"}, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
		URIs: []*url.URL{mustURL("spiffe://fleet.test/device/d")}})
	foreignTD := f.forge(t, &x509.Certificate{Subject: pkix.Name{CommonName: "d"}, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
		URIs: []*url.URL{mustURL("spiffe://other.test/device/d")}})
	expired := f.forge(t, &x509.Certificate{Subject: pkix.Name{CommonName: "d"}, URIs: []*url.URL{mustURL("spiffe://fleet.test/device/d")},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}, NotBefore: now.Add(-2 * time.Hour), NotAfter: now.Add(-time.Hour)})
	future := f.forge(t, &x509.Certificate{Subject: pkix.Name{CommonName: "d"}, URIs: []*url.URL{mustURL("spiffe://fleet.test/device/d")},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}, NotBefore: now.Add(time.Hour), NotAfter: now.Add(2 * time.Hour)})

	cases := []struct {
		name   string
		chain  []*x509.Certificate
		opts   VerifyOptions
		reason Reason
	}{
		{"fail/no-certificate", nil, VerifyOptions{}, ReasonNoCertificate},
		{"fail/other-ca", []*x509.Certificate{other.leaf(t, identity.RoleDevice, "sensor-1", nil)}, VerifyOptions{}, ReasonUnknownCA},
		{"fail/other-ca-with-its-intermediate", []*x509.Certificate{other.leaf(t, identity.RoleDevice, "x", nil), other.iss.Cert}, VerifyOptions{}, ReasonUnknownCA},
		{"fail/expired", []*x509.Certificate{expired}, VerifyOptions{}, ReasonExpired},
		{"fail/expired-by-clock", []*x509.Certificate{dev}, VerifyOptions{Now: dev.NotAfter.Add(time.Second)}, ReasonExpired},
		{"fail/not-yet-valid", []*x509.Certificate{future}, VerifyOptions{}, ReasonNotYetValid},
		{"fail/wrong-eku", []*x509.Certificate{wrongEKU}, VerifyOptions{}, ReasonWrongEKU},
		{"fail/device-as-server", []*x509.Certificate{dev}, VerifyOptions{Usage: x509.ExtKeyUsageServerAuth}, ReasonWrongEKU},
		{"fail/ca-as-leaf", []*x509.Certificate{f.iss.Cert}, VerifyOptions{}, ReasonCAAsLeaf},
		{"fail/no-spiffe-id", []*x509.Certificate{noURI}, VerifyOptions{}, ReasonBadIdentity},
		{"fail/two-spiffe-ids", []*x509.Certificate{twoURIs}, VerifyOptions{}, ReasonBadIdentity},
		{"fail/bad-spiffe-id", []*x509.Certificate{badID}, VerifyOptions{}, ReasonBadIdentity},
		{"fail/cn-not-id", []*x509.Certificate{cnMismatch}, VerifyOptions{}, ReasonBadIdentity},
		{"fail/foreign-trust-domain", []*x509.Certificate{foreignTD}, VerifyOptions{}, ReasonWrongDomain},
		{"fail/wrong-role", []*x509.Certificate{gw}, VerifyOptions{Roles: []identity.Role{identity.RoleDevice}}, ReasonWrongRole},
		{"fail/revoked", []*x509.Certificate{dev}, VerifyOptions{IsRevoked: func(c *x509.Certificate) bool { return c.SerialNumber.Cmp(dev.SerialNumber) == 0 }}, ReasonRevoked},
		{"fail/not-tpm-bound", []*x509.Certificate{dev}, VerifyOptions{RequireTPM: true}, ReasonNotTPMBound},
		{"fail/chain-too-long", []*x509.Certificate{dev, dev, dev, dev, dev}, VerifyOptions{}, ReasonChainTooLong},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			if c.opts.Now.IsZero() {
				c.opts.Now = now
			}
			p, err := f.bundle.Verify(c.chain, c.opts)
			if p != nil || ReasonOf(err) != c.reason {
				t.Fatalf("Verify = %+v, %v; want reason %s", p, err, c.reason)
			}
		})
	}
}

func TestBundleRollover(t *testing.T) {
	t.Parallel()
	f := newFleet(t, td)
	oldLeaf := f.leaf(t, identity.RoleDevice, "old", nil)
	next, err := authority.NewIssuing(f.root, authority.CAOptions{TrustDomain: td, Now: func() time.Time { return now.Add(time.Second) }})
	if err != nil {
		t.Fatal(err)
	}
	newLeaf, err := (&authority.Issuer{CA: next, Policy: authority.Policy{TrustDomain: td}, Now: func() time.Time { return now }}).Issue(
		&authority.Request{Role: identity.RoleDevice, Name: "new", PublicKey: oldLeaf.PublicKey})
	if err != nil {
		t.Fatal(err)
	}
	both, err := ParseBundle(EncodePEM(f.root.Cert, next.Cert, f.iss.Cert))
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range []*x509.Certificate{oldLeaf, newLeaf} {
		if _, err := both.Verify([]*x509.Certificate{l}, VerifyOptions{Now: now}); err != nil {
			t.Errorf("%s does not verify against the rolled-over bundle: %v", l.Subject.CommonName, err)
		}
	}
	// Retiring the old issuing CA (dropping it from the bundle) cuts its
	// leaves off, even when the peer sends the old CA itself.
	retired, err := NewBundle([]*x509.Certificate{f.root.Cert}, []*x509.Certificate{next.Cert})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := retired.Verify([]*x509.Certificate{oldLeaf, f.iss.Cert}, VerifyOptions{Now: now}); ReasonOf(err) != ReasonUnknownCA {
		t.Errorf("retired CA still trusted: %v", err)
	}
	// WithoutExpired drops issuing CAs past their NotAfter.
	pruned, err := both.WithoutExpired(f.iss.Cert.NotAfter.Add(-time.Hour))
	if err != nil || len(pruned.Issuing()) != 2 {
		t.Fatalf("WithoutExpired before expiry: %v", err)
	}
	if _, err := both.WithoutExpired(next.Cert.NotAfter.Add(time.Hour)); err == nil {
		t.Fatal("WithoutExpired left an empty bundle")
	}
}

func TestParseBundleRefusals(t *testing.T) {
	t.Parallel()
	f := newFleet(t, td)
	other := newFleet(t, "other.test")
	leaf := f.leaf(t, identity.RoleDevice, "x", nil)
	cases := []struct {
		name   string
		pem    []byte
		detail string
	}{
		{"fail/empty", nil, "no PEM certificate"},
		{"fail/leaf-in-bundle", EncodePEM(f.root.Cert, f.iss.Cert, leaf), "not a CA certificate"},
		{"fail/no-root", EncodePEM(f.iss.Cert), "no root CA"},
		{"fail/no-issuing", EncodePEM(f.root.Cert), "no issuing CA"},
		{"fail/foreign-issuing", EncodePEM(f.root.Cert, other.iss.Cert), "not signed by any root"},
		{"fail/two-domains", EncodePEM(f.root.Cert, other.root.Cert, f.iss.Cert, other.iss.Cert), "different trust domains"},
		{"fail/key-block", []byte("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"), "PRIVATE KEY"},
		{"fail/too-large", make([]byte, MaxBundleBytes+1), "the limit is"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			if b, err := ParseBundle(c.pem); err == nil || !strings.Contains(err.Error(), c.detail) {
				t.Fatalf("ParseBundle = %v, %v; want error containing %q", b, err, c.detail)
			}
		})
	}
	b, err := ParseBundle(f.bundle.PEM())
	if err != nil || b.TrustDomain() != td || len(b.Roots()) != 1 || len(b.Issuing()) != 1 {
		t.Fatalf("PEM round trip: %v", err)
	}
}

// TestExpiredRoot: a bundle from elsewhere may hold an issuing CA that
// outlives its root; once the root expires, its leaves are refused even
// though the issuing CA itself is still valid.
func TestExpiredRoot(t *testing.T) {
	t.Parallel()
	root, err := authority.NewRoot(authority.CAOptions{TrustDomain: td, Validity: 2 * time.Hour, Now: func() time.Time { return now }})
	if err != nil {
		t.Fatal(err)
	}
	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	der, err := x509.CreateCertificate(rand.Reader, &x509.Certificate{
		SerialNumber: big.NewInt(9), Subject: pkix.Name{CommonName: "long-lived issuing"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(100 * time.Hour),
		KeyUsage: x509.KeyUsageCertSign, BasicConstraintsValid: true, IsCA: true, MaxPathLenZero: true,
		PermittedURIDomains: []string{td},
	}, root.Cert, k.Public(), root.Signer)
	if err != nil {
		t.Fatal(err)
	}
	issCert, _ := x509.ParseCertificate(der)
	iss, err := authority.NewCA(issCert, k)
	if err != nil {
		t.Fatal(err)
	}
	b, err := NewBundle([]*x509.Certificate{root.Cert}, []*x509.Certificate{issCert})
	if err != nil {
		t.Fatal(err)
	}
	f := &fleet{root: root, iss: iss, bundle: b, issuer: &authority.Issuer{CA: iss, Policy: authority.Policy{TrustDomain: td}, Now: func() time.Time { return now }}}
	leaf := f.leaf(t, identity.RoleDevice, "d", nil)
	if _, err := b.Verify([]*x509.Certificate{leaf}, VerifyOptions{Now: now}); err != nil {
		t.Fatalf("before the root expires: %v", err)
	}
	_, err = b.Verify([]*x509.Certificate{leaf}, VerifyOptions{Now: now.Add(3 * time.Hour)})
	if ReasonOf(err) != ReasonExpired || !strings.Contains(err.Error(), "root CA") {
		t.Fatalf("after the root expired: %v", err)
	}
}
