package tpm_test

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"fleetkey.dev/certs/tpm"
	_ "fleetkey.dev/certs/tpm/tpmsim"
)

// The simulator is one process-wide TPM; the tests share it in turn.
var simMu sync.Mutex

func openSim(t *testing.T) *tpm.Device {
	t.Helper()
	simMu.Lock()
	d, err := tpm.Open("sim")
	if err != nil {
		simMu.Unlock()
		t.Fatalf("opening the TPM simulator: %v", err)
	}
	t.Cleanup(func() { d.Close(); simMu.Unlock() })
	return d
}

func TestDeviceKeySigns(t *testing.T) {
	d := openSim(t)
	blob, pub, err := d.CreateDeviceKey()
	if err != nil {
		t.Fatal(err)
	}
	// The blob is all the state directory keeps; a signer comes back
	// from it.
	s, err := d.Signer(&tpm.KeyBlob{Public: bytes.Clone(blob.Public), Private: bytes.Clone(blob.Private)})
	if err != nil {
		t.Fatal(err)
	}
	if !s.Public().(*ecdsa.PublicKey).Equal(pub) {
		t.Fatal("the reloaded key is another key")
	}
	digest := sha256.Sum256([]byte("hello from inside the TPM"))
	sig, err := s.Sign(rand.Reader, digest[:], crypto.SHA256)
	if err != nil {
		t.Fatal(err)
	}
	if !ecdsa.VerifyASN1(pub, digest[:], sig) {
		t.Fatal("signature does not verify")
	}
	// Concurrent use, as crypto/tls and fkx1 may do.
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for i := 0; i < 8; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if sig, err := s.Sign(rand.Reader, digest[:], crypto.SHA256); err != nil || !ecdsa.VerifyASN1(pub, digest[:], sig) {
				errs <- err
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatalf("concurrent signature: %v", err)
	}
	// Only SHA-256 digests.
	if _, err := s.Sign(rand.Reader, digest[:], crypto.SHA384); err == nil {
		t.Fatal("signed with the wrong hash")
	}
}

func TestBlobRefusals(t *testing.T) {
	d := openSim(t)
	blob, _, err := d.CreateDeviceKey()
	if err != nil {
		t.Fatal(err)
	}
	for name, b := range map[string]*tpm.KeyBlob{
		"trailing bytes after the public area":  {Public: append(bytes.Clone(blob.Public), 0), Private: blob.Private},
		"trailing bytes after the private area": {Public: blob.Public, Private: append(bytes.Clone(blob.Private), 0)},
		"truncated public area":                 {Public: blob.Public[:len(blob.Public)-3], Private: blob.Private},
		"empty":                                 {},
	} {
		if _, err := d.Signer(b); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	// A private area tampered with does not load.
	bad := &tpm.KeyBlob{Public: blob.Public, Private: bytes.Clone(blob.Private)}
	bad.Private[len(bad.Private)-1] ^= 1
	s, err := d.Signer(bad)
	if err != nil {
		t.Fatal(err)
	}
	digest := sha256.Sum256(nil)
	if _, err := s.Sign(rand.Reader, digest[:], crypto.SHA256); err == nil || !strings.Contains(err.Error(), "loading a key") {
		t.Fatalf("a tampered private area: %v", err)
	}
}

func TestOpenRefusals(t *testing.T) {
	for spec, want := range map[string]string{
		"/nonexistent/tpmrm0":          "no such file",
		"swtpm:unix:/nonexistent/sock": "no such file",
		"swtpm:tcp:127.0.0.1:1":        "connection refused",
		"carrier-pigeon":               "want /dev/tpmrm0",
	} {
		if _, err := tpm.Open(spec); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("--tpm %s: %v; want %q", spec, err, want)
		}
	}
}

// TestMTLSWithTPMKey: crypto/tls signs the client's handshake with the
// TPM-held key.
func TestMTLSWithTPMKey(t *testing.T) {
	d := openSim(t)
	blob, pub, err := d.CreateDeviceKey()
	if err != nil {
		t.Fatal(err)
	}
	signer, err := d.Signer(blob)
	if err != nil {
		t.Fatal(err)
	}
	caKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	caTmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "ca"}, IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour)}
	caDER, _ := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, caKey.Public(), caKey)
	ca, _ := x509.ParseCertificate(caDER)
	leafDER, err := x509.CreateCertificate(rand.Reader, &x509.Certificate{SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "dev"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), DNSNames: []string{"localhost"},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth, x509.ExtKeyUsageServerAuth}, KeyUsage: x509.KeyUsageDigitalSignature},
		ca, pub, caKey)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(ca)
	srvKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader) // the client is under test; any server key does
	srvDER, _ := x509.CreateCertificate(rand.Reader, &x509.Certificate{SerialNumber: big.NewInt(3), DNSNames: []string{"localhost"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}},
		ca, srvKey.Public(), caKey)
	srvCert := tls.Certificate{Certificate: [][]byte{srvDER}, PrivateKey: srvKey}
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{srvCert}, ClientAuth: tls.RequireAndVerifyClientCert, ClientCAs: pool})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	got := make(chan error, 2)
	go func() {
		for i := 0; i < 2; i++ {
			c, err := ln.Accept()
			if err == nil {
				err = c.(*tls.Conn).Handshake()
				c.Close()
			}
			got <- err
		}
	}()
	for _, version := range []uint16{tls.VersionTLS13, tls.VersionTLS12} {
		c, err := tls.DialWithDialer(&net.Dialer{Timeout: 10 * time.Second}, "tcp", ln.Addr().String(), &tls.Config{
			MinVersion: version, MaxVersion: version, RootCAs: pool, ServerName: "localhost",
			Certificates: []tls.Certificate{{Certificate: [][]byte{leafDER}, PrivateKey: signer}}})
		if err != nil {
			t.Fatalf("mTLS with the TPM key: %v", err)
		}
		c.Close()
	}
	for i := 0; i < 2; i++ {
		if err := <-got; err != nil {
			t.Fatalf("server side: %v", err)
		}
	}
}

// TestChangeEndorsementSeed: a new endorsement seed gives the TPM a new
// EK, and keys made under the SRK before it still sign.
func TestChangeEndorsementSeed(t *testing.T) {
	d := openSim(t)
	key, pub, err := d.CreateDeviceKey()
	if err != nil {
		t.Fatal(err)
	}
	before, err := d.EK()
	if err != nil {
		t.Fatal(err)
	}
	if err := d.ChangeEndorsementSeed(); err != nil {
		t.Fatal(err)
	}
	after, err := d.EK()
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Equal(before.Public, after.Public) {
		t.Fatal("the EK did not change with the endorsement seed")
	}
	s, err := d.Signer(key)
	if err != nil {
		t.Fatal(err)
	}
	digest := sha256.Sum256([]byte("after ChangeEPS"))
	sig, err := s.Sign(rand.Reader, digest[:], crypto.SHA256)
	if err != nil || !ecdsa.VerifyASN1(pub, digest[:], sig) {
		t.Fatalf("a device key made before ChangeEPS no longer signs: %v", err)
	}
}
