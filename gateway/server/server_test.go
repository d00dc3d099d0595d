package server

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"fleetkey.dev/certs/authority"
	"fleetkey.dev/certs/identity"
	"fleetkey.dev/certs/pkidir"
)

// newGateway makes a fleet PKI and a gateway on it.
func newGateway(t *testing.T) (pki string, pass *pkidir.Passphrase, g *Gateway) {
	t.Helper()
	pass = &pkidir.Passphrase{Secret: []byte("gateway server test"), Source: "test"}
	pki = filepath.Join(t.TempDir(), "pki")
	if _, err := pkidir.Init(pki, pkidir.InitOptions{TrustDomain: "fleet.test", Passphrase: pass, Options: pkidir.Options{KDFIterations: 1000}}); err != nil {
		t.Fatal(err)
	}
	g, err := New(Config{PKIDir: pki, Listen: "127.0.0.1:0"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	return pki, pass, g
}

func TestServeAndMetrics(t *testing.T) {
	t.Parallel()
	pki, pass, g := newGateway(t)
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	mln, _ := net.Listen("tcp", "127.0.0.1:0")
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- g.Serve(ctx, ln, mln) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
	}()

	ca, _ := pkidir.LoadIssuing(pki, pass)
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	leaf, _ := (&authority.Issuer{CA: ca, Policy: authority.Policy{TrustDomain: "fleet.test"}}).Issue(&authority.Request{Role: identity.RoleDevice, Name: "dev-1", PublicKey: key.Public()})
	bundle, _ := pkidir.LoadBundle(pki)
	opts := paho.NewClientOptions().AddBroker("tls://" + ln.Addr().String()).SetClientID("dev-1").SetProtocolVersion(4).
		SetTLSConfig(&tls.Config{RootCAs: bundle.RootPool(), ServerName: "localhost",
			Certificates: []tls.Certificate{{Certificate: [][]byte{leaf.Raw, ca.Cert.Raw}, PrivateKey: key}}})
	c := paho.NewClient(opts)
	if tok := c.Connect(); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("connect: %v", tok.Error())
	}
	defer c.Disconnect(0)

	get := func(path string) (int, string) {
		r, err := http.Get("http://" + mln.Addr().String() + path)
		if err != nil {
			t.Fatal(err)
		}
		defer r.Body.Close()
		b, _ := io.ReadAll(r.Body)
		return r.StatusCode, string(b)
	}
	if code, body := get("/metrics"); code != 200 || !strings.Contains(body, "fleetkey_gateway_connections 1") || !strings.Contains(body, "fleetkey_gateway_handshakes_total 1") || !strings.Contains(body, "fleetkey_gateway_fkx1_records_total 0") {
		t.Fatalf("metrics: %d\n%s", code, body)
	}
	for _, p := range []string{"/healthz", "/readyz"} {
		if code, _ := get(p); code != 200 {
			t.Fatalf("%s = %d", p, code)
		}
	}
}

// plaintextMQTTPort is what the gateway refuses to listen on.
const plaintextMQTTPort = 1883

func TestConfigRefusals(t *testing.T) {
	t.Parallel()
	for _, c := range []struct {
		name, yaml, detail string
	}{
		{"fail/plaintext-port", fmt.Sprintf("listen: ':%d'\n", plaintextMQTTPort), "plaintext MQTT"},
		{"fail/listen", "listen: nowhere\n", "config listen"},
		{"fail/metrics", "metrics_listen: nowhere\n", "config metrics_listen"},
		{"fail/provisioning-http", "provisioning: http://x:8443\n", "https://"},
		{"fail/unknown-key", "lisen: ':8883'\n", "field lisen not found"},
		{"fail/conn-rate", "conn_per_second_per_addr: -1\n", "must not be negative"},
		{"fail/write-timeout", "write_timeout: -1s\n", "write_timeout must not be negative"},
	} {
		t.Run(c.name, func(t *testing.T) {
			p := filepath.Join(t.TempDir(), "c.yaml")
			os.WriteFile(p, []byte(c.yaml), 0o600)
			cfg, err := LoadConfig(p)
			if err == nil {
				err = cfg.Validate()
			}
			if err == nil || !strings.Contains(err.Error(), c.detail) {
				t.Fatalf("got %v, want %q", err, c.detail)
			}
		})
	}
	if _, err := New(Config{PKIDir: t.TempDir()}, nil); err == nil || !strings.Contains(err.Error(), "trust bundle") {
		t.Fatalf("New without a PKI: %v", err)
	}
}

// TestOfflineCRL: a service certificate revoked offline with the certs
// tooling (pkidir.Revoke + WriteCRLs, as `certs crl --revoke` does) is shut
// out by the gateway, connected or not.
func TestOfflineCRL(t *testing.T) {
	t.Parallel()
	pki, pass, g := newGateway(t)
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- g.Serve(ctx, ln, nil) }()
	defer func() { cancel(); <-done }()

	svc, err := tls.LoadX509KeyPair(filepath.Join(pki, "service.crt"), filepath.Join(pki, "service.key"))
	if err != nil {
		t.Fatal(err)
	}
	bundle, _ := pkidir.LoadBundle(pki)
	lost := make(chan struct{}, 1)
	opts := paho.NewClientOptions().AddBroker("tls://" + ln.Addr().String()).SetClientID("service").SetProtocolVersion(4).SetAutoReconnect(false).
		SetTLSConfig(&tls.Config{RootCAs: bundle.RootPool(), ServerName: "localhost", Certificates: []tls.Certificate{svc}}).
		SetConnectionLostHandler(func(paho.Client, error) { lost <- struct{}{} })
	c := paho.NewClient(opts)
	if tok := c.Connect(); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("service connect: %v", tok.Error())
	}
	leaf, _ := x509.ParseCertificate(svc.Certificate[0])
	if _, err := pkidir.Revoke(pki, []*big.Int{leaf.SerialNumber}, "keyCompromise", time.Now()); err != nil {
		t.Fatal(err)
	}
	if _, err := pkidir.WriteCRLs(pki, pass, time.Hour, pkidir.Options{}); err != nil {
		t.Fatal(err)
	}
	if n := g.ApplyCRLFiles(); n != 1 {
		t.Fatalf("applied %d serials from the CRL", n)
	}
	select {
	case <-lost:
	case <-time.After(5 * time.Second):
		t.Fatal("the revoked service stayed connected")
	}
	again := paho.NewClient(opts)
	if tok := again.Connect(); tok.WaitTimeout(10*time.Second) && tok.Error() == nil {
		again.Disconnect(0)
		t.Fatal("the revoked service reconnected")
	}
	// A damaged CRL is refused and changes nothing.
	if err := os.WriteFile(filepath.Join(pki, pkidir.CRLFile), []byte("garbage"), 0o644); err != nil {
		t.Fatal(err)
	}
	if n := g.ApplyCRLFiles(); n != 0 {
		t.Fatalf("a damaged CRL applied %d serials", n)
	}
}
