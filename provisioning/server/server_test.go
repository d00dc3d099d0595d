package server

import (
	"bufio"
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/smallstep/pkcs7"

	"fleetkey.dev/certs/crl"
	"fleetkey.dev/certs/pkidir"
	"fleetkey.dev/provisioning/registry"
)

// testEnv is a running provisioning service on 127.0.0.1:0 over real TLS.
type testEnv struct {
	t      *testing.T
	dir    string
	pki    string
	url    string
	srv    *Server
	store  registry.Store
	roots  *x509.CertPool
	cancel context.CancelFunc
	done   chan error
}

var pass = &pkidir.Passphrase{Secret: []byte("test passphrase 123"), Source: "test"}

// newPKI makes a fleet PKI (trust domain fleet.test) in a temporary
// directory and returns it with a file holding its passphrase.
func newPKI(tb testing.TB) (dir, pki, passFile string) {
	tb.Helper()
	dir = tb.TempDir()
	pki = filepath.Join(dir, "pki")
	if _, err := pkidir.Init(pki, pkidir.InitOptions{TrustDomain: "fleet.test", Passphrase: pass, Options: pkidir.Options{KDFIterations: 1000}}); err != nil {
		tb.Fatal(err)
	}
	passFile = filepath.Join(dir, "ca.pass")
	if err := os.WriteFile(passFile, pass.Secret, 0o600); err != nil {
		tb.Fatal(err)
	}
	return dir, pki, passFile
}

func startEnv(t *testing.T, mutate func(*Config)) *testEnv {
	t.Helper()
	dir, pki, passFile := newPKI(t)
	cfg := Config{Listen: "127.0.0.1:0", MetricsListen: "127.0.0.1:0", PKIDir: pki, PassphraseFile: passFile, DataDir: filepath.Join(dir, "data")}
	if mutate != nil {
		mutate(&cfg)
	}
	store := registry.NewMemory()
	srv, err := New(context.Background(), cfg, Options{Store: store})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	e := &testEnv{t: t, dir: dir, pki: pki, url: "https://" + ln.Addr().String(), srv: srv, store: store, cancel: cancel, done: make(chan error, 1)}
	go func() { e.done <- srv.Serve(ctx, ln, nil) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-e.done:
			if err != nil {
				t.Errorf("Serve: %v", err)
			}
		case <-time.After(15 * time.Second):
			t.Error("server did not shut down within 15 s")
		}
	})
	root, err := os.ReadFile(filepath.Join(pki, pkidir.RootCert))
	if err != nil {
		t.Fatal(err)
	}
	e.roots = x509.NewCertPool()
	e.roots.AppendCertsFromPEM(root)
	return e
}

// client returns an HTTPS client trusting the fleet root, presenting cert
// (leaf then chain) with key if given.
func (e *testEnv) client(cert []*x509.Certificate, key crypto.Signer) *http.Client {
	cfg := &tls.Config{RootCAs: e.roots, ServerName: "localhost"}
	if cert != nil {
		tc := tls.Certificate{PrivateKey: key, Leaf: cert[0]}
		for _, c := range cert {
			tc.Certificate = append(tc.Certificate, c.Raw)
		}
		cfg.Certificates = []tls.Certificate{tc}
	}
	return &http.Client{Transport: &http.Transport{TLSClientConfig: cfg}, Timeout: 10 * time.Second}
}

// fileClient presents one of the PKI's leaf files (admin, service, gateway).
func (e *testEnv) fileClient(name string) *http.Client {
	e.t.Helper()
	tc, err := tls.LoadX509KeyPair(filepath.Join(e.pki, name+".crt"), filepath.Join(e.pki, name+".key"))
	if err != nil {
		e.t.Fatal(err)
	}
	return &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: e.roots, ServerName: "localhost", Certificates: []tls.Certificate{tc}}}, Timeout: 10 * time.Second}
}

func (e *testEnv) token(req TokenRequest, expires time.Duration) string {
	e.t.Helper()
	if req.MaxUses == 0 {
		req.MaxUses = 10
	}
	v, err := CreateToken(context.Background(), e.store, req, expires, "test", time.Now())
	if err != nil {
		e.t.Fatal(err)
	}
	return v.Token
}

func newKey(t *testing.T) *ecdsa.PrivateKey {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func csrFor(t *testing.T, key crypto.Signer, cn string) []byte {
	t.Helper()
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: cn}}, key)
	if err != nil {
		t.Fatal(err)
	}
	return []byte(base64.StdEncoding.EncodeToString(der))
}

type resp struct {
	status int
	header http.Header
	body   []byte
}

func (e *testEnv) post(c *http.Client, path string, body []byte, hdr map[string]string) resp {
	e.t.Helper()
	req, err := http.NewRequest("POST", e.url+path, bytes.NewReader(body))
	if err != nil {
		e.t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/pkcs10")
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	return e.do(c, req)
}

func (e *testEnv) get(c *http.Client, path string) resp {
	e.t.Helper()
	req, err := http.NewRequest("GET", e.url+path, nil)
	if err != nil {
		e.t.Fatal(err)
	}
	return e.do(c, req)
}

func (e *testEnv) do(c *http.Client, req *http.Request) resp {
	e.t.Helper()
	r, err := c.Do(req)
	if err != nil {
		e.t.Fatal(err)
	}
	defer r.Body.Close()
	b, _ := io.ReadAll(r.Body)
	return resp{r.StatusCode, r.Header, b}
}

func (e *testEnv) enroll(tok string, key crypto.Signer, id string) resp {
	return e.post(e.client(nil, nil), "/.well-known/est/simpleenroll", csrFor(e.t, key, id), map[string]string{"Authorization": "Bearer " + tok})
}

// certsOf decodes an EST certs-only answer.
func certsOf(t *testing.T, r resp) []*x509.Certificate {
	t.Helper()
	if r.status != http.StatusOK {
		t.Fatalf("status %d: %s", r.status, r.body)
	}
	if ct := r.header.Get("Content-Type"); ct != "application/pkcs7-mime; smime-type=certs-only" {
		t.Fatalf("Content-Type %q", ct)
	}
	der, err := base64.StdEncoding.DecodeString(strings.NewReplacer("\r", "", "\n", "").Replace(string(r.body)))
	if err != nil {
		t.Fatal(err)
	}
	p7, err := pkcs7.Parse(der)
	if err != nil {
		t.Fatal(err)
	}
	return p7.Certificates
}

func TestCACertsAndCSRAttrs(t *testing.T) {
	t.Parallel()
	e := startEnv(t, nil)
	certs := certsOf(t, e.get(e.client(nil, nil), "/.well-known/est/cacerts"))
	if len(certs) != 2 || !certs[0].IsCA || !certs[1].IsCA {
		t.Fatalf("cacerts = %d certificates", len(certs))
	}
	r := e.get(e.client(nil, nil), "/.well-known/est/csrattrs")
	if r.status != 200 || r.header.Get("Content-Type") != "application/csrattrs" {
		t.Fatalf("csrattrs: %d %q", r.status, r.header.Get("Content-Type"))
	}
	if _, err := base64.StdEncoding.DecodeString(strings.NewReplacer("\r", "", "\n", "").Replace(string(r.body))); err != nil {
		t.Fatalf("csrattrs body is not base64: %v", err)
	}
}

func TestEnroll(t *testing.T) {
	t.Parallel()
	e := startEnv(t, nil)
	tok := e.token(TokenRequest{Prefix: "line3-", MaxUses: 2}, time.Hour)
	key := newKey(t)
	certs := certsOf(t, e.enroll(tok, key, "line3-0001"))
	cert := certs[0]
	if cert.Subject.CommonName != "line3-0001" || cert.URIs[0].String() != "spiffe://fleet.test/device/line3-0001" {
		t.Fatalf("issued %v %v", cert.Subject, cert.URIs)
	}
	if !key.PublicKey.Equal(cert.PublicKey) {
		t.Fatal("certificate does not carry the CSR's key")
	}
	ctx := context.Background()
	dev, err := e.store.GetDevice(ctx, "line3-0001")
	if err != nil || dev.Serial != cert.SerialNumber.Text(16) || dev.Status != registry.DeviceActive {
		t.Fatalf("registry device = %+v, %v", dev, err)
	}
	id, _, _ := strings.Cut(strings.TrimPrefix(tok, "fkt_"), "_")
	if tk, _ := e.store.GetToken(ctx, id); tk.Uses != 1 {
		t.Fatalf("token uses = %d", tk.Uses)
	}

	// A retry (new CSR bytes, same key) returns the same certificate and
	// spends nothing.
	again := certsOf(t, e.enroll(tok, key, "line3-0001"))
	if !again[0].Equal(cert) {
		t.Fatal("retry issued a new certificate")
	}
	if tk, _ := e.store.GetToken(ctx, id); tk.Uses != 1 {
		t.Fatalf("retry spent a use: %d", tk.Uses)
	}

	// Basic auth with the token as password.
	r := e.post(e.client(nil, nil), "/.well-known/est/simpleenroll", csrFor(t, newKey(t), "line3-0002"), nil)
	if r.status != 401 || len(r.header.Values("WWW-Authenticate")) != 2 {
		t.Fatalf("no credential: %d %v", r.status, r.header)
	}
	req, _ := http.NewRequest("POST", e.url+"/.well-known/est/simpleenroll", bytes.NewReader(csrFor(t, newKey(t), "line3-0002")))
	req.Header.Set("Content-Type", "application/pkcs10")
	req.SetBasicAuth("station-7", tok)
	certsOf(t, e.do(e.client(nil, nil), req))

	// Same id, other key: 409, and nothing changes.
	r = e.enroll(tok, newKey(t), "line3-0001")
	if r.status != http.StatusConflict || !strings.Contains(string(r.body), "already enrolled") {
		t.Fatalf("other key: %d %s", r.status, r.body)
	}
	if d, _ := e.store.GetDevice(ctx, "line3-0001"); d.Serial != dev.Serial {
		t.Fatal("a refused enrollment changed the device")
	}

	// A token that allows re-provisioning revokes the old certificate.
	re := e.token(TokenRequest{Prefix: "line3-", AllowReprovision: true}, time.Hour)
	newCert := certsOf(t, e.enroll(re, newKey(t), "line3-0001"))[0]
	old, _ := e.store.GetCertificate(ctx, dev.Serial)
	if !old.Revoked() || old.RevocationReason != 4 {
		t.Fatalf("old certificate after re-provisioning: %+v", old)
	}
	if d, _ := e.store.GetDevice(ctx, "line3-0001"); d.Serial != newCert.SerialNumber.Text(16) {
		t.Fatal("device does not point at the new certificate")
	}
}

func TestEnrollRefusals(t *testing.T) {
	t.Parallel()
	e := startEnv(t, func(c *Config) { c.Limits.EnrollPerMinutePerToken = 1000 })
	good := e.token(TokenRequest{Prefix: "dev-", MaxUses: 1}, time.Hour)
	// Spend it.
	certsOf(t, e.enroll(good, newKey(t), "dev-1"))
	expired := e.token(TokenRequest{}, time.Nanosecond)
	tpm := e.token(TokenRequest{RequireTPM: true}, time.Hour)
	open := e.token(TokenRequest{}, time.Hour)
	disabled := e.token(TokenRequest{}, time.Hour)
	did, _, _ := strings.Cut(strings.TrimPrefix(disabled, "fkt_"), "_")
	if err := e.store.DisableToken(context.Background(), did, registry.AuditEvent{}); err != nil {
		t.Fatal(err)
	}
	forged := good[:len(good)-4] + "AAAA"
	c := e.client(nil, nil)
	csr := csrFor(t, newKey(t), "dev-2")
	bearer := func(tok string) map[string]string { return map[string]string{"Authorization": "Bearer " + tok} }
	csrWith := func(tmpl *x509.CertificateRequest, tamper bool) []byte {
		der, err := x509.CreateCertificateRequest(rand.Reader, tmpl, newKey(t))
		if err != nil {
			t.Fatal(err)
		}
		if tamper {
			der[len(der)-3] ^= 0xff
		}
		return []byte(base64.StdEncoding.EncodeToString(der))
	}
	caCSR := csrWith(&x509.CertificateRequest{Subject: pkix.Name{CommonName: "dev-3"}, DNSNames: []string{"evil.example"}}, false)
	bcTrue, _ := asn1.Marshal(struct{ IsCA bool }{true})
	caTrue := csrWith(&x509.CertificateRequest{Subject: pkix.Name{CommonName: "dev-4"}, ExtraExtensions: []pkix.Extension{{Id: asn1.ObjectIdentifier{2, 5, 29, 19}, Value: bcTrue}}}, false)
	badSig := csrWith(&x509.CertificateRequest{Subject: pkix.Name{CommonName: "dev-5"}}, true)
	unknown := "fkt_zzzzzzzzzzzz_" + good[len(good)-43:]
	cases := []struct {
		name   string
		body   []byte
		hdr    map[string]string
		status int
		detail string
	}{
		{"fail/no-token", csr, nil, 401, "enrollment needs a token"},
		{"fail/malformed-token", csr, bearer("hunter2"), 401, "malformed"},
		{"fail/forged-secret", csr, bearer(forged), 401, "not valid"},
		{"fail/spent", csrFor(t, newKey(t), "dev-9"), bearer(good), 403, "no uses left"},
		{"fail/expired", csr, bearer(expired), 401, "expired"},
		{"fail/disabled", csr, bearer(disabled), 401, "disabled"},
		{"fail/require-tpm", csr, bearer(tpm), 403, "requires TPM attestation"},
		{"fail/prefix", csrFor(t, newKey(t), "other-1"), bearer(e.token(TokenRequest{Prefix: "dev-"}, time.Hour)), 403, `does not start with this token's prefix "dev-"`},
		{"fail/unknown-token", csr, bearer(unknown), 401, "not valid"},
		{"fail/extra-san", caCSR, bearer(open), 400, "CSR refused: it requests subject alternative names DNS:evil.example"},
		{"fail/ca-true", caTrue, bearer(open), 400, "CSR refused: it requests CA:true"},
		{"fail/bad-signature", badSig, bearer(open), 400, "CSR refused: signature does not verify"},
		{"fail/id-plus", csrFor(t, newKey(t), "a+b"), bearer(open), 400, "MQTT topic separator"},
		{"fail/id-slash", csrFor(t, newKey(t), "a/b"), bearer(open), 400, "MQTT topic separator"},
		{"fail/not-base64", []byte("!!!"), bearer(open), 400, "base64"},
		{"fail/not-a-csr", []byte(base64.StdEncoding.EncodeToString([]byte("hello"))), bearer(open), 400, "cannot parse the PKCS#10"},
		{"fail/content-type", csr, map[string]string{"Authorization": "Bearer " + open, "Content-Type": "application/json"}, 415, "Content-Type must be application/pkcs10"},
		{"fail/too-large", bytes.Repeat([]byte("A"), 40<<10), bearer(open), 413, "larger than"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			ctx := context.Background()
			before, _ := e.store.ListDevices(ctx, registry.ListOptions{})
			audited, _ := e.store.ListAudit(ctx, registry.AuditQuery{Limit: 1000})
			r := e.post(c, "/.well-known/est/simpleenroll", tc.body, tc.hdr)
			if r.status != tc.status || !strings.Contains(string(r.body), tc.detail) {
				t.Fatalf("got %d %q; want %d containing %q", r.status, r.body, tc.status, tc.detail)
			}
			if r.status == 401 && len(r.header.Values("WWW-Authenticate")) == 0 {
				t.Fatal("401 without WWW-Authenticate")
			}
			after, _ := e.store.ListDevices(ctx, registry.ListOptions{})
			if len(after) != len(before) {
				t.Fatal("a refused enrollment added a device")
			}
			// The refusal is in the audit log, with its reason.
			evs, _ := e.store.ListAudit(ctx, registry.AuditQuery{AfterSeq: lastSeq(audited), Limit: 1000})
			if len(evs) != 1 || evs[0].Outcome != registry.Refused || !strings.Contains(evs[0].Reason, tc.detail) {
				t.Fatalf("audit after the refusal: %+v", evs)
			}
		})
	}
}

func lastSeq(evs []registry.AuditEvent) int64 {
	if len(evs) == 0 {
		return 0
	}
	return evs[len(evs)-1].Seq
}

func TestRateLimit(t *testing.T) {
	t.Parallel()
	e := startEnv(t, func(c *Config) { c.Limits.EnrollPerMinutePerToken = 2 })
	tok := e.token(TokenRequest{MaxUses: 100}, time.Hour)
	for i := 0; i < 2; i++ {
		certsOf(t, e.enroll(tok, newKey(t), fmt.Sprintf("d-%d", i)))
	}
	r := e.enroll(tok, newKey(t), "d-3")
	if r.status != http.StatusTooManyRequests || r.header.Get("Retry-After") == "" {
		t.Fatalf("third enrollment in a minute: %d, Retry-After %q", r.status, r.header.Get("Retry-After"))
	}
}

// TestNoDoubleSpend: 200 concurrent enrollments against one token with 100
// uses: exactly 100 certificates, and the registry agrees.
func TestNoDoubleSpend(t *testing.T) {
	t.Parallel()
	e := startEnv(t, nil)
	tok := e.token(TokenRequest{MaxUses: 100}, time.Hour)
	var wg sync.WaitGroup
	codes := make(chan int, 200)
	for i := 0; i < 200; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			body := csrFor(t, newKey(t), fmt.Sprintf("race-%03d", i))
			req, _ := http.NewRequest("POST", e.url+"/.well-known/est/simpleenroll", bytes.NewReader(body))
			req.Header.Set("Content-Type", "application/pkcs10")
			req.Header.Set("Authorization", "Bearer "+tok)
			r, err := e.client(nil, nil).Do(req)
			if err != nil {
				t.Error(err)
				return
			}
			r.Body.Close()
			codes <- r.StatusCode
		}(i)
	}
	wg.Wait()
	close(codes)
	ok := 0
	for c := range codes {
		switch c {
		case 200:
			ok++
		case 403:
		default:
			t.Errorf("unexpected status %d", c)
		}
	}
	devs, _ := e.store.ListDevices(context.Background(), registry.ListOptions{Limit: 1000})
	id, _, _ := strings.Cut(strings.TrimPrefix(tok, "fkt_"), "_")
	tk, _ := e.store.GetToken(context.Background(), id)
	if ok != 100 || len(devs) != 100 || tk.Uses != 100 {
		t.Fatalf("%d enrollments succeeded, %d devices, %d uses; want 100 each", ok, len(devs), tk.Uses)
	}
}

func TestReenrollRevokeFeedCRL(t *testing.T) {
	t.Parallel()
	e := startEnv(t, nil)
	tok := e.token(TokenRequest{}, time.Hour)
	key := newKey(t)
	chain := certsOf(t, e.enroll(tok, key, "sensor-1"))
	dev := e.client(chain[:1], key)

	// Renewal over mTLS: same identity, new key.
	key2 := newKey(t)
	renewed := certsOf(t, e.post(dev, "/.well-known/est/simplereenroll", csrFor(t, key2, "sensor-1"), nil))[0]
	if renewed.Subject.CommonName != "sensor-1" || renewed.SerialNumber.Cmp(chain[0].SerialNumber) == 0 {
		t.Fatal("renewal did not issue a new certificate for the same identity")
	}
	// The old certificate is no longer current.
	if r := e.post(dev, "/.well-known/est/simplereenroll", csrFor(t, key, "sensor-1"), nil); r.status != 403 || !strings.Contains(string(r.body), "no longer the current") {
		t.Fatalf("renewal with a superseded certificate: %d %s", r.status, r.body)
	}
	dev2 := e.client([]*x509.Certificate{renewed}, key2)
	for _, tc := range []struct {
		name   string
		c      *http.Client
		cn     string
		status int
		detail string
	}{
		{"fail/no-client-cert", e.client(nil, nil), "sensor-1", 403, "needs a client certificate"},
		{"fail/admin-cert", e.fileClient("admin"), "sensor-1", 403, "role admin"},
		{"fail/other-identity", dev2, "sensor-2", 400, `CSR names "sensor-2" but the request is for "sensor-1"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := e.post(tc.c, "/.well-known/est/simplereenroll", csrFor(t, newKey(t), tc.cn), nil)
			if r.status != tc.status || !strings.Contains(string(r.body), tc.detail) {
				t.Fatalf("got %d %q; want %d containing %q", r.status, r.body, tc.status, tc.detail)
			}
		})
	}

	// A gateway follows the feed.
	gw := e.fileClient("gateway")
	// Cancelling the request ends the stream; closing the body while the
	// reader goroutine is in Read would wait for the next heartbeat.
	streamCtx, endStream := context.WithCancel(context.Background())
	defer endStream()
	req, _ := http.NewRequestWithContext(streamCtx, "GET", e.url+"/revocations/v1/stream?since=0", nil)
	stream, err := gw.Transport.(*http.Transport).RoundTrip(req)
	if err != nil {
		t.Fatal(err)
	}
	if stream.StatusCode != 200 || stream.Header.Get("Content-Type") != "text/event-stream" {
		t.Fatalf("feed: %d %q", stream.StatusCode, stream.Header.Get("Content-Type"))
	}
	events := make(chan FeedEvent, 10)
	go func() {
		sc := bufio.NewScanner(stream.Body)
		for sc.Scan() {
			if data, ok := strings.CutPrefix(sc.Text(), "data: "); ok {
				var ev FeedEvent
				if json.Unmarshal([]byte(data), &ev) == nil {
					events <- ev
				}
			}
		}
	}()

	// Revoke through the admin API; the feed shows it within a second.
	admin := e.fileClient("admin")
	areq, _ := http.NewRequest("POST", e.url+"/admin/v1/devices/sensor-1/revoke", strings.NewReader(`{"reason":"keyCompromise"}`))
	start := time.Now()
	if r := e.do(admin, areq); r.status != 200 {
		t.Fatalf("admin revoke: %d %s", r.status, r.body)
	}
	seen := map[string]bool{}
	deadline := time.After(time.Second)
	for len(seen) < 2 {
		select {
		case ev := <-events:
			seen[ev.Serial] = true
		case <-deadline:
			t.Fatalf("feed delivered %d of 2 revocations within 1 s", len(seen))
		}
	}
	t.Logf("revocation reached the feed in %s", time.Since(start))
	if !seen[renewed.SerialNumber.Text(16)] || !seen[chain[0].SerialNumber.Text(16)] {
		t.Fatalf("feed showed %v", seen)
	}

	// The CRL lists both, and verifies.
	r := e.get(e.client(nil, nil), "/crl")
	if r.status != 200 || r.header.Get("Content-Type") != "application/pkix-crl" {
		t.Fatalf("crl: %d", r.status)
	}
	bundle, _ := pkidir.LoadBundle(e.pki)
	list, err := crl.Parse(r.body, bundle.Issuing(), time.Now())
	if err != nil {
		t.Fatal(err)
	}
	if !list.Revokes(chain[0]) || !list.Revokes(renewed) {
		t.Fatal("CRL does not revoke the device's certificates")
	}

	// A revoked device can neither renew nor enroll again.
	if r := e.post(dev2, "/.well-known/est/simplereenroll", csrFor(t, key2, "sensor-1"), nil); r.status != 403 || !strings.Contains(string(r.body), "revoked") {
		t.Fatalf("renewal after revocation: %d %s", r.status, r.body)
	}
	re := e.token(TokenRequest{AllowReprovision: true}, time.Hour)
	if r := e.enroll(re, newKey(t), "sensor-1"); r.status != 403 || !strings.Contains(string(r.body), "revoked and cannot enroll") {
		t.Fatalf("enrollment after revocation: %d %s", r.status, r.body)
	}
}

func TestAdminAPI(t *testing.T) {
	t.Parallel()
	e := startEnv(t, nil)
	admin := e.fileClient("admin")
	for _, tc := range []struct {
		name string
		c    *http.Client
	}{
		{"fail/no-cert", e.client(nil, nil)},
		{"fail/service-cert", e.fileClient("service")},
		{"fail/gateway-cert", e.fileClient("gateway")},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if r := e.get(tc.c, "/admin/v1/devices"); r.status != 403 {
				t.Fatalf("status %d", r.status)
			}
		})
	}
	req, _ := http.NewRequest("POST", e.url+"/admin/v1/tokens", strings.NewReader(`{"prefix":"lab-","max_uses":3,"expires_in":"2h","labels":{"line":"7"}}`))
	r := e.do(admin, req)
	var tv TokenView
	if r.status != 200 || json.Unmarshal(r.body, &tv) != nil || !strings.HasPrefix(tv.Token, "fkt_") {
		t.Fatalf("create token: %d %s", r.status, r.body)
	}
	certsOf(t, e.enroll(tv.Token, newKey(t), "lab-1"))
	if r := e.get(admin, "/admin/v1/devices"); r.status != 200 || !strings.Contains(string(r.body), `"lab-1"`) {
		t.Fatalf("list devices: %d %s", r.status, r.body)
	}
	if r := e.get(admin, "/admin/v1/devices/lab-1"); r.status != 200 || !strings.Contains(string(r.body), `"certificates"`) {
		t.Fatalf("show device: %d %s", r.status, r.body)
	}
	if r := e.get(admin, "/admin/v1/tokens"); r.status != 200 || strings.Contains(string(r.body), tv.Token) {
		t.Fatalf("token list leaks the secret or fails: %d", r.status)
	}
	if r := e.get(admin, "/admin/v1/audit?subject=lab-1"); r.status != 200 || !strings.Contains(string(r.body), `"enroll"`) {
		t.Fatalf("audit: %d %s", r.status, r.body)
	}
	for _, tc := range []struct {
		name, method, path, body string
		status                   int
	}{
		{"fail/unknown-device", "GET", "/admin/v1/devices/nobody", "", 404},
		{"fail/bad-id", "GET", "/admin/v1/devices/a+b", "", 400},
		{"fail/bad-limit", "GET", "/admin/v1/devices?limit=0", "", 400},
		{"fail/bad-reason", "POST", "/admin/v1/devices/lab-1/revoke", `{"reason":"boredom"}`, 400},
		{"fail/unknown-field", "POST", "/admin/v1/tokens", `{"max_uses":1,"expires_in":"1h","admin":true}`, 400},
		{"fail/zero-uses", "POST", "/admin/v1/tokens", `{"max_uses":0,"expires_in":"1h"}`, 400},
		{"fail/bad-expiry", "POST", "/admin/v1/tokens", `{"max_uses":1,"expires_in":"forever"}`, 400},
		{"fail/bad-prefix", "POST", "/admin/v1/tokens", `{"prefix":"a/","max_uses":1,"expires_in":"1h"}`, 400},
		{"fail/disable-unknown", "POST", "/admin/v1/tokens/aaaaaaaaaaaa/disable", "", 404},
		{"ok/ek-add", "POST", "/admin/v1/eks", `{"hashes":["` + strings.Repeat("ab", 32) + `"],"label":"batch 7"}`, 200},
		{"ok/ek-list", "GET", "/admin/v1/eks", "", 200},
		{"ok/ek-remove", "DELETE", "/admin/v1/eks/" + strings.Repeat("ab", 32), "", 200},
		{"fail/ek-remove-again", "DELETE", "/admin/v1/eks/" + strings.Repeat("ab", 32), "", 404},
		{"fail/ek-bad-hash", "POST", "/admin/v1/eks", `{"hashes":["abc"]}`, 400},
		{"fail/ek-none", "POST", "/admin/v1/eks", `{"hashes":[]}`, 400},
		{"fail/ek-remove-bad-hash", "DELETE", "/admin/v1/eks/xyz", "", 400},
	} {
		t.Run(tc.name, func(t *testing.T) {
			req, _ := http.NewRequest(tc.method, e.url+tc.path, strings.NewReader(tc.body))
			if r := e.do(admin, req); r.status != tc.status {
				t.Fatalf("status %d %s; want %d", r.status, r.body, tc.status)
			}
		})
	}
	if r := e.get(e.fileClient("service"), "/revocations/v1/stream"); r.status != 403 {
		t.Fatalf("feed with a service certificate: %d", r.status)
	}
}

// TestSlowClients: a client that never finishes its request, or never
// finishes the TLS handshake, is closed by the deadline.
//
// Not parallel: with deadlines this short, a busy machine could time out
// the handshakes of well-behaved clients too.
func TestSlowClients(t *testing.T) {
	e := startEnv(t, func(c *Config) {
		c.Limits.ReadHeaderTimeout, c.Limits.ReadTimeout = 500*time.Millisecond, 800*time.Millisecond
	})
	addr := strings.TrimPrefix(e.url, "https://")
	closedWithin := func(t *testing.T, conn net.Conn, limit time.Duration) {
		t.Helper()
		_ = conn.SetReadDeadline(time.Now().Add(limit))
		_, err := io.Copy(io.Discard, conn)
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			t.Fatalf("the server kept the connection open for %s", limit)
		}
	}
	t.Run("fail/silent-tcp", func(t *testing.T) {
		conn, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		closedWithin(t, conn, 5*time.Second)
	})
	t.Run("fail/unfinished-headers", func(t *testing.T) {
		conn, err := tls.Dial("tcp", addr, &tls.Config{RootCAs: e.roots, ServerName: "localhost"})
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		if _, err := conn.Write([]byte("POST /.well-known/est/simpleenroll HTTP/1.1\r\nHost: x\r\n")); err != nil {
			t.Fatal(err)
		}
		closedWithin(t, conn, 5*time.Second)
	})
	t.Run("fail/unfinished-body", func(t *testing.T) {
		conn, err := tls.Dial("tcp", addr, &tls.Config{RootCAs: e.roots, ServerName: "localhost"})
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		tok := e.token(TokenRequest{}, time.Hour)
		fmt.Fprintf(conn, "POST /.well-known/est/simpleenroll HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\nContent-Type: application/pkcs10\r\nContent-Length: 1000\r\n\r\nMIIB", tok)
		_ = conn.SetReadDeadline(time.Now().Add(5 * time.Second))
		b, _ := io.ReadAll(conn)
		if !strings.Contains(string(b), "400") && len(b) != 0 {
			t.Fatalf("unexpected answer to an unfinished body: %q", b)
		}
	})
	// The refusal of the unfinished body is audited like any other.
	evs, _ := e.store.ListAudit(context.Background(), registry.AuditQuery{Limit: 100})
	found := false
	for _, ev := range evs {
		found = found || strings.Contains(ev.Reason, "reading the request body")
	}
	if !found {
		t.Fatalf("the timed-out request is not in the audit log: %+v", evs)
	}
	devs, _ := e.store.ListDevices(context.Background(), registry.ListOptions{})
	if len(devs) != 0 {
		t.Fatal("a slow client got a certificate")
	}
}

func TestHealthAndMetrics(t *testing.T) {
	t.Parallel()
	e := startEnv(t, nil)
	tok := e.token(TokenRequest{}, time.Hour)
	certsOf(t, e.enroll(tok, newKey(t), "m-1"))
	e.enroll("fkt_garbage", newKey(t), "m-2")
	rec := httptest.NewRecorder()
	e.srv.metricsHandler().ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	body := rec.Body.String()
	for _, want := range []string{
		`fleetkey_provisioning_est_requests_total{endpoint="simpleenroll",outcome="issued"} 1`,
		`fleetkey_provisioning_est_requests_total{endpoint="simpleenroll",outcome="bad-token"} 1`,
	} {
		if !strings.Contains(body, want) {
			t.Errorf("metrics lack %s", want)
		}
	}
	for _, path := range []string{"/healthz", "/readyz"} {
		rec := httptest.NewRecorder()
		e.srv.metricsHandler().ServeHTTP(rec, httptest.NewRequest("GET", path, nil))
		if rec.Code != 200 {
			t.Errorf("%s = %d", path, rec.Code)
		}
	}
}

// TestOfflineRevocation: an admin certificate revoked offline with the
// certs tooling (as `certs crl --revoke` does) no longer opens the admin API.
func TestOfflineRevocation(t *testing.T) {
	t.Parallel()
	e := startEnv(t, nil)
	admin := e.fileClient("admin")
	if r := e.get(admin, "/admin/v1/devices"); r.status != 200 {
		t.Fatalf("admin before revocation: %d", r.status)
	}
	pemBytes, _ := os.ReadFile(filepath.Join(e.pki, "admin.crt"))
	block, _ := pem.Decode(pemBytes)
	leaf, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := pkidir.Revoke(e.pki, []*big.Int{leaf.SerialNumber}, "keyCompromise", time.Now()); err != nil {
		t.Fatal(err)
	}
	if _, err := pkidir.WriteCRLs(e.pki, pass, time.Hour, pkidir.Options{}); err != nil {
		t.Fatal(err)
	}
	if n := e.srv.offline.reload(e.pki, e.srv.bundle.Issuing(), time.Now(), e.srv.log); n != 1 {
		t.Fatalf("offline CRLs listed %d serials", n)
	}
	r := e.get(e.fileClient("admin"), "/admin/v1/devices")
	if r.status != 403 || !strings.Contains(string(r.body), "revoked") {
		t.Fatalf("revoked admin: %d %s", r.status, r.body)
	}
}
