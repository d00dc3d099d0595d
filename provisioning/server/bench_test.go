package server

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"database/sql"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	_ "github.com/jackc/pgx/v5/stdlib"

	"fleetkey.dev/certs/pkidir"
	"fleetkey.dev/provisioning/registry"
)

// BenchmarkEnrollHTTPS measures EST enrollments per second over keep-alive
// HTTPS with 32 concurrent clients, on SQLite and on PostgreSQL, next to
// the issuance floor (CSR signature check + x509.CreateCertificate) in the
// same run. The CSRs are made before the clock starts; each enrollment is
// a new device, so every one is a real issuance and a registry commit.
// Goal: 1,500 enrollments/s on SQLite on the 2-core machine.
func BenchmarkEnrollHTTPS(b *testing.B) {
	_, pki, passFile := newPKI(b)
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)

	b.Run("floor", func(b *testing.B) {
		iss, err := pkidir.LoadIssuing(pki, pass)
		if err != nil {
			b.Fatal(err)
		}
		der, _ := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: "floor"}}, key)
		tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "floor"}, NotBefore: time.Now(), NotAfter: time.Now().Add(time.Hour),
			KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}, BasicConstraintsValid: true}
		b.ReportAllocs()
		for b.Loop() {
			req, err := x509.ParseCertificateRequest(der)
			if err != nil || req.CheckSignature() != nil {
				b.Fatal(err)
			}
			if _, err := x509.CreateCertificate(rand.Reader, tmpl, iss.Cert, req.PublicKey, iss.Signer); err != nil {
				b.Fatal(err)
			}
		}
	})
	run := func(b *testing.B, store registry.Store) {
		cfg := Config{PKIDir: pki, PassphraseFile: passFile, Listen: "127.0.0.1:0", MetricsListen: "off",
			Limits: Limits{EnrollPerMinutePerToken: 1 << 30, EnrollPerMinutePerAddr: 1 << 30, MaxConcurrent: 1024}}
		srv, err := New(context.Background(), cfg, Options{Store: store})
		if err != nil {
			b.Fatal(err)
		}
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			b.Fatal(err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan struct{})
		go func() { srv.Serve(ctx, ln, nil); close(done) }()
		defer func() { cancel(); <-done }()
		tv, err := CreateToken(context.Background(), store, TokenRequest{MaxUses: MaxTokenUses}, time.Hour, "bench", time.Now())
		if err != nil {
			b.Fatal(err)
		}
		bodies := make([][]byte, b.N)
		prefix := hex.EncodeToString(randBytes(4))
		for i := range bodies {
			der, _ := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: fmt.Sprintf("b-%s-%07d", prefix, i)}}, key)
			bodies[i] = []byte(base64.StdEncoding.EncodeToString(der))
		}
		roots := x509.NewCertPool()
		rootPEM, _ := os.ReadFile(filepath.Join(pki, "root.crt"))
		roots.AppendCertsFromPEM(rootPEM)
		target := "https://" + ln.Addr().String() + "/.well-known/est/simpleenroll"
		var next atomic.Int64
		b.SetParallelism(16) // 32 clients on 2 cores
		b.ReportAllocs()
		b.ResetTimer()
		b.RunParallel(func(pb *testing.PB) {
			hc := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: roots, ServerName: "localhost"}, MaxIdleConnsPerHost: 1}}
			for pb.Next() {
				req, _ := http.NewRequest("POST", target, bytes.NewReader(bodies[next.Add(1)-1]))
				req.Header.Set("Content-Type", "application/pkcs10")
				req.Header.Set("Authorization", "Bearer "+tv.Token)
				r, err := hc.Do(req)
				if err != nil {
					b.Error(err)
					return
				}
				io.Copy(io.Discard, r.Body)
				r.Body.Close()
				if r.StatusCode != 200 {
					b.Errorf("status %d", r.StatusCode)
					return
				}
			}
		})
		b.StopTimer()
		b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "enroll/s")
	}
	b.Run("sqlite", func(b *testing.B) {
		store, err := registry.OpenSQLite(context.Background(), filepath.Join(b.TempDir(), "registry.db"))
		if err != nil {
			b.Fatal(err)
		}
		run(b, store)
	})
	b.Run("postgres", func(b *testing.B) {
		dsn := os.Getenv("FLEETKEY_TEST_POSTGRES")
		if dsn == "" {
			b.Skip("FLEETKEY_TEST_POSTGRES is not set")
		}
		admin, err := sql.Open("pgx", dsn)
		if err != nil {
			b.Fatal(err)
		}
		defer admin.Close()
		schema := "fk_bench_" + hex.EncodeToString(randBytes(6))
		if _, err := admin.Exec("CREATE SCHEMA " + schema); err != nil {
			b.Fatal(err)
		}
		defer admin.Exec("DROP SCHEMA " + schema + " CASCADE")
		u, _ := url.Parse(dsn)
		q := u.Query()
		q.Set("search_path", schema)
		u.RawQuery = q.Encode()
		store, err := registry.OpenPostgres(context.Background(), u.String())
		if err != nil {
			b.Fatal(err)
		}
		run(b, store)
	})
}

func randBytes(n int) []byte {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return b
}
