package tpm_test

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"testing"
	"time"

	"fleetkey.dev/certs/tpm"
	"fleetkey.dev/certs/tpm/tpmsim"
)

// BenchmarkSign: one ECDSA P-256 signature by the TPM-held device key
// (load under the SRK, sign, flush), on the in-process simulator and on
// swtpm over its Unix socket, against the same signature in software
// (the floor) in the same run.
func BenchmarkSign(b *testing.B) {
	digest := sha256.Sum256([]byte("benchmark"))
	b.Run("floor", func(b *testing.B) {
		k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		for b.Loop() {
			if _, err := k.Sign(rand.Reader, digest[:], crypto.SHA256); err != nil {
				b.Fatal(err)
			}
		}
	})
	for _, name := range []string{"sim", "swtpm"} {
		b.Run(name, func(b *testing.B) {
			d := openBench(b, name)
			blob, _, err := d.CreateDeviceKey()
			if err != nil {
				b.Fatal(err)
			}
			s, err := d.Signer(blob)
			if err != nil {
				b.Fatal(err)
			}
			for b.Loop() {
				if _, err := s.Sign(rand.Reader, digest[:], crypto.SHA256); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

func openBench(b *testing.B, name string) *tpm.Device {
	spec := "sim"
	if name == "swtpm" {
		spec = tpmsim.StartSWTPM(b, false)
	} else {
		simMu.Lock()
		b.Cleanup(simMu.Unlock)
	}
	d, err := tpm.Open(spec)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { d.Close() })
	return d
}

// BenchmarkMTLSConnect: a full TLS 1.3 mutual handshake on loopback with
// the client's key in software (floor) and in the TPM (simulator, swtpm),
// in the same run.
func BenchmarkMTLSConnect(b *testing.B) {
	caKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "ca"}, IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour)}
	caDER, _ := x509.CreateCertificate(rand.Reader, tmpl, tmpl, caKey.Public(), caKey)
	ca, _ := x509.ParseCertificate(caDER)
	pool := x509.NewCertPool()
	pool.AddCert(ca)
	leaf := func(pub crypto.PublicKey, serial int64) []byte {
		der, err := x509.CreateCertificate(rand.Reader, &x509.Certificate{SerialNumber: big.NewInt(serial), DNSNames: []string{"localhost"},
			NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
			ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth, x509.ExtKeyUsageServerAuth}}, ca, pub, caKey)
		if err != nil {
			b.Fatal(err)
		}
		return der
	}
	srvKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{leaf(srvKey.Public(), 2)}, PrivateKey: srvKey}},
		ClientAuth: tls.RequireAndVerifyClientCert, ClientCAs: pool})
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { _ = c.(*tls.Conn).Handshake(); c.Close() }()
		}
	}()
	connect := func(b *testing.B, signer crypto.Signer) {
		cert := tls.Certificate{Certificate: [][]byte{leaf(signer.Public(), 3)}, PrivateKey: signer}
		cfg := &tls.Config{RootCAs: pool, ServerName: "localhost", Certificates: []tls.Certificate{cert}, CurvePreferences: []tls.CurveID{tls.X25519}}
		for b.Loop() {
			c, err := tls.Dial("tcp", ln.Addr().String(), cfg)
			if err != nil {
				b.Fatal(err)
			}
			c.Close()
		}
	}
	b.Run("floor", func(b *testing.B) {
		k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		connect(b, k)
	})
	for _, name := range []string{"sim", "swtpm"} {
		b.Run(name, func(b *testing.B) {
			d := openBench(b, name)
			blob, _, err := d.CreateDeviceKey()
			if err != nil {
				b.Fatal(err)
			}
			s, err := d.Signer(blob)
			if err != nil {
				b.Fatal(err)
			}
			connect(b, s)
		})
	}
}
