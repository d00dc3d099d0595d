package authority

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"fleetkey.dev/certs/identity"
)

const td = "fleet.test"

var testNow = time.Date(2026, 11, 26, 12, 0, 0, 0, time.UTC)

var (
	hierOnce sync.Once
	hierRoot *CA
	hierIss  *CA
)

// testCAs returns one root and issuing CA shared by the tests (they are
// read-only), made at testNow.
func testCAs(t testing.TB) (*CA, *CA) {
	t.Helper()
	hierOnce.Do(func() {
		opts := CAOptions{TrustDomain: td, Now: func() time.Time { return testNow }}
		var err error
		if hierRoot, err = NewRoot(opts); err != nil {
			panic(err)
		}
		if hierIss, err = NewIssuing(hierRoot, opts); err != nil {
			panic(err)
		}
	})
	return hierRoot, hierIss
}

func testIssuer(t testing.TB, p Policy) *Issuer {
	t.Helper()
	_, iss := testCAs(t)
	if p.TrustDomain == "" {
		p.TrustDomain = td
	}
	is, err := NewIssuer(iss, p)
	if err != nil {
		t.Fatal(err)
	}
	is.Now = func() time.Time { return testNow }
	return is
}

func p256(t testing.TB) *ecdsa.PrivateKey {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func makeCSR(t testing.TB, key crypto.Signer, tmpl *x509.CertificateRequest) []byte {
	t.Helper()
	der, err := x509.CreateCertificateRequest(rand.Reader, tmpl, key)
	if err != nil {
		t.Fatal(err)
	}
	return der
}

func ext(t testing.TB, oid asn1.ObjectIdentifier, v any) pkix.Extension {
	t.Helper()
	b, err := asn1.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return pkix.Extension{Id: oid, Value: b}
}

func TestHierarchy(t *testing.T) {
	t.Parallel()
	root, iss := testCAs(t)
	if root.Cert.PublicKeyAlgorithm != x509.ECDSA || root.Cert.PublicKey.(*ecdsa.PublicKey).Curve != elliptic.P384() {
		t.Errorf("root key is not P-384")
	}
	if iss.Cert.PublicKey.(*ecdsa.PublicKey).Curve != elliptic.P256() {
		t.Errorf("issuing key is not P-256")
	}
	if !iss.Cert.MaxPathLenZero || iss.Cert.MaxPathLen != 0 {
		t.Errorf("issuing CA may sign sub-CAs")
	}
	if len(iss.Cert.PermittedURIDomains) != 1 || iss.Cert.PermittedURIDomains[0] != td {
		t.Errorf("issuing CA URI constraint = %v", iss.Cert.PermittedURIDomains)
	}
	if err := iss.Cert.CheckSignatureFrom(root.Cert); err != nil {
		t.Errorf("issuing CA not signed by root: %v", err)
	}
	for _, c := range []*x509.Certificate{root.Cert, iss.Cert} {
		if n := len(c.SerialNumber.Bytes()); n > 16 || c.SerialNumber.Sign() <= 0 {
			t.Errorf("serial %x: %d bytes", c.SerialNumber, n)
		}
	}
	if _, err := NewCA(iss.Cert, root.Signer); err == nil || !strings.Contains(err.Error(), "does not match") {
		t.Errorf("NewCA with the wrong key: %v", err)
	}
	if _, err := NewRoot(CAOptions{TrustDomain: "Bad Domain"}); err == nil {
		t.Errorf("NewRoot accepted a bad trust domain")
	}
	expired := CAOptions{TrustDomain: td, Now: func() time.Time { return root.Cert.NotAfter.Add(time.Hour) }}
	if _, err := NewIssuing(root, expired); err == nil || !strings.Contains(err.Error(), "root CA expired") {
		t.Errorf("NewIssuing under an expired root: %v", err)
	}
}

func TestSerial(t *testing.T) {
	t.Parallel()
	seen := map[string]bool{}
	for i := 0; i < 2000; i++ {
		s, err := NewSerial(rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		if s.Sign() <= 0 || len(s.Bytes()) > 16 {
			t.Fatalf("serial %x is not positive or longer than 16 bytes", s)
		}
		// DER adds a 0x00 byte before a high bit; 127 bits never need it.
		der, _ := asn1.Marshal(s)
		if len(der)-2 > 16 {
			t.Fatalf("serial %x encodes in %d bytes", s, len(der)-2)
		}
		if seen[s.String()] {
			t.Fatalf("serial repeated")
		}
		seen[s.String()] = true
	}
	if _, err := NewSerial(strings.NewReader("short")); err == nil {
		t.Fatal("NewSerial with a failing reader succeeded")
	}
}

func TestIssueDeviceFromCSR(t *testing.T) {
	t.Parallel()
	is := testIssuer(t, Policy{})
	key := p256(t)
	csr := makeCSR(t, key, &x509.CertificateRequest{Subject: pkix.Name{CommonName: "sensor-0001", Organization: []string{"ignored"}}})
	cert, err := is.IssueCSR(csr, identity.RoleDevice, "")
	if err != nil {
		t.Fatal(err)
	}
	if cert.Subject.CommonName != "sensor-0001" || len(cert.Subject.Organization) != 0 {
		t.Errorf("subject = %v; want CN only", cert.Subject)
	}
	if len(cert.URIs) != 1 || cert.URIs[0].String() != "spiffe://fleet.test/device/sensor-0001" {
		t.Errorf("URIs = %v", cert.URIs)
	}
	if cert.IsCA || !cert.BasicConstraintsValid {
		t.Errorf("leaf is not CA:false")
	}
	if cert.KeyUsage != x509.KeyUsageDigitalSignature {
		t.Errorf("KeyUsage = %v", cert.KeyUsage)
	}
	if len(cert.ExtKeyUsage) != 1 || cert.ExtKeyUsage[0] != x509.ExtKeyUsageClientAuth {
		t.Errorf("ExtKeyUsage = %v", cert.ExtKeyUsage)
	}
	if got, want := cert.NotAfter.Sub(testNow), 90*24*time.Hour; got != want {
		t.Errorf("validity = %v, want %v", got, want)
	}
	if !cert.NotBefore.Equal(testNow.Add(-Backdate)) {
		t.Errorf("NotBefore = %v", cert.NotBefore)
	}
	if !key.PublicKey.Equal(cert.PublicKey) {
		t.Errorf("certificate does not carry the CSR's key")
	}
	if len(cert.SerialNumber.Bytes()) > 16 {
		t.Errorf("serial too long")
	}
	if _, bound, _ := TPMBinding(cert); bound {
		t.Errorf("plain enrollment produced a TPM-bound certificate")
	}
	pool := x509.NewCertPool()
	root, iss := testCAs(t)
	pool.AddCert(root.Cert)
	inter := x509.NewCertPool()
	inter.AddCert(iss.Cert)
	if _, err := cert.Verify(x509.VerifyOptions{Roots: pool, Intermediates: inter, CurrentTime: testNow, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		t.Errorf("leaf does not verify: %v", err)
	}
}

func TestIssueAcceptedCSRs(t *testing.T) {
	t.Parallel()
	is := testIssuer(t, Policy{})
	ed, edKey, _ := ed25519.GenerateKey(rand.Reader)
	_ = ed
	p384, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	u, _ := url.Parse("spiffe://fleet.test/device/dev-7")
	cases := []struct {
		name string
		key  crypto.Signer
		tmpl *x509.CertificateRequest
		want string
	}{
		{"ok/ed25519", edKey, &x509.CertificateRequest{Subject: pkix.Name{CommonName: "dev-1"}}, "dev-1"},
		{"ok/p384", p384, &x509.CertificateRequest{Subject: pkix.Name{CommonName: "dev-2"}}, "dev-2"},
		{"ok/uri-san-only", p256(t), &x509.CertificateRequest{URIs: []*url.URL{u}}, "dev-7"},
		{"ok/cn-and-matching-uri", p256(t), &x509.CertificateRequest{Subject: pkix.Name{CommonName: "dev-7"}, URIs: []*url.URL{u}}, "dev-7"},
		{"ok/granted-eku-and-ku", p256(t), &x509.CertificateRequest{Subject: pkix.Name{CommonName: "dev-3"}, ExtraExtensions: []pkix.Extension{
			ext(t, oidExtExtKeyUsage, []asn1.ObjectIdentifier{{1, 3, 6, 1, 5, 5, 7, 3, 2}}),
			ext(t, oidExtKeyUsage, asn1.BitString{Bytes: []byte{0x80}, BitLength: 1}),
			ext(t, oidExtBasicConstraints, struct{}{}),
		}}, "dev-3"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			cert, err := is.IssueCSR(makeCSR(t, c.key, c.tmpl), identity.RoleDevice, "")
			if err != nil {
				t.Fatal(err)
			}
			if cert.Subject.CommonName != c.want {
				t.Errorf("CN = %q, want %q", cert.Subject.CommonName, c.want)
			}
			if len(cert.ExtKeyUsage) != 1 || len(cert.URIs) != 1 || len(cert.DNSNames) != 0 {
				t.Errorf("leaf shape not from profile: %v %v %v", cert.ExtKeyUsage, cert.URIs, cert.DNSNames)
			}
		})
	}
}

// TestBadCSRs is the table of refused CSRs: each is refused, with its
// reason, and nothing is issued.
func TestBadCSRs(t *testing.T) {
	t.Parallel()
	key := p256(t)
	cn := func(s string) *x509.CertificateRequest {
		return &x509.CertificateRequest{Subject: pkix.Name{CommonName: s}}
	}
	good := makeCSR(t, key, cn("dev-1"))
	badSig := append([]byte(nil), good...)
	badSig[len(badSig)-3] ^= 0xff
	rsa1024, err := rsa.GenerateKey(rand.Reader, 1024)
	if err != nil {
		t.Fatal(err)
	}
	p521, _ := ecdsa.GenerateKey(elliptic.P521(), rand.Reader)
	_, edKey, _ := ed25519.GenerateKey(rand.Reader)
	otherTD, _ := url.Parse("spiffe://other.test/device/dev-1")
	gwURI, _ := url.Parse("spiffe://fleet.test/gateway/dev-1")
	otherName, _ := url.Parse("spiffe://fleet.test/device/dev-2")
	// A SAN with an otherName [0], which Go's parser silently drops.
	otherNameSAN := pkix.Extension{Id: oidExtSubjectAltName, Value: []byte{0x30, 0x0b, 0xa0, 0x09, 0x06, 0x03, 0x2a, 0x03, 0x04, 0xa0, 0x02, 0x0c, 0x00}}
	twoCNs := &x509.CertificateRequest{Subject: pkix.Name{ExtraNames: []pkix.AttributeTypeAndValue{{Type: oidCommonName, Value: "a"}, {Type: oidCommonName, Value: "b"}}}}

	cases := []struct {
		name   string
		der    []byte
		policy Policy
		reason Reason
		detail string
	}{
		{"fail/bad-signature", badSig, Policy{}, ReasonSignature, "signature does not verify"},
		{"fail/ca-true", makeCSR(t, key, &x509.CertificateRequest{Subject: pkix.Name{CommonName: "dev-1"}, ExtraExtensions: []pkix.Extension{
			ext(t, oidExtBasicConstraints, struct{ IsCA bool }{true})}}), Policy{}, ReasonCARequested, "CA:true"},
		{"fail/extra-dns-san", makeCSR(t, key, &x509.CertificateRequest{Subject: pkix.Name{CommonName: "dev-1"}, DNSNames: []string{"evil.example"}}), Policy{}, ReasonExtraSAN, "DNS:evil.example"},
		{"fail/extra-email-san", makeCSR(t, key, &x509.CertificateRequest{Subject: pkix.Name{CommonName: "dev-1"}, EmailAddresses: []string{"a@b.c"}}), Policy{}, ReasonExtraSAN, "email:a@b.c"},
		{"fail/two-uri-sans", makeCSR(t, key, &x509.CertificateRequest{URIs: []*url.URL{otherName, otherTD}}), Policy{}, ReasonExtraSAN, "URI:spiffe://other.test"},
		{"fail/othername-san", makeCSR(t, key, &x509.CertificateRequest{Subject: pkix.Name{CommonName: "dev-1"}, ExtraExtensions: []pkix.Extension{otherNameSAN}}), Policy{}, ReasonExtraSAN, "type [0]"},
		{"fail/uri-other-trust-domain", makeCSR(t, key, &x509.CertificateRequest{URIs: []*url.URL{otherTD}}), Policy{}, ReasonIDMismatch, "trust domain"},
		{"fail/uri-other-role", makeCSR(t, key, &x509.CertificateRequest{URIs: []*url.URL{gwURI}}), Policy{}, ReasonIDMismatch, "is not a device"},
		{"fail/cn-uri-disagree", makeCSR(t, key, &x509.CertificateRequest{Subject: pkix.Name{CommonName: "dev-1"}, URIs: []*url.URL{otherName}}), Policy{}, ReasonIDMismatch, "different identities"},
		{"fail/eku-server-auth", makeCSR(t, key, &x509.CertificateRequest{Subject: pkix.Name{CommonName: "dev-1"}, ExtraExtensions: []pkix.Extension{
			ext(t, oidExtExtKeyUsage, []asn1.ObjectIdentifier{{1, 3, 6, 1, 5, 5, 7, 3, 1}})}}), Policy{}, ReasonExtKeyUsage, "1.3.6.1.5.5.7.3.1"},
		{"fail/ku-cert-sign", makeCSR(t, key, &x509.CertificateRequest{Subject: pkix.Name{CommonName: "dev-1"}, ExtraExtensions: []pkix.Extension{
			ext(t, oidExtKeyUsage, asn1.BitString{Bytes: []byte{0x04}, BitLength: 6})}}), Policy{}, ReasonKeyUsage, "keyCertSign"},
		{"fail/slash", makeCSR(t, key, cn("a/b")), Policy{}, ReasonBadID, "MQTT topic separator"},
		{"fail/plus", makeCSR(t, key, cn("a+b")), Policy{}, ReasonBadID, "MQTT topic separator"},
		{"fail/hash", makeCSR(t, key, cn("a#b")), Policy{}, ReasonBadID, "MQTT topic separator"},
		{"fail/dollar", makeCSR(t, key, cn("$SYS")), Policy{}, ReasonBadID, "MQTT topic separator"},
		{"fail/nul", makeCSR(t, key, cn("a\x00b")), Policy{}, ReasonBadID, "NUL"},
		{"fail/empty-id", makeCSR(t, key, cn("")), Policy{}, ReasonBadID, "names no identity"},
		{"fail/65-char-id", makeCSR(t, key, cn(strings.Repeat("a", 65))), Policy{}, ReasonBadID, "65 bytes long"},
		{"fail/non-ascii", makeCSR(t, key, cn("capteur-é")), Policy{}, ReasonBadID, "non-ASCII"},
		{"fail/two-cns", makeCSR(t, key, twoCNs), Policy{}, ReasonSubject, "2 common names"},
		{"fail/rsa-1024-rsa-allowed", makeCSR(t, rsa1024, cn("dev-1")), Policy{KeyTypes: []KeyType{KeyRSA}}, ReasonKeyType, "1024 bits"},
		{"fail/rsa-not-allowed", makeCSR(t, rsa1024, cn("dev-1")), Policy{}, ReasonKeyType, "rsa is not allowed"},
		{"fail/unsupported-curve", makeCSR(t, p521, cn("dev-1")), Policy{}, ReasonKeyType, "unsupported curve P-521"},
		{"fail/ed25519-forbidden", makeCSR(t, edKey, cn("dev-1")), Policy{KeyTypes: []KeyType{KeyP256}}, ReasonKeyType, "ed25519 is not allowed"},
		{"fail/garbage", []byte("not a CSR at all"), Policy{}, ReasonMalformed, "cannot parse"},
		{"fail/trailing-bytes", append(append([]byte(nil), good...), 0), Policy{}, ReasonMalformed, "cannot parse"},
		{"fail/too-large", make([]byte, MaxCSRBytes+1), Policy{}, ReasonTooLarge, "the limit is"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			is := testIssuer(t, c.policy)
			cert, err := is.IssueCSR(c.der, identity.RoleDevice, "")
			if cert != nil {
				t.Fatalf("issued a certificate for a bad CSR")
			}
			ce, ok := IsCSRError(err)
			if !ok {
				t.Fatalf("err = %v, want *CSRError", err)
			}
			if ce.Reason != c.reason || !strings.Contains(ce.Error(), c.detail) {
				t.Fatalf("refused with %s: %q; want %s containing %q", ce.Reason, ce.Error(), c.reason, c.detail)
			}
		})
	}
}

func TestCSRNameFromCaller(t *testing.T) {
	t.Parallel()
	is := testIssuer(t, Policy{})
	key := p256(t)
	noCN := makeCSR(t, key, &x509.CertificateRequest{})
	cert, err := is.IssueCSR(noCN, identity.RoleGateway, "gw-2")
	if err != nil || cert.URIs[0].String() != "spiffe://fleet.test/gateway/gw-2" {
		t.Fatalf("IssueCSR with the caller's name: %v", err)
	}
	other := makeCSR(t, key, &x509.CertificateRequest{Subject: pkix.Name{CommonName: "dev-9"}})
	if _, err := is.IssueCSR(other, identity.RoleDevice, "dev-1"); err == nil || !strings.Contains(err.Error(), "request is for \"dev-1\"") {
		t.Fatalf("a CSR naming someone else: %v", err)
	}
}

func TestIssueProfiles(t *testing.T) {
	t.Parallel()
	is := testIssuer(t, Policy{Validity: map[identity.Role]time.Duration{identity.RoleDevice: 6 * time.Hour}})
	gw, err := is.Issue(&Request{Role: identity.RoleGateway, Name: "gw1", PublicKey: p256(t).Public(), DNSNames: []string{"localhost", "*.gw.fleet.test"}, IPAddresses: []string{"127.0.0.1", "::1"}})
	if err != nil {
		t.Fatal(err)
	}
	if len(gw.ExtKeyUsage) != 2 || len(gw.IPAddresses) != 2 || len(gw.DNSNames) != 2 {
		t.Errorf("gateway profile: eku=%v ips=%v dns=%v", gw.ExtKeyUsage, gw.IPAddresses, gw.DNSNames)
	}
	dev, err := is.Issue(&Request{Role: identity.RoleDevice, Name: "short", PublicKey: p256(t).Public()})
	if err != nil {
		t.Fatal(err)
	}
	if got := dev.NotAfter.Sub(testNow); got != 6*time.Hour {
		t.Errorf("policy validity not applied: %v", got)
	}
	refusals := []struct {
		name   string
		req    Request
		detail string
	}{
		{"fail/device-with-dns", Request{Role: identity.RoleDevice, Name: "d", DNSNames: []string{"x"}}, "carries no DNS"},
		{"fail/bad-ip", Request{Role: identity.RoleGateway, Name: "g", IPAddresses: []string{"300.1.1.1"}}, "not an IP address"},
		{"fail/bad-dns", Request{Role: identity.RoleGateway, Name: "g", DNSNames: []string{"a..b"}}, "empty, over-long"},
		{"fail/dns-char", Request{Role: identity.RoleGateway, Name: "g", DNSNames: []string{"a_b.example"}}, "contains \"_\""},
		{"fail/bad-name", Request{Role: identity.RoleService, Name: "svc/x"}, "MQTT topic separator"},
		{"fail/bad-role", Request{Role: identity.Role("root"), Name: "r"}, "no certificate profile"},
	}
	for _, c := range refusals {
		t.Run(c.name, func(t *testing.T) {
			c.req.PublicKey = p256(t).Public()
			if _, err := is.Issue(&c.req); err == nil || !strings.Contains(err.Error(), c.detail) {
				t.Fatalf("Issue = %v, want error containing %q", err, c.detail)
			}
		})
	}
}

func TestValidityCappedByIssuer(t *testing.T) {
	t.Parallel()
	_, iss := testCAs(t)
	is := testIssuer(t, Policy{})
	is.Now = func() time.Time { return iss.Cert.NotAfter.Add(-time.Hour) }
	cert, err := is.Issue(&Request{Role: identity.RoleDevice, Name: "late", PublicKey: p256(t).Public()})
	if err != nil {
		t.Fatal(err)
	}
	if !cert.NotAfter.Equal(iss.Cert.NotAfter) {
		t.Errorf("leaf outlives its issuer: %v > %v", cert.NotAfter, iss.Cert.NotAfter)
	}
	is.Now = func() time.Time { return iss.Cert.NotAfter.Add(time.Second) }
	_, err = is.Issue(&Request{Role: identity.RoleDevice, Name: "late", PublicKey: p256(t).Public()})
	if ce, ok := IsCSRError(err); !ok || ce.Reason != ReasonCAExpired {
		t.Errorf("issuing from an expired CA: %v", err)
	}
}

func TestPolicyValidate(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name   string
		p      Policy
		detail string
	}{
		{"ok/default", Policy{TrustDomain: td}, ""},
		{"fail/no-trust-domain", Policy{}, "trust_domain"},
		{"fail/short-validity", Policy{TrustDomain: td, Validity: map[identity.Role]time.Duration{identity.RoleDevice: time.Minute}}, "validity.device"},
		{"fail/unknown-role", Policy{TrustDomain: td, Validity: map[identity.Role]time.Duration{"robot": time.Hour}}, "unknown role"},
		{"fail/key-type", Policy{TrustDomain: td, KeyTypes: []KeyType{"dsa"}}, "key_types"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			err := c.p.Validate()
			if (err == nil) != (c.detail == "") || (err != nil && !strings.Contains(err.Error(), c.detail)) {
				t.Fatalf("Validate = %v, want %q", err, c.detail)
			}
		})
	}
}

func TestTPMBinding(t *testing.T) {
	t.Parallel()
	is := testIssuer(t, Policy{})
	ek := make([]byte, 32)
	for i := range ek {
		ek[i] = byte(i)
	}
	cert, err := is.Issue(&Request{Role: identity.RoleDevice, Name: "tpm-1", PublicKey: p256(t).Public(), TPMEKHash: ek})
	if err != nil {
		t.Fatal(err)
	}
	got, bound, err := TPMBinding(cert)
	if err != nil || !bound || string(got) != string(ek) {
		t.Fatalf("TPMBinding = %x, %v, %v", got, bound, err)
	}
	if _, err := is.Issue(&Request{Role: identity.RoleDevice, Name: "tpm-2", PublicKey: p256(t).Public(), TPMEKHash: ek[:31]}); err == nil {
		t.Fatal("accepted a 31-byte EK hash")
	}
	// A certificate whose policy claims TPM binding but whose notice is
	// damaged is an error, not "unbound".
	for _, bad := range [][]byte{{0x30, 0x00, 0x00}, {0x02, 0x01, 0x00}} {
		if _, err := parseTPMBinding(bad); err == nil {
			t.Errorf("parseTPMBinding(%x) succeeded", bad)
		}
	}
}

func FuzzCheckCSR(f *testing.F) {
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	u, _ := url.Parse("spiffe://fleet.test/device/fz")
	for _, tmpl := range []*x509.CertificateRequest{
		{Subject: pkix.Name{CommonName: "dev-1"}},
		{URIs: []*url.URL{u}},
		{Subject: pkix.Name{CommonName: "dev-1"}, DNSNames: []string{"x"}},
		{Subject: pkix.Name{CommonName: "a/b"}},
	} {
		der, _ := x509.CreateCertificateRequest(rand.Reader, tmpl, key)
		f.Add(der)
	}
	p := Policy{TrustDomain: td}
	f.Fuzz(func(t *testing.T, der []byte) {
		req, err := p.CheckCSR(der, identity.RoleDevice, "")
		if err != nil {
			if _, ok := IsCSRError(err); !ok {
				t.Fatalf("refusal is not a *CSRError: %v", err)
			}
			return
		}
		if identity.ValidateID(req.Name) != nil || req.PublicKey == nil {
			t.Fatalf("accepted a bad request: %+v", req)
		}
	})
}
