// Package simulator drives fleets of virtual devices through fleetkey:
// each runs the real device agent (enrollment over EST, mTLS, fkx1,
// encrypted telemetry) against a real stack, and the run is measured from
// each device's intended start time.
package simulator

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	mathrand "math/rand/v2"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"fleetkey.dev/certs/pkidir"
	gwserver "fleetkey.dev/gateway/server"
	provserver "fleetkey.dev/provisioning/server"
)

// Stack is a provisioning service and a gateway on loopback, on a fresh
// PKI in a directory of their own: the whole system on its embedded
// defaults.
type Stack struct {
	Dir, PKI string
	// Provisioning is the service's base URL; Gateway its MQTT-over-TLS
	// address; Sink the gateway's telemetry file.
	Provisioning, Gateway, Sink string
	// Metrics is the gateway's metrics URL (Prometheus text: its refusal
	// counters, for attacks run from another process: run --metrics).
	Metrics     string
	metricsAddr string // host:port behind Metrics, kept across restarts
	// RootCAs authenticate both.
	RootCAs *x509.CertPool
	// The admin API, with the fleet's admin certificate: Revoke, AllowEK,
	// Token.
	*Admin
	log      *slog.Logger
	ctx      context.Context
	cancel   context.CancelFunc // provisioning
	cancelGW context.CancelFunc
	done     chan error
	gwDone   chan error
	mu       sync.Mutex
	gw       *gwserver.Gateway
	opts     LocalOptions
}

// LocalOptions adjust the local stack.
type LocalOptions struct {
	// PlaintextTelemetry runs the gateway with fkx1 off (its
	// plaintext_telemetry setting), for --target mqtt.
	PlaintextTelemetry bool
	// ConnPerSecondPerAddr is the gateway's limit on new connections per
	// second from one address. Default 100,000: a simulated fleet comes
	// from one address, where the gateway's own default (200) would make
	// the limit, not the gateway, the thing measured.
	ConnPerSecondPerAddr int
	// RequireTPM runs the gateway with require_tpm: only TPM-bound
	// devices get in (--tpm).
	RequireTPM bool
	// Bin, if set, is the directory of the provisioning and gateway
	// binaries: each then runs as a child process (`serve`, its log in the
	// state directory) instead of in this one (--processes).
	Bin string
}

// StartLocal makes a PKI in dir and starts provisioning and the gateway
// in this process, on free loopback ports.
func StartLocal(ctx context.Context, dir string, log *slog.Logger) (*Stack, error) {
	return StartLocalWith(ctx, dir, log, LocalOptions{})
}

// StartLocalWith is StartLocal with options.
func StartLocalWith(ctx context.Context, dir string, log *slog.Logger, opts LocalOptions) (*Stack, error) {
	if opts.ConnPerSecondPerAddr == 0 {
		opts.ConnPerSecondPerAddr = 100_000
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	s := &Stack{opts: opts, Dir: dir, PKI: filepath.Join(dir, "pki"), Sink: filepath.Join(dir, "telemetry.jsonl"), done: make(chan error, 1), gwDone: make(chan error, 1), cancelGW: func() {}}
	if _, err := pkidir.Init(s.PKI, pkidir.InitOptions{TrustDomain: "fleet.local"}); err != nil {
		return nil, fmt.Errorf("making the fleet PKI: %w", err)
	}
	bundle, err := pkidir.LoadBundle(s.PKI)
	if err != nil {
		return nil, err
	}
	s.RootCAs = bundle.RootPool()
	admin, err := tls.LoadX509KeyPair(filepath.Join(s.PKI, "admin.crt"), filepath.Join(s.PKI, "admin.key"))
	if err != nil {
		return nil, err
	}
	ctx, s.cancel = context.WithCancel(ctx)
	s.ctx, s.log = ctx, log
	if opts.Bin != "" {
		if err := s.startProcesses(admin); err != nil {
			s.cancel()
			return nil, err
		}
		return s, nil
	}
	prov, err := provserver.New(ctx, provserver.Config{PKIDir: s.PKI, DataDir: filepath.Join(dir, "provisioning"), MetricsListen: "off"},
		provserver.Options{Log: log.With("service", "provisioning")})
	if err != nil {
		s.cancel()
		return nil, fmt.Errorf("provisioning: %w", err)
	}
	pln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		s.cancel()
		return nil, err
	}
	go func() { s.done <- prov.Serve(ctx, pln, nil) }()
	s.Provisioning = "https://localhost:" + portOf(pln.Addr())
	s.Admin = NewAdmin(s.Provisioning, s.RootCAs, admin)
	gln, err := listenBelowEphemeral()
	if err != nil {
		s.cancel()
		return nil, err
	}
	mln, err := listenBelowEphemeral()
	if err != nil {
		gln.Close()
		s.cancel()
		return nil, err
	}
	if err := s.startGateway(gln, mln); err != nil {
		s.cancel()
		return nil, err
	}
	s.Gateway = "localhost:" + portOf(gln.Addr())
	s.setMetrics(mln.Addr().String())
	return s, nil
}

// startGateway builds the gateway and serves it on ln, its metrics on mln.
func (s *Stack) startGateway(ln, mln net.Listener) error {
	gw, err := gwserver.New(gwserver.Config{PKIDir: s.PKI, Provisioning: s.Provisioning, TelemetrySink: s.Sink, MetricsListen: "off",
		Listen: "127.0.0.1:0", ConnPerSecondPerAddr: s.opts.ConnPerSecondPerAddr, PlaintextTelemetry: s.opts.PlaintextTelemetry, RequireTPM: s.opts.RequireTPM}, s.log.With("service", "gateway"))
	if err != nil {
		ln.Close()
		mln.Close()
		return fmt.Errorf("gateway: %w", err)
	}
	s.mu.Lock()
	s.gw = gw
	s.mu.Unlock()
	var gctx context.Context
	gctx, s.cancelGW = context.WithCancel(s.ctx)
	done := make(chan error, 1)
	s.gwDone = done
	go func() { done <- gw.Serve(gctx, ln, mln) }()
	return nil
}

// RestartGateway stops the gateway (its clients are cut off) and starts a
// new one on the same address, over the same sink: a fault drill.
func (s *Stack) RestartGateway() error {
	s.cancelGW()
	select {
	case <-s.gwDone:
	case <-time.After(15 * time.Second):
		return errors.New("the gateway did not stop within 15 s")
	}
	addr := "127.0.0.1:" + s.Gateway[strings.LastIndexByte(s.Gateway, ':')+1:]
	maddr := s.metricsAddr
	ln, err := listenAgain(addr)
	if err != nil {
		return fmt.Errorf("the gateway's port: %w", err)
	}
	mln, err := listenAgain(maddr)
	if err != nil {
		ln.Close()
		return fmt.Errorf("the gateway's metrics port: %w", err)
	}
	if s.opts.Bin != "" {
		// The child binds them itself, once they are free.
		ln.Close()
		mln.Close()
		return s.startGatewayProcess(addr, maddr)
	}
	return s.startGateway(ln, mln)
}

func (s *Stack) setMetrics(addr string) {
	s.metricsAddr, s.Metrics = addr, "http://"+addr+"/metrics"
}

// listenAgain listens on addr, which a server has just let go of, with a
// moment's grace: an outgoing connection may hold the port for a while
// (ports are kept out of the ephemeral range, but another program may
// still pick one).
func listenAgain(addr string) (net.Listener, error) {
	for wait, deadline := 10*time.Millisecond, time.Now().Add(5*time.Second); ; wait = min(2*wait, 500*time.Millisecond) {
		ln, err := net.Listen("tcp", addr)
		if err == nil || time.Now().After(deadline) {
			return ln, err
		}
		time.Sleep(wait)
	}
}

// listenBelowEphemeral listens on a free loopback port below the kernel's
// ephemeral range, so that when the gateway restarts on the same port no
// client's outgoing connection (thousands of them, reconnecting) can have
// taken it meanwhile. It falls back to any free port.
func listenBelowEphemeral() (net.Listener, error) {
	lo := 32768
	if b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range"); err == nil {
		if f := strings.Fields(string(b)); len(f) == 2 {
			if n, err := strconv.Atoi(f[0]); err == nil {
				lo = n
			}
		}
	}
	if lo > 12000 {
		for range 50 {
			port := 10000 + mathrand.IntN(lo-10000)
			if port == 1883 || port == 8883 {
				continue
			}
			if ln, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", port)); err == nil {
				return ln, nil
			}
		}
	}
	return net.Listen("tcp", "127.0.0.1:0")
}

func portOf(a net.Addr) string { return fmt.Sprint(a.(*net.TCPAddr).Port) }

// Stop shuts the gateway down, then provisioning (whose revocation feed
// the gateway follows), and waits for each.
func (s *Stack) Stop() error {
	var errs []error
	for _, step := range []struct {
		cancel context.CancelFunc
		done   chan error
		name   string
	}{{s.cancelGW, s.gwDone, "gateway"}, {s.cancel, s.done, "provisioning"}} {
		step.cancel()
		select {
		case err := <-step.done:
			errs = append(errs, err)
		case <-time.After(15 * time.Second):
			errs = append(errs, fmt.Errorf("the %s did not stop within 15 s", step.name))
		}
	}
	return errors.Join(errs...)
}

// Admin calls a provisioning service's admin API with the fleet's admin
// certificate (mTLS): the local stack's, or one run elsewhere (`simulator
// run --provisioning URL --pki DIR`).
type Admin struct {
	url    string
	client *http.Client
}

// NewAdmin is the admin API of the provisioning service at url (https),
// whose certificate roots verifies.
func NewAdmin(url string, roots *x509.CertPool, cert tls.Certificate) *Admin {
	return &Admin{url: url, client: &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
		TLSClientConfig: &tls.Config{MinVersion: tls.VersionTLS12, RootCAs: roots, Certificates: []tls.Certificate{cert}}}}}
}

// call posts in as JSON to path and returns the answer's body.
func (a *Admin) call(ctx context.Context, path string, in any, what string) ([]byte, error) {
	body, _ := json.Marshal(in)
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, a.url+path, bytes.NewReader(body))
	if err != nil {
		return nil, err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := a.client.Do(req)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", what, err)
	}
	defer resp.Body.Close()
	data, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	if resp.StatusCode != http.StatusOK && resp.StatusCode != http.StatusCreated {
		return nil, fmt.Errorf("%s: %s: %s", what, resp.Status, strings.TrimSpace(string(data)))
	}
	return data, nil
}

// Revoke revokes device id's certificates through the admin API; the
// gateway hears of it on the revocation feed.
func (a *Admin) Revoke(ctx context.Context, id string) error {
	_, err := a.call(ctx, "/admin/v1/devices/"+id+"/revoke", map[string]string{"reason": "keyCompromise"}, "revoking "+id)
	return err
}

// AllowEK adds an EK hash (SHA-256 of its SubjectPublicKeyInfo) to the
// provisioning service's allowlist through the admin API.
func (a *Admin) AllowEK(ctx context.Context, hash []byte) error {
	_, err := a.call(ctx, "/admin/v1/eks", map[string]any{"hashes": []string{hex.EncodeToString(hash)}, "label": "fleet simulator"}, "allowing an EK")
	return err
}

// Refusals are the current gateway's refusal counts by stage and reason
// (an AttackEnv.Refusals): read in process, or from the gateway's metrics
// when it is a child process.
func (s *Stack) Refusals() (map[[2]string]int64, error) {
	if s.opts.Bin != "" {
		return ScrapeRefusals(s.Metrics)()
	}
	s.mu.Lock()
	gw := s.gw
	s.mu.Unlock()
	return gw.Broker().Stats().Refusals(), nil
}

// Service is the fleet's service credential, for a run's receiver.
func (s *Stack) Service() (tls.Certificate, error) {
	return tls.LoadX509KeyPair(filepath.Join(s.PKI, "service.crt"), filepath.Join(s.PKI, "service.key"))
}

// Token creates an enrollment token through the admin API (admin mTLS).
func (a *Admin) Token(ctx context.Context, prefix string, uses int) (string, error) {
	data, err := a.call(ctx, "/admin/v1/tokens", map[string]any{"prefix": prefix, "max_uses": uses, "expires_in": "2h"}, "creating a token")
	if err != nil {
		return "", err
	}
	var out struct {
		Token string `json:"token"`
	}
	if err := json.Unmarshal(data, &out); err != nil || out.Token == "" {
		return "", fmt.Errorf("creating a token: unexpected answer %s", data)
	}
	return out.Token, nil
}

// RootPEMFile is where the fleet root is, for clients that read a file.
func (s *Stack) RootPEMFile() string { return filepath.Join(s.PKI, "root.crt") }
