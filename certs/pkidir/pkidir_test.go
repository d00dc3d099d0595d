package pkidir

import (
	"crypto/x509"
	"errors"
	"io/fs"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"fleetkey.dev/certs/authority"
	"fleetkey.dev/certs/crl"
	"fleetkey.dev/certs/identity"
	"fleetkey.dev/certs/trust"
)

var testPass = &Passphrase{Secret: []byte("a passphrase for tests"), Source: "test"}

var fast = Options{KDFIterations: 1000}

func initPKI(t *testing.T) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "pki")
	if _, err := Init(dir, InitOptions{TrustDomain: "fleet.test", Passphrase: testPass, Options: fast}); err != nil {
		t.Fatal(err)
	}
	return dir
}

func readLeaf(t *testing.T, path string) []*x509.Certificate {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	certs, err := trust.ParseCertificatesPEM(b)
	if err != nil {
		t.Fatal(err)
	}
	return certs
}

func TestInit(t *testing.T) {
	t.Parallel()
	dir := filepath.Join(t.TempDir(), "pki")
	res, err := Init(dir, InitOptions{TrustDomain: "fleet.test", Passphrase: testPass, GatewayDNS: []string{"gw.fleet.test"}, Options: fast})
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Files) != 11 || res.PassphraseFile != "" {
		t.Fatalf("files = %v, passphrase file %q", res.Files, res.PassphraseFile)
	}
	bundle, err := LoadBundle(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, role := range []identity.Role{identity.RoleGateway, identity.RoleAdmin, identity.RoleService} {
		chain := readLeaf(t, filepath.Join(dir, string(role)+".crt"))
		if len(chain) != 2 || !chain[1].IsCA {
			t.Fatalf("%s.crt does not hold leaf then issuing CA", role)
		}
		usage := x509.ExtKeyUsageClientAuth
		if role == identity.RoleGateway {
			usage = x509.ExtKeyUsageServerAuth
		}
		p, err := bundle.Verify(chain, trust.VerifyOptions{Usage: usage})
		if err != nil {
			t.Fatalf("%s: %v", role, err)
		}
		if p.ID.Role != role || p.ID.Name != string(role) {
			t.Fatalf("%s.crt is %s", role, p.ID)
		}
		fi, _ := os.Stat(filepath.Join(dir, string(role)+".key"))
		if fi.Mode().Perm() != 0o600 {
			t.Fatalf("%s.key has mode %v", role, fi.Mode().Perm())
		}
	}
	if _, err := LoadIssuing(dir, testPass); err != nil {
		t.Fatal(err)
	}
	if _, err := LoadRoot(dir, &Passphrase{Secret: []byte("wrong passphrase"), Source: "x"}); err == nil || !strings.Contains(err.Error(), "wrong passphrase") {
		t.Fatalf("LoadRoot with a wrong passphrase: %v", err)
	}
}

func TestInitRefusesExistingBeforeWriting(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "admin.key"), []byte("precious"), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err := Init(dir, InitOptions{TrustDomain: "fleet.test", Passphrase: testPass, Options: fast})
	if !errors.Is(err, fs.ErrExist) || !strings.Contains(err.Error(), "--force") {
		t.Fatalf("Init over an existing file: %v", err)
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 1 {
		t.Fatalf("Init wrote files before refusing: %v", entries)
	}
	for _, c := range []struct {
		name   string
		opts   InitOptions
		detail string
	}{
		{"fail/trust-domain", InitOptions{TrustDomain: "Fleet"}, "--trust-domain"},
		{"fail/gateway-name", InitOptions{TrustDomain: "fleet.test", GatewayName: "gw/1"}, "gateway name"},
		{"fail/short-passphrase", InitOptions{TrustDomain: "fleet.test", Passphrase: &Passphrase{Secret: []byte("short"), Source: "flag"}}, "shorter than 8"},
		{"fail/bad-dns", InitOptions{TrustDomain: "fleet.test", Passphrase: testPass, GatewayDNS: []string{"bad name"}, Options: fast}, "DNS name"},
	} {
		t.Run(c.name, func(t *testing.T) {
			if _, err := Init(filepath.Join(t.TempDir(), "pki"), c.opts); err == nil || !strings.Contains(err.Error(), c.detail) {
				t.Fatalf("Init = %v, want %q", err, c.detail)
			}
		})
	}
}

func TestInitGeneratesPassphrase(t *testing.T) {
	t.Parallel()
	dir := filepath.Join(t.TempDir(), "pki")
	res, err := Init(dir, InitOptions{TrustDomain: "fleet.test", Options: fast})
	if err != nil {
		t.Fatal(err)
	}
	if res.PassphraseFile == "" {
		t.Fatal("no passphrase file reported")
	}
	p, err := readPassphrase(filepath.Join(dir, PassphraseFile), "ca.pass")
	if err != nil {
		t.Fatal(err)
	}
	if len(p.Secret) < 32 {
		t.Fatalf("generated passphrase is only %d characters", len(p.Secret))
	}
	if _, err := LoadIssuing(dir, p); err != nil {
		t.Fatal(err)
	}
}

// TestResolvePassphrase changes the environment, so it does not run in
// parallel.
func TestResolvePassphrase(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "p.txt")
	if err := os.WriteFile(file, []byte("from a file\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv(EnvPassphrase, "")
	t.Setenv(EnvPassphraseFile, "")
	if _, err := ResolvePassphrase(dir, ""); !errors.Is(err, ErrNoPassphrase) {
		t.Fatalf("no source: %v", err)
	}
	if err := os.WriteFile(filepath.Join(dir, PassphraseFile), []byte("beside the keys\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	check := func(flag, want string) {
		t.Helper()
		p, err := ResolvePassphrase(dir, flag)
		if err != nil || string(p.Secret) != want {
			t.Fatalf("ResolvePassphrase(%q) = %v, %v; want %q", flag, p, err, want)
		}
	}
	check("", "beside the keys")
	t.Setenv(EnvPassphraseFile, file)
	check("", "from a file")
	t.Setenv(EnvPassphrase, "from the environment")
	check("", "from the environment")
	check(file, "from a file")
	empty := filepath.Join(dir, "empty")
	if err := os.WriteFile(empty, []byte("\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := ResolvePassphrase(dir, empty); err == nil || !strings.Contains(err.Error(), "is empty") {
		t.Fatalf("empty passphrase file: %v", err)
	}
	if _, err := ResolvePassphrase(dir, filepath.Join(dir, "missing")); err == nil {
		t.Fatal("missing passphrase file accepted")
	}
}

func TestRotate(t *testing.T) {
	t.Parallel()
	dir := initPKI(t)
	oldIssuing := readLeaf(t, filepath.Join(dir, IssuingCert))[0]
	oldLeaf := readLeaf(t, filepath.Join(dir, "gateway.crt"))
	res, err := Rotate(dir, testPass, Options{KDFIterations: 1000, Now: func() time.Time { return time.Now().Add(time.Second) }})
	if err != nil {
		t.Fatal(err)
	}
	if res.Issuing.Equal(oldIssuing) {
		t.Fatal("issuing CA did not change")
	}
	bundle, err := LoadBundle(dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(bundle.Issuing()) != 2 {
		t.Fatalf("bundle has %d issuing CAs, want old and new", len(bundle.Issuing()))
	}
	next, err := LoadIssuing(dir, testPass)
	if err != nil {
		t.Fatal(err)
	}
	newLeaf, _, err := IssueLeaf(&authority.Issuer{CA: next, Policy: authority.Policy{TrustDomain: "fleet.test"}},
		authority.Request{Role: identity.RoleService, Name: "after"}, filepath.Join(dir, "after"), false)
	if err != nil {
		t.Fatal(err)
	}
	for _, chain := range [][]*x509.Certificate{oldLeaf[:1], {newLeaf}} {
		if _, err := bundle.Verify(chain, trust.VerifyOptions{}); err != nil {
			t.Fatalf("%s does not verify after rotation: %v", chain[0].Subject.CommonName, err)
		}
	}
	retired, err := LoadRetired(dir, testPass)
	if err != nil || len(retired) != 1 || !retired[0].Cert.Equal(oldIssuing) {
		t.Fatalf("retired = %v, %v", retired, err)
	}
	// A second rotation keeps both earlier issuing CAs.
	if _, err := Rotate(dir, testPass, Options{KDFIterations: 1000, Now: func() time.Time { return time.Now().Add(2 * time.Second) }}); err != nil {
		t.Fatal(err)
	}
	if b, _ := LoadBundle(dir); len(b.Issuing()) != 3 {
		t.Fatalf("after two rotations the bundle has %d issuing CAs", len(b.Issuing()))
	}
}

func TestRevokeAndCRLs(t *testing.T) {
	t.Parallel()
	dir := initPKI(t)
	leaf := readLeaf(t, filepath.Join(dir, "service.crt"))[0]
	now := time.Now()
	n, err := Revoke(dir, []*big.Int{leaf.SerialNumber, leaf.SerialNumber}, "keyCompromise", now)
	if err != nil || n != 1 {
		t.Fatalf("Revoke = %d, %v", n, err)
	}
	if n, err := Revoke(dir, []*big.Int{leaf.SerialNumber}, "superseded", now); err != nil || n != 0 {
		t.Fatalf("second Revoke = %d, %v", n, err)
	}
	if _, err := Revoke(dir, []*big.Int{big.NewInt(5)}, "becauseISaidSo", now); err == nil || !strings.Contains(err.Error(), "unknown revocation reason") {
		t.Fatalf("bad reason: %v", err)
	}
	if _, err := Rotate(dir, testPass, Options{KDFIterations: 1000, Now: func() time.Time { return now.Add(time.Second) }}); err != nil {
		t.Fatal(err)
	}
	res, err := WriteCRLs(dir, testPass, time.Hour, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Files) != 2 {
		t.Fatalf("CRL files = %v; want current and retired", res.Files)
	}
	bundle, _ := LoadBundle(dir)
	oldCRL, err := os.ReadFile(filepath.Join(dir, res.Files[1]))
	if err != nil {
		t.Fatal(err)
	}
	list, err := crl.Parse(oldCRL, bundle.Issuing(), time.Now())
	if err != nil {
		t.Fatal(err)
	}
	if !list.Revokes(leaf) {
		t.Fatal("the retired CA's CRL does not revoke its leaf")
	}
	if list.Number.Int64() != 1 {
		t.Fatalf("CRL number %v", list.Number)
	}
	if _, err := WriteCRLs(dir, testPass, time.Hour, Options{}); err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(filepath.Join(dir, CRLNumberFile))
	if strings.TrimSpace(string(b)) != "2" {
		t.Fatalf("crlnumber = %q after two runs", b)
	}
}

func TestRevocationStateRefusals(t *testing.T) {
	t.Parallel()
	for _, c := range []struct {
		name, file, content, detail string
	}{
		{"fail/revoked-fields", RevokedFile, "abc keyCompromise\n", "want \"<serial> <reason> <time>\""},
		{"fail/revoked-serial", RevokedFile, "xyz keyCompromise 2026-01-01T00:00:00Z\n", "not a positive hexadecimal"},
		{"fail/revoked-reason", RevokedFile, "ab whatever 2026-01-01T00:00:00Z\n", "unknown reason"},
		{"fail/revoked-time", RevokedFile, "ab keyCompromise yesterday\n", "cannot parse"},
		{"fail/crlnumber", CRLNumberFile, "seven\n", "not a CRL number"},
	} {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			dir := initPKI(t)
			if err := os.WriteFile(filepath.Join(dir, c.file), []byte(c.content), 0o644); err != nil {
				t.Fatal(err)
			}
			_, err := WriteCRLs(dir, testPass, time.Hour, Options{})
			if err == nil || !strings.Contains(err.Error(), c.detail) {
				t.Fatalf("WriteCRLs = %v, want %q", err, c.detail)
			}
			if _, err := os.Stat(filepath.Join(dir, CRLFile)); err == nil {
				t.Fatal("a CRL was written from bad state")
			}
		})
	}
	for _, s := range []string{"", "0", "-1", "0x", strings.Repeat("f", 41), "g1"} {
		if _, err := ParseSerial(s); err == nil {
			t.Errorf("ParseSerial(%q) succeeded", s)
		}
	}
	if n, err := ParseSerial("0x0A:bc"); err != nil || n.Int64() != 0xabc {
		t.Errorf("ParseSerial with colons: %v, %v", n, err)
	}
}
