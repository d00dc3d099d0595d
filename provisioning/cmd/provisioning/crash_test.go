package main

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/smallstep/pkcs7"

	"fleetkey.dev/certs/pkidir"
	"fleetkey.dev/provisioning/registry"
	"fleetkey.dev/provisioning/server"
)

// TestKillDuringEnrollments: kill -9 the service in the middle of a burst
// of enrollments, start it again, and check that every certificate a
// client received is in the registry and that the registry is consistent.
func TestKillDuringEnrollments(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the binary")
	}
	t.Parallel()
	dir := t.TempDir()
	bin := filepath.Join(dir, "provisioning")
	goTool, err := exec.LookPath("go")
	if err != nil {
		t.Skip("the go tool is not on PATH; it builds the binary under test")
	}
	build := exec.Command(goTool, "build", "-o", bin, ".")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("building: %v\n%s", err, out)
	}
	pki, data := filepath.Join(dir, "pki"), filepath.Join(dir, "data")
	pass := &pkidir.Passphrase{Secret: []byte("crash test passphrase"), Source: "test"}
	if _, err := pkidir.Init(pki, pkidir.InitOptions{TrustDomain: "fleet.test", Passphrase: pass, Options: pkidir.Options{KDFIterations: 10000}}); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	store, err := server.OpenStore(ctx, server.Config{DataDir: data})
	if err != nil {
		t.Fatal(err)
	}
	tv, err := server.CreateToken(ctx, store, server.TokenRequest{MaxUses: 100000}, time.Hour, "test", time.Now())
	if err != nil {
		t.Fatal(err)
	}
	store.Close()
	roots := x509.NewCertPool()
	rootPEM, _ := os.ReadFile(filepath.Join(pki, "root.crt"))
	roots.AppendCertsFromPEM(rootPEM)

	start := func() (*exec.Cmd, string) {
		fifo := filepath.Join(dir, fmt.Sprintf("addr-%d", time.Now().UnixNano()))
		if err := syscall.Mkfifo(fifo, 0o600); err != nil {
			t.Fatal(err)
		}
		cmd := exec.Command(bin, "serve", "--pki", pki, "--data", data, "--listen", "127.0.0.1:0", "--metrics-listen", "off", "--addr-file", fifo)
		cmd.Env = append(os.Environ(), pkidir.EnvPassphrase+"="+string(pass.Secret))
		cmd.Stderr = io.Discard
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		got := make(chan []byte, 1)
		go func() { b, _ := os.ReadFile(fifo); got <- b }()
		select {
		case b := <-got:
			return cmd, strings.TrimSpace(string(b))
		case <-time.After(30 * time.Second):
			cmd.Process.Kill()
			t.Fatal("the service did not start within 30 s")
		}
		return nil, ""
	}

	// Requests are made before the burst, so the burst is all enrollment.
	const clients, perClient = 16, 40
	bodies := make([][][]byte, clients)
	for c := range bodies {
		for i := 0; i < perClient; i++ {
			key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
			der, _ := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: fmt.Sprintf("crash-%02d-%03d", c, i)}}, key)
			bodies[c] = append(bodies[c], []byte(base64.StdEncoding.EncodeToString(der)))
		}
	}

	cmd, addr := start()
	var mu sync.Mutex
	var received []*x509.Certificate
	killAt := clients * perClient / 4
	killed := make(chan struct{})
	var once sync.Once
	var wg sync.WaitGroup
	for c := 0; c < clients; c++ {
		wg.Add(1)
		go func(c int) {
			defer wg.Done()
			hc := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: roots, ServerName: "localhost"}}}
			for _, body := range bodies[c] {
				req, _ := http.NewRequest("POST", "https://"+addr+"/.well-known/est/simpleenroll", bytes.NewReader(body))
				req.Header.Set("Content-Type", "application/pkcs10")
				req.Header.Set("Authorization", "Bearer "+tv.Token)
				r, err := hc.Do(req)
				if err != nil {
					return // the service is gone
				}
				b, _ := io.ReadAll(r.Body)
				r.Body.Close()
				if r.StatusCode != 200 {
					continue
				}
				der, err := base64.StdEncoding.DecodeString(strings.NewReplacer("\r", "", "\n", "").Replace(string(b)))
				if err != nil {
					t.Errorf("bad answer: %v", err)
					return
				}
				p7, err := pkcs7.Parse(der)
				if err != nil {
					t.Errorf("bad answer: %v", err)
					return
				}
				mu.Lock()
				received = append(received, p7.Certificates[0])
				if len(received) == killAt {
					once.Do(func() { cmd.Process.Signal(syscall.SIGKILL); close(killed) })
				}
				mu.Unlock()
			}
		}(c)
	}
	wg.Wait()
	select {
	case <-killed:
	default:
		t.Fatalf("only %d enrollments before the burst ended; the kill never happened", len(received))
	}
	_ = cmd.Wait()
	t.Logf("killed the service after %d certificates were handed out", len(received))

	cmd2, _ := start()
	defer func() { cmd2.Process.Signal(syscall.SIGTERM); cmd2.Wait() }()
	store, err = server.OpenStore(ctx, server.Config{DataDir: data})
	if err != nil {
		t.Fatal(err)
	}
	defer store.Close()
	for _, c := range received {
		rc, err := store.GetCertificate(ctx, c.SerialNumber.Text(16))
		if err != nil {
			t.Fatalf("certificate %x (%s) was handed out but is not in the registry: %v", c.SerialNumber, c.Subject.CommonName, err)
		}
		if rc.DeviceID != c.Subject.CommonName || !bytes.Equal(rc.DER, c.Raw) {
			t.Fatalf("registry disagrees about %x", c.SerialNumber)
		}
	}
	// Consistency: every device points at a certificate of its own, and the
	// token paid for exactly the certificates that exist.
	devs, err := store.ListDevices(ctx, registry.ListOptions{Limit: 1000})
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range devs {
		certs, err := store.ListCertificates(ctx, d.ID)
		if err != nil || len(certs) != 1 || certs[0].Serial != d.Serial {
			t.Fatalf("device %s: serial %s, certificates %+v, %v", d.ID, d.Serial, certs, err)
		}
	}
	tok, err := store.GetToken(ctx, tv.ID)
	if err != nil {
		t.Fatal(err)
	}
	if tok.Uses != len(devs) || len(devs) < len(received) {
		t.Fatalf("token uses %d, devices %d, certificates received %d", tok.Uses, len(devs), len(received))
	}
}
