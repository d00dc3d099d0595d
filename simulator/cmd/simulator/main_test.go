package main

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestFlagRefusals: flags that cannot go together, or a metrics URL that
// is none, are refused before anything starts, with what to do instead.
func TestFlagRefusals(t *testing.T) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test root"}, NotBefore: time.Now(), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	ca := filepath.Join(t.TempDir(), "root.crt")
	if err := os.WriteFile(ca, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	for want, args := range map[string][]string{
		"--processes is a way to run the --local stack":  {"--processes", "--gateway", "127.0.0.1:1", "--ca", ca},
		"--metrics is for a gateway run elsewhere":       {"--local", "--metrics", "http://127.0.0.1:9102/metrics"},
		"want the gateway's metrics URL":                 {"--gateway", "127.0.0.1:1", "--ca", ca, "--identities", "fast", "--metrics", "ftp://gw/metrics", "--dir", dir},
		"want the gateway's metrics URL, http://HOST:91": {"--gateway", "127.0.0.1:1", "--ca", ca, "--identities", "fast", "--metrics", "gw:9102", "--dir", dir},
	} {
		if err := run(t.Context(), args); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("run %q: %v, want %q", args, err, want)
		}
	}
	if err := local(t.Context(), []string{"--processes", "--cpuprofile", filepath.Join(dir, "cpu.pprof")}); err == nil || !strings.Contains(err.Error(), "not with --processes") {
		t.Errorf("local --processes --cpuprofile: %v", err)
	}
}
