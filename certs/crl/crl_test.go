package crl

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"math/big"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"fleetkey.dev/certs/authority"
	"fleetkey.dev/certs/identity"
	"fleetkey.dev/certs/trust"
)

var now = time.Date(2026, 11, 26, 12, 0, 0, 0, time.UTC)

func hierarchy(t *testing.T) (*authority.CA, *authority.CA) {
	t.Helper()
	opts := authority.CAOptions{TrustDomain: "fleet.test", Now: func() time.Time { return now }}
	root, err := authority.NewRoot(opts)
	if err != nil {
		t.Fatal(err)
	}
	iss, err := authority.NewIssuing(root, opts)
	if err != nil {
		t.Fatal(err)
	}
	return root, iss
}

func leaf(t *testing.T, iss *authority.CA, name string) *x509.Certificate {
	t.Helper()
	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	c, err := (&authority.Issuer{CA: iss, Policy: authority.Policy{TrustDomain: "fleet.test"}, Now: func() time.Time { return now }}).Issue(
		&authority.Request{Role: identity.RoleDevice, Name: name, PublicKey: k.Public()})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func TestBuildParse(t *testing.T) {
	t.Parallel()
	root, iss := hierarchy(t)
	revoked, kept := leaf(t, iss, "bad"), leaf(t, iss, "good")
	der, err := Build(iss, []Entry{{Serial: revoked.SerialNumber, RevokedAt: now, Reason: Reasons["keyCompromise"]}}, big.NewInt(7), now, now.Add(DefaultLifetime))
	if err != nil {
		t.Fatal(err)
	}
	l, err := Parse(EncodePEM(der), []*x509.Certificate{iss.Cert}, now.Add(time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	if !l.Revokes(revoked) || l.Revokes(kept) {
		t.Fatalf("Revokes: revoked=%v kept=%v", l.Revokes(revoked), l.Revokes(kept))
	}
	if l.Number.Int64() != 7 || l.RevokedCertificateEntries[0].ReasonCode != 1 {
		t.Fatalf("number %v, reason %d", l.Number, l.RevokedCertificateEntries[0].ReasonCode)
	}
	// A leaf of another issuing CA with the same serial is not revoked.
	other, err := authority.NewIssuing(root, authority.CAOptions{TrustDomain: "fleet.test", Now: func() time.Time { return now.Add(time.Second) }})
	if err != nil {
		t.Fatal(err)
	}
	twin := *revoked
	twin.RawIssuer = other.Cert.RawSubject
	if l.Revokes(&twin) {
		t.Fatal("a serial revoked by one CA revokes another CA's certificate")
	}

	if _, err := exec.LookPath("openssl"); err != nil {
		t.Skip("openssl not installed; .ci/run installs it")
	}
	dir := t.TempDir()
	crlPath, caPath := filepath.Join(dir, "crl.pem"), filepath.Join(dir, "issuing.crt")
	if err := os.WriteFile(crlPath, EncodePEM(der), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(caPath, trust.EncodePEM(iss.Cert), 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command("openssl", "crl", "-in", crlPath, "-CAfile", caPath, "-noout", "-text").CombinedOutput()
	if err != nil || !strings.Contains(string(out), "verify OK") {
		t.Fatalf("openssl crl: %v\n%s", err, out)
	}
	if !strings.Contains(strings.ToUpper(string(out)), strings.ToUpper(revoked.SerialNumber.Text(16))) {
		t.Fatalf("openssl does not list the revoked serial:\n%s", out)
	}
	// openssl refuses the CRL against the wrong CA.
	if err := os.WriteFile(caPath, trust.EncodePEM(other.Cert), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("openssl", "crl", "-in", crlPath, "-CAfile", caPath, "-noout").CombinedOutput(); err == nil && strings.Contains(string(out), "verify OK") {
		t.Fatalf("openssl verified the CRL against another CA:\n%s", out)
	}
}

func TestRefusals(t *testing.T) {
	t.Parallel()
	_, iss := hierarchy(t)
	_, stranger := hierarchy(t)
	good, err := Build(iss, nil, big.NewInt(1), now, now.Add(time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	tampered := append([]byte(nil), good...)
	tampered[len(tampered)-5] ^= 1
	cases := []struct {
		name    string
		data    []byte
		issuers []*x509.Certificate
		at      time.Time
		detail  string
	}{
		{"fail/other-issuer", good, []*x509.Certificate{stranger.Cert}, now, "not signed by a trusted issuing CA"},
		{"fail/tampered", tampered, []*x509.Certificate{iss.Cert}, now, "not signed by a trusted issuing CA"},
		{"fail/stale", good, []*x509.Certificate{iss.Cert}, now.Add(2 * time.Hour), "stale"},
		{"fail/not-yet-valid", good, []*x509.Certificate{iss.Cert}, now.Add(-time.Hour), "not valid before"},
		{"fail/garbage", []byte("nope"), []*x509.Certificate{iss.Cert}, now, "parsing CRL"},
		{"fail/wrong-pem", []byte("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"), nil, now, "X509 CRL was expected"},
		{"fail/too-large", make([]byte, MaxBytes+1), nil, now, "the limit is"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			if l, err := Parse(c.data, c.issuers, c.at); err == nil || !strings.Contains(err.Error(), c.detail) {
				t.Fatalf("Parse = %v, %v; want error containing %q", l, err, c.detail)
			}
		})
	}
	if _, err := Build(iss, []Entry{{Serial: big.NewInt(0)}}, big.NewInt(1), now, now.Add(time.Hour)); err == nil {
		t.Error("Build accepted serial 0")
	}
	if _, err := Build(iss, nil, big.NewInt(1), now, now); err == nil {
		t.Error("Build accepted nextUpdate == thisUpdate")
	}
	if _, err := Build(iss, nil, nil, now, now.Add(time.Hour)); err == nil {
		t.Error("Build accepted a nil CRL number")
	}
	if ReasonName(1) != "keyCompromise" || ReasonName(42) != "reason(42)" {
		t.Error("ReasonName")
	}
}
