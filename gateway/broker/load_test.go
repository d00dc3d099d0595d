package broker

import (
	"bufio"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/hooks/auth"
	"github.com/mochi-mqtt/server/v2/listeners"

	"fleetkey.dev/certs/authority"
	"fleetkey.dev/certs/identity"
	"fleetkey.dev/certs/pkidir"
)

// The load benchmark runs the server under test in a child process (this
// test binary, re-executed), so that its resident memory can be read on
// its own, and drives it from this process with raw MQTT-over-TLS clients.

const benchServeEnv = "FLEETKEY_BENCH_SERVE"

func TestMain(m *testing.M) {
	if kind := os.Getenv(benchServeEnv); kind != "" {
		os.Exit(benchServe(kind, os.Getenv("FLEETKEY_BENCH_PKI")))
	}
	os.Exit(m.Run())
}

// benchServe runs the fleetkey broker or bare mochi (same TLS: TLS 1.2+,
// client certificates required and verified against the fleet CAs; no
// hooks but mochi's allow-all, which it needs to let anyone in), prints
// "ADDR host:port", and serves until its stdin closes.
func benchServe(kind, pki string) int {
	bundle, err := pkidir.LoadBundle(pki)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	cert, err := tls.LoadX509KeyPair(filepath.Join(pki, "gateway.crt"), filepath.Join(pki, "gateway.key"))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	switch kind {
	case "fleetkey", "fleetkey-fkx":
		// As `gateway serve` runs it: fkx1 on, with its sink.
		b, cleanup, err := serveFKX(ctx, Options{Bundle: bundle, Certificate: cert, Limits: Limits{ConnPerSecondPerAddr: 1 << 20}})
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		defer cleanup()
		go b.Serve(ctx, ln)
	case "fleetkey-plain":
		b, err := New(Options{Bundle: bundle, Certificate: cert, Limits: Limits{ConnPerSecondPerAddr: 1 << 20}, PlaintextTelemetry: true})
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		go b.Serve(ctx, ln)
	case "mochi":
		addr := ln.Addr().String()
		ln.Close()
		cas := x509.NewCertPool()
		for _, c := range bundle.Issuing() {
			cas.AddCert(c)
		}
		s := mqtt.New(&mqtt.Options{Logger: slog.New(slog.DiscardHandler)})
		_ = s.AddHook(new(auth.AllowHook), nil)
		_ = s.AddListener(listeners.NewTCP(listeners.Config{ID: "tls", Address: addr, TLSConfig: &tls.Config{
			MinVersion: tls.VersionTLS12, Certificates: []tls.Certificate{cert}, ClientAuth: tls.RequireAndVerifyClientCert, ClientCAs: cas}}))
		if err := s.Serve(); err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		ln = &fixedAddr{addr}
		defer s.Close()
	default:
		fmt.Fprintf(os.Stderr, "unknown server kind %q\n", kind)
		return 2
	}
	if path := os.Getenv("FLEETKEY_BENCH_CPUPROFILE"); path != "" {
		if f, err := os.Create(path); err == nil {
			_ = pprof.StartCPUProfile(f)
			defer pprof.StopCPUProfile()
		}
	}
	fmt.Printf("ADDR %s\n", ln.Addr().String())
	_, _ = io.Copy(io.Discard, os.Stdin)
	return 0
}

type fixedAddr struct{ a string }

func (f *fixedAddr) Accept() (net.Conn, error) { return nil, net.ErrClosed }
func (f *fixedAddr) Close() error              { return nil }
func (f *fixedAddr) Addr() net.Addr            { a, _ := net.ResolveTCPAddr("tcp", f.a); return a }

// benchFleet is a PKI with N device certificates, made once per run.
type benchFleet struct {
	pki   string
	roots *x509.CertPool
	certs []tls.Certificate
	iss   *authority.Issuer
}

func newBenchFleet(b *testing.B, n int) *benchFleet {
	pki := filepath.Join(b.TempDir(), "pki")
	pass := &pkidir.Passphrase{Secret: []byte("load benchmark passphrase"), Source: "bench"}
	if _, err := pkidir.Init(pki, pkidir.InitOptions{TrustDomain: "fleet.test", Passphrase: pass, Options: pkidir.Options{KDFIterations: 1000}}); err != nil {
		b.Fatal(err)
	}
	ca, err := pkidir.LoadIssuing(pki, pass)
	if err != nil {
		b.Fatal(err)
	}
	bundle, _ := pkidir.LoadBundle(pki)
	iss := &authority.Issuer{CA: ca, Policy: authority.Policy{TrustDomain: "fleet.test"}}
	// The clients trust the issuing CA directly: they share the machine with
	// the server, and re-checking the root's P-384 signature at every
	// handshake (1.4 ms) would measure the clients, not the server.
	roots := x509.NewCertPool()
	for _, c := range bundle.Issuing() {
		roots.AddCert(c)
	}
	f := &benchFleet{pki: pki, roots: roots, iss: iss}
	for i := 0; i < n; i++ {
		key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		c, err := iss.Issue(&authority.Request{Role: identity.RoleDevice, Name: fmt.Sprintf("load-%05d", i), PublicKey: key.Public()})
		if err != nil {
			b.Fatal(err)
		}
		// Devices present their leaf alone: EST hands them only the leaf
		// (the CA certificates come from cacerts), and the gateway builds
		// the chain from its bundle.
		f.certs = append(f.certs, tls.Certificate{Certificate: [][]byte{c.Raw}, PrivateKey: key})
	}
	return f
}

// serverProc is the server under test, in its own process.
type serverProc struct {
	cmd   *exec.Cmd
	stdin io.WriteCloser
	addr  string
}

func startServer(b *testing.B, kind, pki string) *serverProc {
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), benchServeEnv+"="+kind, "FLEETKEY_BENCH_PKI="+pki)
	stdin, _ := cmd.StdinPipe()
	stdout, _ := cmd.StdoutPipe()
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	line, err := bufio.NewReader(stdout).ReadString('\n')
	if err != nil || !strings.HasPrefix(line, "ADDR ") {
		b.Fatalf("server did not start: %q %v", line, err)
	}
	return &serverProc{cmd: cmd, stdin: stdin, addr: strings.TrimSpace(line[5:])}
}

func (p *serverProc) rssKB(b *testing.B) int64 {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", p.cmd.Process.Pid))
	if err != nil {
		b.Fatal(err)
	}
	for _, l := range strings.Split(string(data), "\n") {
		if v, ok := strings.CutPrefix(l, "VmRSS:"); ok {
			n, _ := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
			return n
		}
	}
	return 0
}

func (p *serverProc) stop() { p.stdin.Close(); p.cmd.Wait() }

// mqttConnect opens one MQTT 3.1.1 session over TLS.
func mqttConnect(addr string, cfg *tls.Config, id string) (*tls.Conn, error) {
	c, err := tls.DialWithDialer(&net.Dialer{Timeout: 30 * time.Second}, "tcp", addr, cfg)
	if err != nil {
		return nil, err
	}
	body := append([]byte{0, 4, 'M', 'Q', 'T', 'T', 4, 0x02, 0, 120, 0, byte(len(id))}, id...)
	if _, err := c.Write(append([]byte{0x10, byte(len(body))}, body...)); err != nil {
		c.Close()
		return nil, err
	}
	ack := make([]byte, 4)
	_ = c.SetReadDeadline(time.Now().Add(30 * time.Second))
	if _, err := io.ReadFull(c, ack); err != nil || ack[3] != 0 {
		c.Close()
		return nil, fmt.Errorf("CONNACK % x: %v", ack, err)
	}
	_ = c.SetReadDeadline(time.Time{})
	return c, nil
}

func publishPacket(topic string, payload []byte, qos byte, id uint16) []byte {
	var body []byte
	body = binary.BigEndian.AppendUint16(body, uint16(len(topic)))
	body = append(body, topic...)
	if qos > 0 {
		body = binary.BigEndian.AppendUint16(body, id)
	}
	body = append(body, payload...)
	pkt := []byte{0x30 | qos<<1}
	for n := len(body); ; {
		d := byte(n % 128)
		n /= 128
		if n > 0 {
			d |= 0x80
		}
		pkt = append(pkt, d)
		if n == 0 {
			break
		}
	}
	return append(pkt, body...)
}

// BenchmarkLoad connects 5,000 mTLS clients on an open-model schedule and
// measures connections/s, connect latency from each connection's intended
// start (no coordinated omission), the server's RSS per connection, and
// QoS 0 and QoS 1 publishes/s of 256-byte payloads; for bare mochi (the
// peer) and for the fleetkey gateway, in the same run.
func BenchmarkLoad(b *testing.B) {
	const n, rate, inflight = 5000, 1500.0, 256
	fleet := newBenchFleet(b, n)
	for _, kind := range []string{"mochi", "fleetkey"} {
		b.Run(kind, func(b *testing.B) {
			for b.Loop() {
				srv := startServer(b, kind, fleet.pki)
				base := srv.rssKB(b)
				conns := make([]*tls.Conn, n)
				lat := make([]time.Duration, n)
				sem := make(chan struct{}, inflight)
				var wg sync.WaitGroup
				var failed sync.Map
				start := time.Now()
				for i := 0; i < n; i++ {
					intended := start.Add(time.Duration(float64(i) / rate * float64(time.Second)))
					time.Sleep(time.Until(intended)) // the open-model schedule: start i at its intended time
					wg.Add(1)
					go func(i int) {
						defer wg.Done()
						sem <- struct{}{}
						defer func() { <-sem }()
						// Clients offer plain X25519, as device TLS stacks do today;
						// Go's default hybrid X25519MLKEM768 would add an ML-KEM
						// encapsulation to both sides of every handshake.
						cfg := &tls.Config{RootCAs: fleet.roots, ServerName: "localhost", Certificates: []tls.Certificate{fleet.certs[i]},
							CurvePreferences: []tls.CurveID{tls.X25519}}
						c, err := mqttConnect(srv.addr, cfg, fmt.Sprintf("load-%05d", i))
						lat[i] = time.Since(intended)
						if err != nil {
							failed.Store(i, err)
							return
						}
						conns[i] = c
					}(i)
				}
				wg.Wait()
				elapsed := time.Since(start)
				nfail := 0
				failed.Range(func(k, v any) bool {
					if nfail == 0 {
						b.Logf("first failure: %v", v)
					}
					nfail++
					return true
				})
				rss := srv.rssKB(b)
				slices.Sort(lat)
				b.ReportMetric(float64(n-nfail)/elapsed.Seconds(), "conn/s")
				b.ReportMetric(float64(lat[n/2].Microseconds())/1000, "p50_ms")
				b.ReportMetric(float64(lat[n*99/100].Microseconds())/1000, "p99_ms")
				b.ReportMetric(float64(rss-base)/float64(n-nfail), "KB/conn")
				b.ReportMetric(float64(nfail), "failed")
				b.ReportMetric(publishRate(b, conns[:100], 0), "qos0_msg/s")
				b.ReportMetric(publishRate(b, conns[100:200], 1), "qos1_msg/s")
				for _, c := range conns {
					if c != nil {
						c.Close()
					}
				}
				srv.stop()
			}
		})
	}
}

// publishRate has each connection publish 500 messages of 256 bytes to its
// own kex/req topic and returns the total per second. QoS 1 waits for each
// PUBACK; QoS 0 ends with a PINGREQ whose PINGRESP proves the broker read
// everything before it.
func publishRate(b *testing.B, conns []*tls.Conn, qos byte) float64 {
	const per = 500
	payload := make([]byte, 256)
	var wg sync.WaitGroup
	start := time.Now()
	for i, c := range conns {
		if c == nil {
			continue
		}
		wg.Add(1)
		go func(i int, c *tls.Conn) {
			defer wg.Done()
			topic := fmt.Sprintf("devices/load-%05d/kex/req", i+int(qos)*100)
			w := bufio.NewWriter(c)
			ack := make([]byte, 4)
			_ = c.SetDeadline(time.Now().Add(60 * time.Second))
			for m := 0; m < per; m++ {
				_, _ = w.Write(publishPacket(topic, payload, qos, uint16(m+1)))
				if qos == 1 {
					_ = w.Flush()
					if _, err := io.ReadFull(c, ack); err != nil || ack[0] != 0x40 {
						b.Errorf("PUBACK: % x %v", ack, err)
						return
					}
				}
			}
			_, _ = w.Write([]byte{0xc0, 0x00})
			_ = w.Flush()
			if qos == 0 {
				if _, err := io.ReadFull(c, ack[:2]); err != nil || ack[0] != 0xd0 {
					b.Errorf("PINGRESP: % x %v", ack[:2], err)
				}
			}
		}(i, c)
	}
	wg.Wait()
	return float64(len(conns)*per) / time.Since(start).Seconds()
}
