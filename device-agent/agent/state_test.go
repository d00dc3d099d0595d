package agent

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"fleetkey.dev/certs/authority"
	"fleetkey.dev/certs/identity"
	"fleetkey.dev/certs/keyfile"
	"fleetkey.dev/certs/pkidir"
)

func testState(t *testing.T) (*State, *authority.Issuer) {
	t.Helper()
	pki := filepath.Join(t.TempDir(), "pki")
	pass := &pkidir.Passphrase{Secret: []byte("agent state test passphrase"), Source: "test"}
	if _, err := pkidir.Init(pki, pkidir.InitOptions{TrustDomain: "fleet.test", Passphrase: pass, Options: pkidir.Options{KDFIterations: 1000}}); err != nil {
		t.Fatal(err)
	}
	ca, err := pkidir.LoadIssuing(pki, pass)
	if err != nil {
		t.Fatal(err)
	}
	bundle, _ := os.ReadFile(filepath.Join(pki, "bundle.pem"))
	st := &State{Dir: filepath.Join(t.TempDir(), "state")}
	os.MkdirAll(st.Dir, 0o700)
	os.WriteFile(st.path(BundleFile), bundle, 0o644)
	return st, &authority.Issuer{CA: ca, Policy: authority.Policy{TrustDomain: "fleet.test"}}
}

func issue(t *testing.T, iss *authority.Issuer) (*ecdsa.PrivateKey, *x509.Certificate) {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	c, err := iss.Issue(&authority.Request{Role: identity.RoleDevice, Name: "dev-1", PublicKey: key.Public()})
	if err != nil {
		t.Fatal(err)
	}
	return key, c
}

func TestRenewalCrashRecovery(t *testing.T) {
	st, iss := testState(t)
	k1, c1 := issue(t, iss)
	if err := st.storeCredentials(k1, c1, false); err != nil {
		t.Fatal(err)
	}
	// A first enrollment never overwrites.
	if err := st.storeCredentials(k1, c1, false); err == nil {
		t.Fatal("stored over an existing key")
	}
	// A renewal interrupted after the certificate moved into place: the
	// .next key matches it, and loading finishes the move.
	k2, c2 := issue(t, iss)
	if err := st.storeCredentials(k2, c2, true); err != nil {
		t.Fatal(err)
	}
	creds, err := st.LoadCredentials()
	if err != nil || !creds.Leaf.Equal(c2) {
		t.Fatalf("after renewal: %v", err)
	}
	k3, c3 := issue(t, iss)
	keyPEM, _ := marshalForTest(k3)
	os.WriteFile(st.path(KeyFile+nextSuffix), keyPEM, 0o600)
	os.WriteFile(st.path(CertFile), pemCert(c3), 0o644) // the crash: cert moved, key not yet
	if creds, err = st.LoadCredentials(); err != nil || !creds.Leaf.Equal(c3) {
		t.Fatalf("recovering a half-done renewal: %v", err)
	}
	// A stray .next key that matches nothing is removed, and the pair in
	// place stays.
	k4, _ := issue(t, iss)
	keyPEM, _ = marshalForTest(k4)
	os.WriteFile(st.path(KeyFile+nextSuffix), keyPEM, 0o600)
	if creds, err = st.LoadCredentials(); err != nil || !creds.Leaf.Equal(c3) {
		t.Fatalf("with a stray key: %v", err)
	}
	if _, err := os.Stat(st.path(KeyFile + nextSuffix)); err == nil {
		t.Fatal("stray .next key kept")
	}
	// A certificate that does not match the key is refused, clearly.
	os.WriteFile(st.path(CertFile), pemCert(c1), 0o644)
	if _, err := st.LoadCredentials(); err == nil || !strings.Contains(err.Error(), "does not match") {
		t.Fatalf("mismatched pair: %v", err)
	}
}

func TestMetaRefusals(t *testing.T) {
	st := &State{Dir: t.TempDir()}
	if _, err := st.ReadMeta(); err == nil || !strings.Contains(err.Error(), "device-agent enroll") {
		t.Fatalf("empty dir: %v", err)
	}
	os.WriteFile(st.path(MetaFile), []byte(`{"id":"../../etc"}`), 0o600)
	if _, err := st.ReadMeta(); err == nil {
		t.Fatal("accepted a bad id")
	}
}

func marshalForTest(k *ecdsa.PrivateKey) ([]byte, error) { return keyfile.MarshalPrivateKey(k) }

func pemCert(c *x509.Certificate) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})
}

func TestRenewTime(t *testing.T) {
	start := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	leaf := &x509.Certificate{NotBefore: start, NotAfter: start.Add(90 * 24 * time.Hour)}
	lo, hi := start.Add(60*24*time.Hour), start.Add(60*24*time.Hour+108*time.Hour)
	seen := map[time.Time]bool{}
	for i := 0; i < 100; i++ {
		at := renewTime(leaf, 2.0/3, 0.05)
		if at.Before(lo) || at.After(hi) {
			t.Fatalf("renewal at %s; want within [%s, %s]", at, lo, hi)
		}
		seen[at] = true
	}
	if len(seen) < 50 {
		t.Fatalf("only %d distinct renewal times in 100: no jitter", len(seen))
	}
}
