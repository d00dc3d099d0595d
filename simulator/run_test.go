package simulator

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"fleetkey.dev/certs/pkidir"
	"fleetkey.dev/device-agent/agent"
	"fleetkey.dev/sessionkey"
)

// TestRunLocal: a small fleet through a local stack, with rekeying, loses
// and duplicates nothing.
func TestRunLocal(t *testing.T) {
	s := localStack(t)
	tok, err := s.Token(t.Context(), "sim-", 10)
	if err != nil {
		t.Fatal(err)
	}
	sum, err := Run(t.Context(), RunConfig{Devices: 10, Rate: 20, Duration: 3 * time.Second, Interval: 100 * time.Millisecond, Payload: 64,
		Rotation:     sessionkey.Rotation{EpochEvery: time.Second, GenerationEvery: 300 * time.Millisecond},
		Provisioning: s.Provisioning, Gateway: s.Gateway, RootCAs: s.RootCAs, Token: tok, Sink: s.Sink, Dir: s.Dir + "/devices"})
	if err != nil {
		t.Fatal(err)
	}
	if sum.Connected != 10 || sum.Published == 0 || sum.InSink != sum.Published || sum.Lost != 0 || sum.Duplicated != 0 || len(sum.Errors) > 0 {
		t.Fatalf("summary: %+v", sum)
	}
	if sum.Handshakes <= 10 {
		t.Fatalf("%d handshakes for 10 devices over 3 s with a 1 s epoch: no rekey", sum.Handshakes)
	}
}

// TestRunFastIdentities: identities minted from the fleet CA connect at
// once, each with its own certificate.
func TestRunFastIdentities(t *testing.T) {
	s := localStack(t)
	ids := mint(t, s, 30)
	seen := map[string]bool{}
	for _, c := range ids {
		seen[c.Leaf.SerialNumber.String()] = true
	}
	if len(seen) != 30 {
		t.Fatalf("%d distinct certificates for 30 devices", len(seen))
	}
	heap := filepath.Join(t.TempDir(), "heap.pprof")
	sum, err := Run(t.Context(), RunConfig{Devices: 30, Rate: 100, Duration: time.Second, Interval: 200 * time.Millisecond,
		Gateway: s.Gateway, Sink: s.Sink, Identities: ids, HeapProfile: heap})
	if err != nil {
		t.Fatal(err)
	}
	if sum.Connected != 30 || sum.InSink != sum.Published || sum.Lost != 0 || sum.Duplicated != 0 || len(sum.Errors) > 0 {
		t.Fatalf("summary: %+v", sum)
	}
	// The heap profile is a gzipped pprof protobuf.
	if b, err := os.ReadFile(heap); err != nil || len(b) < 100 || b[0] != 0x1f || b[1] != 0x8b {
		t.Fatalf("heap profile: %d bytes, %v", len(b), err)
	}
}

// BenchmarkMintIdentities: per-device keys and certificates from the
// fleet CA, in parallel (goal: 5,000/s), against the floor of one P-256
// key generation and one P-256 signature each, in the same run.
func BenchmarkMintIdentities(b *testing.B) {
	pki := b.TempDir() + "/pki"
	if _, err := pkidir.Init(pki, pkidir.InitOptions{TrustDomain: "fleet.test", Options: pkidir.Options{KDFIterations: 1000}}); err != nil {
		b.Fatal(err)
	}
	f, err := OpenFleet(pki)
	if err != nil {
		b.Fatal(err)
	}
	const batch = 1000
	b.Run("floor", func(b *testing.B) {
		signer, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		digest := sha256.Sum256([]byte("tbs"))
		for b.Loop() {
			var wg sync.WaitGroup
			next := make(chan struct{}, batch)
			for range batch {
				next <- struct{}{}
			}
			close(next)
			for range runtime.GOMAXPROCS(0) {
				wg.Go(func() {
					for range next {
						k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
						_ = k
						_, _ = signer.Sign(rand.Reader, digest[:], crypto.SHA256)
					}
				})
			}
			wg.Wait()
		}
		b.ReportMetric(float64(batch*b.N)/b.Elapsed().Seconds(), "ids/s")
	})
	b.Run("fleetkey", func(b *testing.B) {
		for b.Loop() {
			if _, err := f.Mint(batch); err != nil {
				b.Fatal(err)
			}
		}
		b.ReportMetric(float64(batch*b.N)/b.Elapsed().Seconds(), "ids/s")
	})
}

// TestGatewayRestartMidRun: the gateway stops and a new one starts on the
// same address in the middle of the run; the devices reconnect and rekey,
// and no record is lost or stored twice.
func TestGatewayRestartMidRun(t *testing.T) {
	s := localStack(t)
	ids := mint(t, s, 20)
	sum, err := Run(t.Context(), RunConfig{Devices: 20, Rate: 100, Duration: 4 * time.Second, Interval: 100 * time.Millisecond,
		Gateway: s.Gateway, Sink: s.Sink, Identities: ids, Faults: []Fault{{Name: "gateway-restart", At: 1500 * time.Millisecond, Do: func(context.Context, *FleetControl) (string, error) { return "", s.RestartGateway() }}}})
	if err != nil {
		t.Fatal(err)
	}
	if len(sum.Faults) != 1 || sum.Lost != 0 || sum.Duplicated != 0 || sum.InSink != sum.Published || len(sum.Problems) > 0 {
		t.Fatalf("summary: %+v", sum)
	}
	if sum.Handshakes < 40 {
		t.Fatalf("%d handshakes: the devices did not reconnect and rekey after the restart", sum.Handshakes)
	}
}

// localStack starts the whole stack for a test, or skips under -short.
func localStack(t *testing.T) *Stack {
	t.Helper()
	if testing.Short() {
		t.Skip("runs the whole stack")
	}
	s, err := StartLocal(t.Context(), t.TempDir(), nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Stop() })
	return s
}

// mint makes n identities from the stack's fleet CA.
func mint(t *testing.T, s *Stack, n int) []*agent.Credentials {
	t.Helper()
	f, err := OpenFleet(s.PKI)
	if err != nil {
		t.Fatal(err)
	}
	ids, err := f.Mint(n)
	if err != nil {
		t.Fatal(err)
	}
	return ids
}

// TestRunTPM: devices whose keys live in the simulated TPM enroll through
// TPM attestation, each with an EK of its own put on the allowlist first,
// and connect to a gateway that admits only TPM-bound devices. Without the
// allowlist entry, attestation refuses them.
func TestRunTPM(t *testing.T) {
	if testing.Short() {
		t.Skip("runs the whole stack")
	}
	s, err := StartLocalWith(t.Context(), t.TempDir(), nil, LocalOptions{RequireTPM: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Stop() })
	tok, err := s.Token(t.Context(), "sim-", 20)
	if err != nil {
		t.Fatal(err)
	}
	var ekMu sync.Mutex
	eks := map[string]bool{}
	allow := func(ctx context.Context, hash []byte) error {
		ekMu.Lock()
		eks[string(hash)] = true
		ekMu.Unlock()
		return s.AllowEK(ctx, hash)
	}
	// TPM attestation takes a second or more per device on a loaded box;
	// a device not ready when the telemetry phase ends is a problem of
	// the run, so the phase leaves room for it.
	cfg := RunConfig{Devices: 4, Rate: 20, Duration: 3 * time.Second, Interval: 200 * time.Millisecond, TPM: "sim", AllowEK: allow,
		Provisioning: s.Provisioning, Gateway: s.Gateway, RootCAs: s.RootCAs, Token: tok, Sink: s.Sink, Dir: t.TempDir()}
	sum, err := Run(t.Context(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	if sum.Connected != 4 || len(sum.Problems) > 0 || sum.InSink != sum.Published || sum.Published == 0 {
		t.Fatalf("summary: %+v", sum)
	}
	if len(eks) != 4 {
		t.Fatalf("%d distinct EKs for 4 devices", len(eks))
	}
	// An EK that is not on the allowlist: attestation refuses the device.
	cfg.AllowEK = func(context.Context, []byte) error { return nil }
	cfg.Devices, cfg.Dir = 1, t.TempDir()
	sum, err = Run(t.Context(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	if sum.Connected != 0 || len(sum.Problems) == 0 {
		t.Fatalf("a device with an unknown EK got in: %+v", sum)
	}
	var refused bool
	for reason := range sum.Errors {
		refused = refused || strings.Contains(reason, "enroll")
	}
	if !refused {
		t.Fatalf("errors: %v; want the enrollment refused", sum.Errors)
	}
}

// TestRunTargetMQTT: plain MQTT over mTLS (what any broker takes), against
// the gateway with fkx1 off: every record acknowledged reaches the
// service, in the gateway's fleet/telemetry/ topics.
func TestRunTargetMQTT(t *testing.T) {
	if testing.Short() {
		t.Skip("runs the whole stack")
	}
	s, err := StartLocalWith(t.Context(), t.TempDir(), nil, LocalOptions{PlaintextTelemetry: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Stop() })
	svc, err := s.Service()
	if err != nil {
		t.Fatal(err)
	}
	ids := mint(t, s, 20)
	sum, err := Run(t.Context(), RunConfig{Devices: 20, Rate: 100, Duration: 2 * time.Second, Interval: 50 * time.Millisecond, Target: TargetMQTT,
		Gateway: s.Gateway, Identities: ids, Service: &svc, ServiceTopic: "fleet/telemetry/+/+", Channel: "a,b"})
	if err != nil {
		t.Fatal(err)
	}
	if sum.Connected != 20 || sum.Published == 0 || sum.Acked != sum.Published || sum.Received != sum.Published || len(sum.Problems) > 0 {
		t.Fatalf("summary: %+v", sum)
	}
	if _, ok := sum.Phases[PhaseFKX1]; ok {
		t.Fatal("fkx1 measured on plain MQTT")
	}
}

// TestRunRefusals: a run that cannot be what was asked for says why, before
// it starts.
func TestRunRefusals(t *testing.T) {
	ok := RunConfig{Devices: 1, Rate: 1, Interval: time.Second, Gateway: "localhost:8883", Dir: t.TempDir()}
	for want, change := range map[string]func(*RunConfig){
		"must be positive":     func(c *RunConfig) { c.Devices = 0 },
		"1 identities for 2":   func(c *RunConfig) { c.Devices, c.Identities = 2, make([]*agent.Credentials, 1) },
		"only \"sim\"":         func(c *RunConfig) { c.TPM = "/dev/tpmrm0" },
		"a provisioning admin": func(c *RunConfig) { c.TPM = "sim" },
		"target \"amqp\"":      func(c *RunConfig) { c.Target = "amqp" },
		"not \"kex\"":          func(c *RunConfig) { c.Channel = "temp,kex" },
		"one topic level":      func(c *RunConfig) { c.Channel = "a/b" },
		"the limit is 60,000":  func(c *RunConfig) { c.Template = strings.Repeat("x", 60_001) },
		"want host:port":       func(c *RunConfig) { c.Gateway = "nowhere" },
		"Dir is required":      func(c *RunConfig) { c.Dir = "" },
	} {
		cfg := ok
		change(&cfg)
		if _, err := Run(t.Context(), cfg); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%q: %v", want, err)
		}
	}
}
