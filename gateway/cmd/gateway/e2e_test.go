package main

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"github.com/smallstep/pkcs7"

	"fleetkey.dev/certs/pkidir"
)

// TestRevocationEndToEnd runs the real provisioning service and the real
// gateway as processes: a device enrolls over EST, connects over mTLS,
// an operator revokes it with the provisioning CLI, and the gateway, which
// follows the provisioning feed, disconnects it within a second.
func TestRevocationEndToEnd(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs both services")
	}
	t.Parallel()
	goTool, err := exec.LookPath("go")
	if err != nil {
		t.Skip("the go tool is not on PATH; it builds the services under test")
	}
	dir := t.TempDir()
	bin := func(pkg, name string) string {
		out := filepath.Join(dir, name)
		cmd := exec.Command(goTool, "build", "-o", out, pkg)
		if b, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("building %s (needs the go.work workspace): %v\n%s", pkg, err, b)
		}
		return out
	}
	provBin, gwBin := bin("fleetkey.dev/provisioning/cmd/provisioning", "provisioning"), bin(".", "gateway")
	pass := "end-to-end test passphrase"
	pki, data := filepath.Join(dir, "pki"), filepath.Join(dir, "data")
	if _, err := pkidir.Init(pki, pkidir.InitOptions{TrustDomain: "fleet.test", Passphrase: &pkidir.Passphrase{Secret: []byte(pass), Source: "test"},
		Options: pkidir.Options{KDFIterations: 10000}}); err != nil {
		t.Fatal(err)
	}
	env := append(os.Environ(), pkidir.EnvPassphrase+"="+pass)
	run := func(name string, args ...string) string {
		cmd := exec.Command(name, args...)
		cmd.Env = env
		out, err := cmd.Output()
		if err != nil {
			t.Fatalf("%s %s: %v", filepath.Base(name), strings.Join(args, " "), err)
		}
		return strings.TrimSpace(string(out))
	}
	start := func(name string, args ...string) string {
		fifo := filepath.Join(dir, filepath.Base(name)+".addr")
		if err := syscall.Mkfifo(fifo, 0o600); err != nil {
			t.Fatal(err)
		}
		cmd := exec.Command(name, append(args, "--listen", "127.0.0.1:0", "--metrics-listen", "off", "--addr-file", fifo)...)
		cmd.Env = env
		cmd.Stderr = io.Discard
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cmd.Process.Signal(syscall.SIGTERM); cmd.Wait() })
		got := make(chan []byte, 1)
		go func() { b, _ := os.ReadFile(fifo); got <- b }()
		select {
		case b := <-got:
			return strings.TrimSpace(string(b))
		case <-time.After(30 * time.Second):
			t.Fatalf("%s did not start", filepath.Base(name))
		}
		return ""
	}
	token := run(provBin, "token", "create", "--data", data, "--prefix", "e2e-", "--max-uses", "5", "--expires", "1h")
	provAddr := start(provBin, "serve", "--pki", pki, "--data", data)
	provURL := "https://localhost:" + provAddr[strings.LastIndex(provAddr, ":")+1:]

	// Enroll over EST.
	bundle, err := pkidir.LoadBundle(pki)
	if err != nil {
		t.Fatal(err)
	}
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	csr, _ := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: "e2e-0001"}}, key)
	req, _ := http.NewRequest("POST", provURL+"/.well-known/est/simpleenroll", strings.NewReader(base64.StdEncoding.EncodeToString(csr)))
	req.Header.Set("Content-Type", "application/pkcs10")
	req.Header.Set("Authorization", "Bearer "+token)
	hc := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: bundle.RootPool()}}}
	resp, err := hc.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("enroll: %d %s", resp.StatusCode, body)
	}
	der, _ := base64.StdEncoding.DecodeString(string(bytes.ReplaceAll(bytes.ReplaceAll(body, []byte("\r"), nil), []byte("\n"), nil)))
	p7, err := pkcs7.Parse(der)
	if err != nil {
		t.Fatal(err)
	}
	leaf := p7.Certificates[0]

	gwAddr := start(gwBin, "serve", "--pki", pki, "--provisioning", provURL)
	lost := make(chan time.Time, 1)
	opts := paho.NewClientOptions().AddBroker("tls://" + gwAddr).SetClientID("e2e-0001").SetProtocolVersion(4).SetAutoReconnect(false).
		SetTLSConfig(&tls.Config{RootCAs: bundle.RootPool(), ServerName: "localhost",
			Certificates: []tls.Certificate{{Certificate: [][]byte{leaf.Raw}, PrivateKey: key}}}).
		SetConnectionLostHandler(func(paho.Client, error) { lost <- time.Now() })
	c := paho.NewClient(opts)
	if tok := c.Connect(); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("device connect: %v", tok.Error())
	}

	revokedAt := time.Now()
	run(provBin, "device", "revoke", "e2e-0001", "--reason", "keyCompromise", "--data", data)
	select {
	case at := <-lost:
		if d := at.Sub(revokedAt); d > time.Second {
			t.Fatalf("the gateway disconnected the revoked device after %s; want within 1 s", d)
		} else {
			t.Logf("revoked device disconnected %s after the CLI revoked it", d)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the revoked device was still connected after 10 s")
	}
	again := paho.NewClient(opts)
	if tok := again.Connect(); tok.WaitTimeout(10*time.Second) && tok.Error() == nil {
		again.Disconnect(0)
		t.Fatal("the revoked device reconnected")
	}
}
