package sessionkey

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"fmt"
	"math/big"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"
)

// A small fleet PKI for the handshake tests: one CA, and leaves that
// carry spiffe://fleet.test/<role>/<name>, as the fleet's profile does.
// The verifiers below do what certs/trust does for fkx1 (chain to the CA,
// role, name), so the state machines are tested without the certs module.

const testDomain = "fleet.test"

type testPKI struct {
	ca    *x509.Certificate
	caKey crypto.Signer
	pool  *x509.CertPool
}

var (
	pkiOnce sync.Once
	pkiVal  *testPKI
)

func fleetPKI(t testing.TB) *testPKI {
	pkiOnce.Do(func() { pkiVal = newTestPKI() })
	return pkiVal
}

// newTestPKI makes a fresh CA.
func newTestPKI() *testPKI {
	{
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			panic(err)
		}
		tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test fleet CA"},
			NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
			IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
		if err != nil {
			panic(err)
		}
		ca, _ := x509.ParseCertificate(der)
		pool := x509.NewCertPool()
		pool.AddCert(ca)
		return &testPKI{ca: ca, caKey: key, pool: pool}
	}
}

var serial = struct {
	sync.Mutex
	n int64
}{n: 100}

// leaf issues role/name with a fresh P-256 key.
func (p *testPKI) leaf(t testing.TB, role, name string) Identity {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	u, _ := url.Parse(fmt.Sprintf("spiffe://%s/%s/%s", testDomain, role, name))
	serial.Lock()
	serial.n++
	sn := serial.n
	serial.Unlock()
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(sn), Subject: pkix.Name{CommonName: name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		URIs: []*url.URL{u}, KeyUsage: x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth, x509.ExtKeyUsageServerAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, p.ca, key.Public(), p.caKey)
	if err != nil {
		t.Fatal(err)
	}
	return Identity{Signer: key, Chain: [][]byte{der}}
}

// verify checks chain against the CA and returns role and name.
func (p *testPKI) verify(chain []*x509.Certificate) (role, name string, err error) {
	inter := x509.NewCertPool()
	for _, c := range chain[1:] {
		inter.AddCert(c)
	}
	if _, err := chain[0].Verify(x509.VerifyOptions{Roots: p.pool, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		return "", "", err
	}
	u := chain[0].URIs[0]
	parts := strings.Split(strings.TrimPrefix(u.Path, "/"), "/")
	if u.Scheme != "spiffe" || u.Host != testDomain || len(parts) != 2 {
		return "", "", fmt.Errorf("not a fleet identity: %s", u)
	}
	return parts[0], parts[1], nil
}

func (p *testPKI) gatewayVerifier() PeerVerifier {
	return func(chain []*x509.Certificate) error {
		role, _, err := p.verify(chain)
		if err == nil && role != "gateway" {
			err = fmt.Errorf("role %q, want gateway", role)
		}
		return err
	}
}

func (p *testPKI) deviceVerifier() func(string, []*x509.Certificate) error {
	return func(id string, chain []*x509.Certificate) error {
		role, name, err := p.verify(chain)
		if err == nil && (role != "device" || name != id) {
			err = fmt.Errorf("identity %s/%s on the topic of %s", role, name, id)
		}
		return err
	}
}

// clock is a test clock.
type clock struct {
	mu  sync.Mutex
	now time.Time
}

func newClock() *clock { return &clock{now: time.Date(2026, 11, 27, 12, 0, 0, 0, time.UTC)} }

func (c *clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *clock) Advance(d time.Duration) {
	c.mu.Lock()
	c.now = c.now.Add(d)
	c.mu.Unlock()
}
