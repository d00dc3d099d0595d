package broker

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"fleetkey.dev/certs/authority"
	"fleetkey.dev/certs/identity"
	"fleetkey.dev/certs/pkidir"
)

var pass = &pkidir.Passphrase{Secret: []byte("gateway test passphrase"), Source: "test"}

type env struct {
	t      testing.TB
	pki    string
	addr   string
	b      *Broker
	issuer *authority.Issuer
	roots  *x509.CertPool
	logs   *syncBuffer
}

// syncBuffer collects the broker's log for assertions.
type syncBuffer struct {
	mu sync.Mutex
	b  strings.Builder
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// forge signs any template with the fleet's issuing CA: what a faulty or
// compromised issuance path could produce, for the refusals the profile
// never issues.
func (e *env) forge(tmpl *x509.Certificate) *tls.Certificate {
	e.t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if tmpl.SerialNumber == nil {
		tmpl.SerialNumber, _ = authority.NewSerial(rand.Reader)
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, e.issuer.CA.Cert, key.Public(), e.issuer.CA.Signer)
	if err != nil {
		e.t.Fatal(err)
	}
	return &tls.Certificate{Certificate: [][]byte{der, e.issuer.CA.Cert.Raw}, PrivateKey: key}
}

func newPKI(t testing.TB, td string) (string, *authority.Issuer) {
	t.Helper()
	pki := filepath.Join(t.TempDir(), "pki")
	if _, err := pkidir.Init(pki, pkidir.InitOptions{TrustDomain: td, Passphrase: pass, Options: pkidir.Options{KDFIterations: 1000}}); err != nil {
		t.Fatal(err)
	}
	ca, err := pkidir.LoadIssuing(pki, pass)
	if err != nil {
		t.Fatal(err)
	}
	return pki, &authority.Issuer{CA: ca, Policy: authority.Policy{TrustDomain: td}}
}

// listenerFunc lets a test put a faulty net.Listener under the broker.
type listenerFunc func(net.Listener) net.Listener

// start runs a broker on 127.0.0.1:0; clock, if given, is its clock.
func start(t testing.TB, limits Limits, wrap listenerFunc, revoked func(string) bool, clock ...func() time.Time) *env {
	t.Helper()
	return startWith(t, wrap, func(o *Options) {
		o.Limits, o.IsRevoked = limits, revoked
		if len(clock) > 0 {
			o.Now = clock[0]
		}
	})
}

// gatewayOptions makes a fleet PKI and returns the broker's options for
// it: the trust bundle and the gateway certificate.
func gatewayOptions(t testing.TB) (string, *authority.Issuer, Options) {
	t.Helper()
	pki, iss := newPKI(t, "fleet.test")
	bundle, err := pkidir.LoadBundle(pki)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := tls.LoadX509KeyPair(filepath.Join(pki, "gateway.crt"), filepath.Join(pki, "gateway.key"))
	if err != nil {
		t.Fatal(err)
	}
	return pki, iss, Options{Bundle: bundle, Certificate: cert}
}

// startWith runs a broker on 127.0.0.1:0 with options set by configure,
// before the broker is built.
func startWith(t testing.TB, wrap listenerFunc, configure func(*Options)) *env {
	t.Helper()
	pki, iss, opts := gatewayOptions(t)
	bundle := opts.Bundle
	logs := &syncBuffer{}
	opts.Log = slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelInfo}))
	configure(&opts)
	b, err := New(opts)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	if wrap != nil {
		ln = wrap(ln)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- b.Serve(ctx, ln) }()
	t.Cleanup(func() {
		cancel()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Error("broker did not stop within 10 s")
		}
	})
	roots := x509.NewCertPool()
	for _, r := range bundle.Roots() {
		roots.AddCert(r)
	}
	return &env{t: t, pki: pki, addr: addr, b: b, issuer: iss, roots: roots, logs: logs}
}

// leaf issues a certificate for role/name and returns it as a TLS pair.
func (e *env) leaf(iss *authority.Issuer, role identity.Role, name string) tls.Certificate {
	e.t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	c, err := iss.Issue(&authority.Request{Role: role, Name: name, PublicKey: key.Public()})
	if err != nil {
		e.t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{c.Raw, iss.CA.Cert.Raw}, PrivateKey: key, Leaf: c}
}

func (e *env) tlsConfig(cert *tls.Certificate) *tls.Config {
	cfg := &tls.Config{RootCAs: e.roots, ServerName: "localhost"}
	if cert != nil {
		cfg.Certificates = []tls.Certificate{*cert}
	}
	return cfg
}

func (e *env) paho(cert *tls.Certificate, clientID string) (paho.Client, error) {
	opts := paho.NewClientOptions().AddBroker("tls://" + e.addr).SetClientID(clientID).SetTLSConfig(e.tlsConfig(cert)).
		SetAutoReconnect(false).SetConnectRetry(false).SetProtocolVersion(4).SetConnectTimeout(5 * time.Second).SetCleanSession(true)
	c := paho.NewClient(opts)
	tok := c.Connect()
	if !tok.WaitTimeout(10 * time.Second) {
		return nil, errors.New("connect timed out")
	}
	return c, tok.Error()
}

func (e *env) mustConnect(cert tls.Certificate, id string) paho.Client {
	e.t.Helper()
	c, err := e.paho(&cert, id)
	if err != nil {
		e.t.Fatalf("connecting %s: %v", id, err)
	}
	e.t.Cleanup(func() { c.Disconnect(100) })
	return c
}

func suback(t *testing.T, c paho.Client, filter string) byte {
	t.Helper()
	tok := c.Subscribe(filter, 0, nil)
	if !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		t.Fatalf("subscribe %q: %v", filter, tok.Error())
	}
	res := tok.(*paho.SubscribeToken).Result()
	code, ok := res[filter]
	if !ok && len(res) == 1 {
		for _, c := range res { // paho keys shared subscriptions without their $share/<group>/ prefix
			code = c
		}
	}
	return code
}

// waitFor waits, with a deadline, until cond holds.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond) // polling a counter the broker updates; bounded by the deadline
	}
}

func TestIdentityBinding(t *testing.T) {
	t.Parallel()
	e := start(t, Limits{}, nil, nil)
	devA := e.leaf(e.issuer, identity.RoleDevice, "dev-a")
	a := e.mustConnect(devA, "dev-a")
	if got := suback(t, a, "devices/dev-a/down/+"); got != 0 {
		t.Fatalf("own down/+: suback %#x", got)
	}

	// A's certificate with B's client id is refused, and A is untouched.
	if _, err := e.paho(&devA, "dev-b"); err == nil {
		t.Fatal("device A's certificate connected as dev-b")
	}
	if !a.IsConnectionOpen() {
		t.Fatal("A's session was disturbed by the impostor")
	}
	// Service and admin connect under their own names.
	svc := e.leaf(e.issuer, identity.RoleService, "ingest")
	e.mustConnect(svc, "ingest")
	if _, err := e.paho(&svc, "other"); err == nil {
		t.Fatal("service connected under another name")
	}
	if !strings.Contains(e.logs.String(), "reason=client-id-mismatch") {
		t.Fatal("the log does not give the reason client-id-mismatch")
	}
	if e.b.Stats().AuthDenied.Load() != 2 || e.b.Stats().Refusals()[[2]string{"connect", "client-id-mismatch"}] != 2 {
		t.Fatalf("auth denials counted: %d, %v", e.b.Stats().AuthDenied.Load(), e.b.Stats().Refusals())
	}
}

func TestTLSRefusals(t *testing.T) {
	t.Parallel()
	e := start(t, Limits{}, nil, func(serial string) bool { return serial == revokedSerial.Load() })
	_, otherIss := newPKI(t, "other.test")
	now := time.Now()
	expiredIss := *e.issuer
	expiredIss.Now = func() time.Time { return now.Add(-100 * 24 * time.Hour) }
	revoked := e.leaf(e.issuer, identity.RoleDevice, "dev-r")
	revokedSerial.Store(revoked.Leaf.SerialNumber.Text(16))
	gw := e.leaf(e.issuer, identity.RoleGateway, "gw-2")
	cases := []struct {
		name   string
		cert   *tls.Certificate
		id     string
		reason string
	}{
		{"fail/no-certificate", nil, "dev-x", "no-certificate"},
		{"fail/other-ca", ptr(e.leaf(otherIss, identity.RoleDevice, "dev-x")), "dev-x", "unknown-ca"},
		{"fail/expired", ptr(e.leaf(&expiredIss, identity.RoleDevice, "dev-x")), "dev-x", "expired"},
		{"fail/revoked", &revoked, "dev-r", "revoked"},
		{"fail/gateway-role", &gw, "gw-2", "wrong-role"},
		{"fail/not-yet-valid", e.forge(&x509.Certificate{Subject: pkix.Name{CommonName: "dev-f"}, URIs: []*url.URL{spiffe("device/dev-f")},
			ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}, NotBefore: now.Add(time.Hour), NotAfter: now.Add(2 * time.Hour)}), "dev-f", "not-yet-valid"},
		{"fail/wrong-eku", e.forge(&x509.Certificate{Subject: pkix.Name{CommonName: "dev-e"}, URIs: []*url.URL{spiffe("device/dev-e")},
			ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}, NotBefore: now.Add(-time.Hour), NotAfter: now.Add(time.Hour)}), "dev-e", "wrong-eku"},
		{"fail/no-spiffe-id", e.forge(&x509.Certificate{Subject: pkix.Name{CommonName: "dev-n"},
			ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}, NotBefore: now.Add(-time.Hour), NotAfter: now.Add(time.Hour)}), "dev-n", "bad-spiffe-id"},
		{"fail/ca-certificate", &tls.Certificate{Certificate: [][]byte{e.issuer.CA.Cert.Raw}, PrivateKey: e.issuer.CA.Signer}, "dev-ca", "ca-certificate"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			before := e.b.Stats().HandshakeFailures.Load()
			if cl, err := e.paho(c.cert, c.id); err == nil {
				cl.Disconnect(0)
				t.Fatal("connected")
			}
			waitFor(t, "the refusal to be counted", func() bool { return e.b.Stats().HandshakeFailures.Load() == before+1 })
			if n := e.b.Stats().Refusals()[[2]string{"handshake", c.reason}]; n != 1 {
				t.Fatalf("refusals[handshake, %s] = %d; all: %v", c.reason, n, e.b.Stats().Refusals())
			}
			// The log line comes just after the count, from the connection's
			// goroutine: wait for it too (a CI run caught the test in between).
			waitFor(t, "the log to give the reason "+c.reason, func() bool { return strings.Contains(e.logs.String(), "reason="+c.reason) })
		})
	}
}

var revokedSerial atomic.Value

func spiffe(path string) *url.URL {
	u, _ := url.Parse("spiffe://fleet.test/" + path)
	return u
}

func ptr[T any](v T) *T { return &v }

func TestACL(t *testing.T) {
	t.Parallel()
	e := start(t, Limits{}, nil, nil)
	a := e.mustConnect(e.leaf(e.issuer, identity.RoleDevice, "dev-a"), "dev-a")
	// mochi hands the ACL the filter without its $share/<group>/ prefix, so a
	// shared subscription is judged on the filter it shares.
	for _, f := range []string{"devices/dev-b/down/+", "devices/#", "#", "$SYS/#", "$share/g/devices/dev-b/down/+", "$share/g/#", "fleet/telemetry/#"} {
		if got := suback(t, a, f); got != 0x80 {
			t.Errorf("device subscribed to %q (suback %#x)", f, got)
		}
	}
	// Cross-device publish: dropped, and counted.
	b := e.mustConnect(e.leaf(e.issuer, identity.RoleDevice, "dev-b"), "dev-b")
	got := make(chan string, 4)
	if tok := b.Subscribe("devices/dev-b/down/+", 0, func(_ paho.Client, m paho.Message) { got <- m.Topic() }); !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		t.Fatal(tok.Error())
	}
	before := e.b.Stats().ACLDenied.Load()
	a.Publish("devices/dev-b/down/cmd", 0, false, "x").WaitTimeout(5 * time.Second)
	waitFor(t, "the ACL decision", func() bool { return e.b.Stats().ACLDenied.Load() > before })
	select {
	case topic := <-got:
		t.Fatalf("dev-b received %q from dev-a", topic)
	default:
	}
	// Plaintext telemetry is refused until session keys land.
	a.Publish("devices/dev-a/up/temp", 0, false, "21.5").WaitTimeout(5 * time.Second)
	waitFor(t, "the plaintext refusal", func() bool { return e.b.Stats().PlaintextRefused.Load() == 1 })
}

// mqttConn is a raw MQTT connection over TLS, for packets no client sends.
func (e *env) rawConnect(t *testing.T, cert tls.Certificate, id string, v5 bool) *tls.Conn {
	t.Helper()
	c, err := tls.Dial("tcp", e.addr, e.tlsConfig(&cert))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	level, props := byte(4), []byte{}
	if v5 {
		level, props = 5, []byte{0}
	}
	vh := append([]byte{0, 4, 'M', 'Q', 'T', 'T', level, 0x02, 0, 30}, props...)
	payload := append([]byte{0, byte(len(id))}, id...)
	body := append(vh, payload...)
	if _, err := c.Write(append([]byte{0x10, byte(len(body))}, body...)); err != nil {
		t.Fatal(err)
	}
	ack := make([]byte, 4)
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadAtLeast(c, ack, 4); err != nil || ack[0] != 0x20 || ack[3] != 0 {
		t.Fatalf("CONNACK: % x, %v", ack, err)
	}
	return c
}

// TestMalformedPackets: no packet crashes the gateway. Each is sent after a
// good CONNECT; the connection may be closed, the gateway must go on.
func TestMalformedPackets(t *testing.T) {
	t.Parallel()
	e := start(t, Limits{}, nil, nil)
	cert := e.leaf(e.issuer, identity.RoleDevice, "dev-m")
	corpus := []struct {
		name string
		v5   bool
		pkt  []byte
	}{
		{"mqtt5-subscribe-without-options", true, []byte{0x82, 0x06, 0x00, 0x17, 0x00, 0x00, 0x01, 0x61}},
		{"mqtt5-subscribe-truncated-props", true, []byte{0x82, 0x03, 0x00, 0x01, 0x05}},
		{"mqtt311-subscribe-no-filter", false, []byte{0x82, 0x02, 0x00, 0x01}},
		{"mqtt311-publish-short-topic", false, []byte{0x30, 0x02, 0x00, 0x09}},
		{"mqtt5-publish-bad-props", true, []byte{0x30, 0x05, 0x00, 0x01, 'a', 0x09, 0x26}},
		{"reserved-type", false, []byte{0xf0, 0x00}},
		{"bad-remaining-length", false, []byte{0x30, 0xff, 0xff, 0xff, 0xff, 0x7f}},
		{"mqtt5-unsubscribe-empty", true, []byte{0xa2, 0x03, 0x00, 0x02, 0x00}},
		{"second-connect", false, []byte{0x10, 0x02, 0x00, 0x00}},
	}
	for _, c := range corpus {
		t.Run(c.name, func(t *testing.T) {
			conn := e.rawConnect(t, cert, "dev-m", c.v5)
			if _, err := conn.Write(c.pkt); err != nil {
				t.Fatal(err)
			}
			_ = conn.SetReadDeadline(time.Now().Add(5 * time.Second))
			_, err := io.Copy(io.Discard, conn)
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				t.Fatal("the malformed packet did not end the connection")
			}
			// The gateway still serves.
			other := e.mustConnect(e.leaf(e.issuer, identity.RoleDevice, "dev-ok"), "dev-ok")
			other.Disconnect(0)
		})
	}
	// The first packet of the corpus panics mochi's decoder (v2.7.9): the
	// test is only worth something if that path was taken and survived.
	if n := e.b.Stats().Panics.Load(); n < 1 {
		t.Fatalf("no decoder panic was recovered (%d); the crash path was not exercised", n)
	}
}

// TestDeadlines is not parallel: with deadlines this short, a busy machine
// could time out a well-behaved handshake too.
func TestDeadlines(t *testing.T) {
	e := start(t, Limits{HandshakeTimeout: 500 * time.Millisecond, ConnectTimeout: 500 * time.Millisecond}, nil, nil)
	closed := func(t *testing.T, c net.Conn) {
		t.Helper()
		_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
		_, err := io.Copy(io.Discard, c)
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			t.Fatal("the gateway kept a stalled connection open")
		}
	}
	t.Run("fail/silent-tcp", func(t *testing.T) {
		c, err := net.Dial("tcp", e.addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		closed(t, c)
	})
	t.Run("fail/stalled-handshake", func(t *testing.T) {
		c, err := net.Dial("tcp", e.addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.Write([]byte{0x16, 0x03, 0x01, 0x02, 0x00, 0x01}) // the start of a ClientHello, never finished
		closed(t, c)
	})
	t.Run("fail/no-connect", func(t *testing.T) {
		cert := e.leaf(e.issuer, identity.RoleDevice, "dev-s")
		c, err := tls.Dial("tcp", e.addr, e.tlsConfig(&cert))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		closed(t, c)
	})
}

// flakyListener fails its first Accept calls with a temporary error, as a
// process out of file descriptors would.
type flakyListener struct {
	net.Listener
	fails atomic.Int32
}

type tempErr struct{}

func (tempErr) Error() string   { return "accept: too many open files" }
func (tempErr) Timeout() bool   { return false }
func (tempErr) Temporary() bool { return true }

func (f *flakyListener) Accept() (net.Conn, error) {
	if f.fails.Add(-1) >= 0 {
		return nil, tempErr{}
	}
	return f.Listener.Accept()
}

func TestAcceptErrors(t *testing.T) {
	t.Parallel()
	e := start(t, Limits{}, func(ln net.Listener) net.Listener {
		f := &flakyListener{Listener: ln}
		f.fails.Store(3)
		return f
	}, nil)
	e.mustConnect(e.leaf(e.issuer, identity.RoleDevice, "dev-1"), "dev-1")
	if n := e.b.Stats().AcceptErrors.Load(); n != 3 {
		t.Fatalf("accept errors counted: %d", n)
	}
}

// TestMosquittoClients: Mosquitto's own clients, which nobody here wrote,
// connect with a device certificate and are refused without one.
func TestMosquittoClients(t *testing.T) {
	t.Parallel()
	if _, err := exec.LookPath("mosquitto_sub"); err != nil {
		t.Skip("mosquitto_sub not installed (Debian mosquitto-clients); .ci/run installs it")
	}
	e := start(t, Limits{}, nil, nil)
	dir := t.TempDir()
	cert := e.leaf(e.issuer, identity.RoleDevice, "dev-q")
	keyDER, _ := x509.MarshalPKCS8PrivateKey(cert.PrivateKey)
	write := func(name string, blocks ...*pem.Block) string {
		var b []byte
		for _, bl := range blocks {
			b = append(b, pem.EncodeToMemory(bl)...)
		}
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, b, 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	crt := write("dev.crt", &pem.Block{Type: "CERTIFICATE", Bytes: cert.Certificate[0]}, &pem.Block{Type: "CERTIFICATE", Bytes: cert.Certificate[1]})
	key := write("dev.key", &pem.Block{Type: "PRIVATE KEY", Bytes: keyDER})
	host, port, _ := net.SplitHostPort(e.addr)
	_ = host
	base := []string{"-h", "localhost", "-p", port, "--cafile", filepath.Join(e.pki, "root.crt"), "-i", "dev-q", "-V", "mqttv311"}
	// With the certificate: subscribe to its own commands, one wait-free round.
	out, err := exec.Command("mosquitto_sub", append(base, "--cert", crt, "--key", key, "-t", "devices/dev-q/down/+", "-W", "1", "-C", "1")...).CombinedOutput()
	if err != nil && !strings.Contains(string(out), "Timed out") && !strings.Contains(err.Error(), "exit status 27") {
		t.Fatalf("mosquitto_sub with a device certificate: %v\n%s", err, out)
	}
	// mosquitto_pub to its kex/req topic succeeds.
	if out, err := exec.Command("mosquitto_pub", append(base, "--cert", crt, "--key", key, "-t", "devices/dev-q/kex/req", "-m", "hello")...).CombinedOutput(); err != nil {
		t.Fatalf("mosquitto_pub with a device certificate: %v\n%s", err, out)
	}
	// Without a certificate: refused.
	if out, err := exec.Command("mosquitto_pub", append(base, "-t", "devices/dev-q/kex/req", "-m", "hello")...).CombinedOutput(); err == nil {
		t.Fatalf("mosquitto_pub without a certificate succeeded:\n%s", out)
	}
	// With the wrong client id: refused.
	wrong := append([]string{}, base...)
	wrong[len(wrong)-3] = "dev-other"
	if out, err := exec.Command("mosquitto_pub", append(wrong, "--cert", crt, "--key", key, "-t", "devices/dev-q/kex/req", "-m", "x")...).CombinedOutput(); err == nil {
		t.Fatalf("mosquitto_pub with another client id succeeded:\n%s", out)
	}
	_ = strconv.Itoa
}

// rawConnectWill connects with a Will (QoS 0) on willTopic.
func (e *env) rawConnectWill(t *testing.T, cert tls.Certificate, id, willTopic string) *tls.Conn {
	t.Helper()
	c, err := tls.Dial("tcp", e.addr, e.tlsConfig(&cert))
	if err != nil {
		t.Fatal(err)
	}
	vh := []byte{0, 4, 'M', 'Q', 'T', 'T', 4, 0x02 | 0x04, 0, 30} // clean session, will flag
	payload := append([]byte{0, byte(len(id))}, id...)
	payload = append(payload, 0, byte(len(willTopic)))
	payload = append(payload, willTopic...)
	payload = append(payload, 0, 4, 'g', 'o', 'n', 'e')
	body := append(vh, payload...)
	if _, err := c.Write(append([]byte{0x10, byte(len(body))}, body...)); err != nil {
		t.Fatal(err)
	}
	ack := make([]byte, 4)
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadAtLeast(c, ack, 4); err != nil || ack[3] != 0 {
		t.Fatalf("CONNACK: % x, %v", ack, err)
	}
	return c
}

func TestRevokeWhileConnected(t *testing.T) {
	t.Parallel()
	e := start(t, Limits{}, nil, nil)
	// Control: an ordinary dropped connection does publish its Will, so
	// the counter below can see one.
	ctl := e.rawConnectWill(t, e.leaf(e.issuer, identity.RoleDevice, "dev-c"), "dev-c", "devices/dev-c/up/status")
	ctl.Close()
	waitFor(t, "the control Will", func() bool { return e.b.Stats().WillsSent.Load() == 1 })

	cert := e.leaf(e.issuer, identity.RoleDevice, "dev-a")
	conn := e.rawConnectWill(t, cert, "dev-a", "devices/dev-a/up/status")
	if _, ok := e.b.mqtt.Clients.Get("dev-a"); !ok {
		t.Fatal("dev-a has no session")
	}
	start := time.Now()
	if n := e.b.Revoke(cert.Leaf.SerialNumber.Text(16)); n != 1 {
		t.Fatalf("Revoke disconnected %d clients", n)
	}
	_ = conn.SetReadDeadline(time.Now().Add(time.Second))
	_, err := io.Copy(io.Discard, conn)
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		t.Fatal("the revoked client was still connected after 1 s")
	}
	t.Logf("revoked client disconnected in %s", time.Since(start))
	waitFor(t, "the session to go", func() bool { _, ok := e.b.mqtt.Clients.Get("dev-a"); return !ok })
	if n := e.b.Stats().WillsSent.Load(); n != 1 {
		t.Fatalf("the revoked client's Will was published (%d Wills)", n)
	}
	if e.b.Stats().RevocationKicks.Load() != 1 {
		t.Fatal("revocation kick not counted")
	}
	// And it cannot come back.
	if c, err := e.paho(&cert, "dev-a"); err == nil {
		c.Disconnect(0)
		t.Fatal("a revoked certificate reconnected")
	}
}

func TestExpiryWhileConnected(t *testing.T) {
	t.Parallel()
	e := start(t, Limits{}, nil, nil)
	short := *e.issuer
	short.Policy.Validity = map[identity.Role]time.Duration{identity.RoleDevice: time.Hour}
	now := time.Now()
	short.Now = func() time.Time { return now.Add(-time.Hour + 1500*time.Millisecond) }
	cert := e.leaf(&short, identity.RoleDevice, "dev-x")
	conn := e.rawConnectWill(t, cert, "dev-x", "devices/dev-x/up/status")
	_ = conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	_, err := io.Copy(io.Discard, conn)
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		t.Fatal("the client outlived its certificate by 8 s")
	}
	// At expiry, not at the next keepalive (30 s): a busy machine may add
	// scheduling delay, hence the 3 s allowance.
	if late := time.Since(cert.Leaf.NotAfter); late < 0 || late > 3*time.Second {
		t.Fatalf("disconnected %s from the certificate's expiry", late)
	}
	waitFor(t, "the expiry kick", func() bool { return e.b.Stats().ExpiryKicks.Load() == 1 })
	if e.b.Stats().WillsSent.Load() != 0 {
		t.Fatal("the expired client's Will was published")
	}
}

func TestConnectionRateLimit(t *testing.T) {
	t.Parallel()
	// A stopped clock: the bucket never refills, however slow the machine.
	frozen := time.Now()
	e := start(t, Limits{ConnPerSecondPerAddr: 1}, nil, nil, func() time.Time { return frozen }) // a burst of 2
	cert := e.leaf(e.issuer, identity.RoleDevice, "dev-1")
	for i := 0; i < 2; i++ {
		c := e.mustConnect(cert, "dev-1")
		c.Disconnect(0)
	}
	if c, err := e.paho(&cert, "dev-1"); err == nil {
		c.Disconnect(0)
		t.Fatal("a third connection in the same second got through")
	}
	if e.b.Stats().ConnRateLimited.Load() != 1 {
		t.Fatalf("rate-limited connections counted: %d", e.b.Stats().ConnRateLimited.Load())
	}
}

func startFuzz(f *testing.F) *env { return start(f, Limits{}, nil, nil) }

// TestOversizedPacket: a packet declaring more than MaxPacketSize is
// refused from its fixed header, before a buffer is allocated or the body
// read: the connection closes although the body never comes.
func TestOversizedPacket(t *testing.T) {
	t.Parallel()
	e := start(t, Limits{MaxPacketSize: 4096}, nil, nil)
	cert := e.leaf(e.issuer, identity.RoleDevice, "dev-big")
	for _, c := range []struct {
		name    string
		connect bool
		header  []byte
	}{
		{"fail/huge-connect", false, []byte{0x10, 0xff, 0xff, 0xff, 0x7f}}, // CONNECT of 256 MiB
		{"fail/big-publish", true, []byte{0x30, 0x80, 0x80, 0x40}},         // PUBLISH of 1 MiB
	} {
		t.Run(c.name, func(t *testing.T) {
			var conn *tls.Conn
			if c.connect {
				conn = e.rawConnect(t, cert, "dev-big", false)
			} else {
				var err error
				if conn, err = tls.Dial("tcp", e.addr, e.tlsConfig(&cert)); err != nil {
					t.Fatal(err)
				}
				defer conn.Close()
			}
			if _, err := conn.Write(c.header); err != nil {
				t.Fatal(err)
			}
			_ = conn.SetReadDeadline(time.Now().Add(5 * time.Second))
			_, err := io.Copy(io.Discard, conn)
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				t.Fatal("the gateway waited for the oversized body instead of refusing it")
			}
		})
	}
}

func TestServiceRole(t *testing.T) {
	t.Parallel()
	e := start(t, Limits{}, nil, nil)
	svc := e.mustConnect(e.leaf(e.issuer, identity.RoleService, "ingest"), "ingest")
	for _, f := range []string{"fleet/telemetry/#", "$share/workers/fleet/telemetry/+/temp"} {
		if got := suback(t, svc, f); got != 0 {
			t.Fatalf("service subscription %q: suback %#x", f, got)
		}
	}
	for _, f := range []string{"devices/#", "#", "$SYS/#"} {
		if got := suback(t, svc, f); got != 0x80 {
			t.Fatalf("service subscribed to %q", f)
		}
	}
	before := e.b.Stats().ACLDenied.Load()
	if tok := svc.Publish("fleet/commands/dev-a/reboot", 1, false, "now"); !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		t.Fatalf("command publish: %v", tok.Error())
	}
	if e.b.Stats().ACLDenied.Load() != before {
		t.Fatal("a service command was denied")
	}
	// A service may open more connections as <name>/<instance>, and they
	// do not take over each other's sessions.
	cert := e.leaf(e.issuer, identity.RoleService, "ingest")
	worker := e.mustConnect(cert, "ingest/worker-1")
	if !svc.IsConnectionOpen() || !worker.IsConnectionOpen() {
		t.Fatal("a second service connection took over the first")
	}
	for _, id := range []string{"ingest/", "ingest/a/b", "ingest/+", "ingestx", "other/worker-1"} {
		if _, err := e.paho(&cert, id); err == nil {
			t.Fatalf("service connected as %q", id)
		}
	}
	// A device never may: its client id is its id, exactly.
	dev := e.leaf(e.issuer, identity.RoleDevice, "dev-a")
	if _, err := e.paho(&dev, "dev-a/2"); err == nil {
		t.Fatal("a device connected with an instance suffix")
	}
}

// TestDeniedQoS1From311: MQTT 3.1.1 has no negative PUBACK. A QoS 1 publish
// the ACL refuses is acknowledged and dropped, and the client stays
// connected (bare mochi disconnects it, which makes a misconfigured device
// reconnect in a loop).
func TestDeniedQoS1From311(t *testing.T) {
	t.Parallel()
	e := start(t, Limits{}, nil, nil)
	a := e.mustConnect(e.leaf(e.issuer, identity.RoleDevice, "dev-a"), "dev-a")
	before := e.b.Stats().ACLDenied.Load()
	tok := a.Publish("devices/dev-b/up/x", 1, false, "not mine")
	if !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		t.Fatalf("the denied QoS 1 publish was not acknowledged: %v", tok.Error())
	}
	// Still connected and still served: an allowed QoS 1 publish goes
	// through. The connection's packets are handled in order, so once its
	// PUBACK is back, the denied one has been judged.
	if tok := a.Publish("devices/dev-a/kex/req", 1, false, "hello"); !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		t.Fatalf("allowed publish after the denied one: %v", tok.Error())
	}
	if n := e.b.Stats().ACLDenied.Load(); n != before+1 {
		t.Fatalf("the denial was counted %d times", n-before)
	}
	if !a.IsConnectionOpen() {
		t.Fatal("the client was disconnected")
	}
}

// TestRequireTPM: with RequireTPM, a device needs a TPM-bound certificate;
// services are not affected.
func TestRequireTPM(t *testing.T) {
	t.Parallel()
	e := startWith(t, nil, func(o *Options) { o.RequireTPM = true })
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	ek := make([]byte, 32)
	rand.Read(ek)
	c, err := e.issuer.Issue(&authority.Request{Role: identity.RoleDevice, Name: "tpm-dev", PublicKey: key.Public(), TPMEKHash: ek})
	if err != nil {
		t.Fatal(err)
	}
	bound := tls.Certificate{Certificate: [][]byte{c.Raw}, PrivateKey: key}
	e.mustConnect(bound, "tpm-dev")
	if _, err := e.paho(ptr(e.leaf(e.issuer, identity.RoleDevice, "soft-dev")), "soft-dev"); err == nil {
		t.Fatal("a device without a TPM-bound certificate got in")
	}
	if e.b.Stats().Refusals()[[2]string{"handshake", "not-tpm-bound"}] != 1 {
		t.Fatalf("refusals: %v", e.b.Stats().Refusals())
	}
	e.mustConnect(e.leaf(e.issuer, identity.RoleService, "ingest"), "ingest")
}

// TestAttachFailure: a client that sends CONNECT and resets its connection
// at once. mochi authenticates it, fails to write the CONNACK and returns
// without OnDisconnect; the gateway still drops what it kept for the
// client (its session entry, by connection too).
func TestAttachFailure(t *testing.T) {
	t.Parallel()
	e := start(t, Limits{}, nil, nil)
	cert := e.leaf(e.issuer, identity.RoleDevice, "dev-reset")
	for range 20 {
		c, err := tls.Dial("tcp", e.addr, e.tlsConfig(&cert))
		if err != nil {
			t.Fatal(err)
		}
		id := "dev-reset"
		vh := []byte{0, 4, 'M', 'Q', 'T', 'T', 4, 0x02, 0, 30}
		body := append(vh, append([]byte{0, byte(len(id))}, id...)...)
		if _, err := c.Write(append([]byte{0x10, byte(len(body))}, body...)); err != nil {
			t.Fatal(err)
		}
		_ = c.NetConn().(*net.TCPConn).SetLinger(0) // close with a reset
		c.NetConn().Close()
	}
	waitFor(t, "no session left behind", func() bool {
		e.b.mu.Lock()
		defer e.b.mu.Unlock()
		return len(e.b.clients) == 0 && len(e.b.byConn) == 0
	})
}
