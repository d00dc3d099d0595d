package simulator

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"testing"

	"fleetkey.dev/certs/pkidir"
	gwserver "fleetkey.dev/gateway/server"
)

// TestScrapeRefusals reads a real gateway's refusal counters over its
// metrics endpoint: a client without a certificate is counted as
// handshake/no-certificate.
func TestScrapeRefusals(t *testing.T) {
	t.Parallel()
	pki := filepath.Join(t.TempDir(), "pki")
	if _, err := pkidir.Init(pki, pkidir.InitOptions{TrustDomain: "fleet.test", Options: pkidir.Options{KDFIterations: 1000}}); err != nil {
		t.Fatal(err)
	}
	gw, err := gwserver.New(gwserver.Config{PKIDir: pki, TelemetrySink: filepath.Join(t.TempDir(), "telemetry.jsonl"), Listen: "127.0.0.1:0", MetricsListen: "127.0.0.1:0"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	mln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- gw.Serve(t.Context(), ln, mln) }()
	t.Cleanup(func() {
		if err := <-served; err != nil && !errors.Is(err, t.Context().Err()) {
			t.Errorf("serve: %v", err)
		}
	})
	scrape := ScrapeRefusals(fmt.Sprintf("http://%s/metrics", mln.Addr()))
	before, err := scrape()
	if err != nil {
		t.Fatal(err)
	}
	fleet, err := OpenFleet(pki)
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	for _, c := range fleet.Bundle().Issuing() {
		roots.AddCert(c)
	}
	// TLS 1.3: the client learns of the refusal on its first read.
	c, err := tls.Dial("tcp", ln.Addr().String(), &tls.Config{RootCAs: roots, ServerName: "127.0.0.1"})
	if err == nil {
		_, err = c.Read(make([]byte, 1))
		c.Close()
	}
	if err == nil {
		t.Fatal("a client without a certificate was let in")
	}
	after, err := scrape()
	if err != nil {
		t.Fatal(err)
	}
	key := [2]string{"handshake", "no-certificate"}
	if after[key]-before[key] != 1 {
		t.Fatalf("handshake/no-certificate went %d -> %d; all: %v", before[key], after[key], after)
	}
}

// TestScrapeRefusalsRefusals: what is not a fleetkey gateway's metrics
// gets an error that says so.
func TestScrapeRefusalsRefusals(t *testing.T) {
	t.Parallel()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/other":
			fmt.Fprintln(w, "# TYPE some_counter counter\nsome_counter 3")
		case "/garbage":
			fmt.Fprintln(w, "fleetkey_gateway_refusals_total{stage=\"acl\" 1")
		default:
			http.NotFound(w, r)
		}
	}))
	defer srv.Close()
	for path, want := range map[string]string{
		"/metrics": "404 Not Found",
		"/other":   "have no fleetkey_gateway_ series",
		"/garbage": "the gateway's metrics:",
	} {
		if _, err := ScrapeRefusals(srv.URL + path)(); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%s: %v, want %q", path, err, want)
		}
	}
	if _, err := ScrapeRefusals("http://127.0.0.1:1/metrics")(); err == nil || !strings.Contains(err.Error(), "reading the gateway's metrics") {
		t.Errorf("nothing listening: %v", err)
	}
}
