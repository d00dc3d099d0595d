// Package server runs a gateway: the mTLS MQTT broker, the revocation
// follower, and a plain-HTTP endpoint for Prometheus metrics, /healthz and
// /readyz.
package server

import (
	"context"
	"crypto"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"go.yaml.in/yaml/v3"

	"fleetkey.dev/certs/crl"
	"fleetkey.dev/certs/pkidir"
	"fleetkey.dev/certs/trust"
	"fleetkey.dev/gateway/broker"
	"fleetkey.dev/gateway/revocation"
	"fleetkey.dev/gateway/sink"
	"fleetkey.dev/sessionkey"
)

// Config is the gateway's configuration (YAML and flags). The zero value
// of every field is its default.
type Config struct {
	// Listen is the MQTT-over-TLS address. Default ":8883". There is no
	// plaintext listener.
	Listen string `yaml:"listen"`
	// MetricsListen serves /metrics, /healthz and /readyz. Default ":9102";
	// "off" disables it.
	MetricsListen string `yaml:"metrics_listen"`
	// PKIDir holds bundle.pem, gateway.crt and gateway.key from `certs
	// init`. Default ".fleetkey/pki".
	PKIDir string `yaml:"pki_dir"`
	// Provisioning is the provisioning service's base URL, whose
	// revocation feed and CRL the gateway follows, e.g.
	// https://localhost:8443. Empty: revocations are not followed.
	Provisioning string `yaml:"provisioning"`
	// CRLFiles are CRLs signed offline by `certs crl` (PEM or DER) that
	// the gateway applies at start and re-reads every CRLReload: how a
	// revoked service or admin certificate, which the provisioning
	// registry does not hold, is shut out. Default: crl.pem and
	// retired/issuing-*.crl in PKIDir, where they exist.
	CRLFiles  []string      `yaml:"crl_files"`
	CRLReload time.Duration `yaml:"crl_reload"` // default 1m
	// Limits of the broker; zero values are the broker's defaults.
	HandshakeTimeout time.Duration `yaml:"handshake_timeout"`
	ConnectTimeout   time.Duration `yaml:"connect_timeout"`
	// WriteTimeout bounds one write to a client; one that takes no data for
	// that long is disconnected (default 5s).
	WriteTimeout  time.Duration `yaml:"write_timeout"`
	MaxPacketSize uint32        `yaml:"max_packet_size"`
	MaxClients    int64         `yaml:"max_clients"`
	BufferSize    int           `yaml:"buffer_size"`
	// ConnPerSecondPerAddr bounds new connections per second from one IP
	// address (default 200); a load generator on one address needs more.
	ConnPerSecondPerAddr int `yaml:"conn_per_second_per_addr"`
	// PlaintextTelemetry turns fkx1 off: devices publish plaintext on up/
	// (inside mTLS), relayed to fleet/telemetry/ without the sink. For
	// fleets without fkx1, and to measure the gateway as a plain mTLS
	// broker. Default false.
	PlaintextTelemetry bool `yaml:"plaintext_telemetry"`
	// RequireTPM admits only devices with TPM-bound certificates (issued
	// after TPM attestation). Default false.
	RequireTPM bool `yaml:"require_tpm"`
	// TelemetrySink is the JSON-lines file where every decrypted record is
	// stored (fsync'd) before its PUBACK. Default telemetry.jsonl beside
	// PKIDir (.fleetkey/telemetry.jsonl).
	TelemetrySink string `yaml:"telemetry_sink"`
	// Suites of fkx1 the gateway answers: 1 (X25519), 2 (X25519MLKEM768).
	// Default both.
	Suites []int `yaml:"suites"`
	// Rotation of session keys; zero values are FKX1.md's defaults.
	GenerationEvery time.Duration `yaml:"generation_every"` // 10m
	EpochEvery      time.Duration `yaml:"epoch_every"`      // 1h
	RetireAfter     time.Duration `yaml:"retire_after"`     // 60s
}

func (c Config) withDefaults() Config {
	if c.Listen == "" {
		c.Listen = ":8883"
	}
	if c.MetricsListen == "" {
		c.MetricsListen = ":9102"
	}
	if c.PKIDir == "" {
		c.PKIDir = ".fleetkey/pki"
	}
	if c.CRLFiles == nil {
		c.CRLFiles = []string{filepath.Join(c.PKIDir, pkidir.CRLFile), filepath.Join(c.PKIDir, pkidir.RetiredDir, "issuing-*.crl")}
	}
	if c.CRLReload == 0 {
		c.CRLReload = time.Minute
	}
	if c.TelemetrySink == "" {
		c.TelemetrySink = filepath.Join(filepath.Dir(filepath.Clean(c.PKIDir)), "telemetry.jsonl")
	}
	return c
}

// LoadConfig reads a YAML file; unknown keys are an error.
func LoadConfig(path string) (Config, error) {
	var c Config
	f, err := os.Open(path)
	if err != nil {
		return c, fmt.Errorf("reading config: %w", err)
	}
	defer f.Close()
	dec := yaml.NewDecoder(f)
	dec.KnownFields(true)
	if err := dec.Decode(&c); err != nil && !errors.Is(err, io.EOF) {
		return c, fmt.Errorf("config %s: %w", path, err)
	}
	return c, nil
}

// Validate checks the configuration and names the key at fault.
func (c Config) Validate() error {
	c = c.withDefaults()
	if _, _, err := net.SplitHostPort(c.Listen); err != nil {
		return fmt.Errorf("config listen: %q is not host:port: %v", c.Listen, err)
	}
	if _, port, _ := net.SplitHostPort(c.Listen); port == "1883" {
		return errors.New("config listen: 1883 is plaintext MQTT's port; the gateway speaks only MQTT over TLS (8883)")
	}
	if c.HandshakeTimeout < 0 || c.ConnectTimeout < 0 || c.WriteTimeout < 0 {
		return errors.New("config handshake_timeout, connect_timeout and write_timeout must not be negative (0 is the default)")
	}
	if c.ConnPerSecondPerAddr < 0 || c.MaxClients < 0 || c.BufferSize < 0 {
		return errors.New("config conn_per_second_per_addr, max_clients and buffer_size must not be negative (0 is the default)")
	}
	if c.MetricsListen != "off" {
		if _, _, err := net.SplitHostPort(c.MetricsListen); err != nil {
			return fmt.Errorf("config metrics_listen: %q is not host:port: %v", c.MetricsListen, err)
		}
	}
	for _, s := range c.Suites {
		if s != 1 && s != 2 {
			return fmt.Errorf("config suites: %d is not an fkx1 suite (1: X25519, 2: X25519MLKEM768)", s)
		}
	}
	if c.Provisioning != "" && !(len(c.Provisioning) > 8 && c.Provisioning[:8] == "https://") {
		return fmt.Errorf("config provisioning: %q must be an https:// URL", c.Provisioning)
	}
	return nil
}

// Gateway is a configured gateway, ready to Serve.
type Gateway struct {
	cfg    Config
	log    *slog.Logger
	bundle *trust.Bundle
	cert   tls.Certificate
	broker *broker.Broker
	sink   *sink.Sink
	reg    *prometheus.Registry
	ready  atomic.Bool
}

// New loads the PKI files and builds the broker.
func New(cfg Config, log *slog.Logger) (*Gateway, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	cfg = cfg.withDefaults()
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	bundle, err := pkidir.LoadBundle(cfg.PKIDir)
	if err != nil {
		return nil, err
	}
	cert, err := tls.LoadX509KeyPair(filepath.Join(cfg.PKIDir, "gateway.crt"), filepath.Join(cfg.PKIDir, "gateway.key"))
	if err != nil {
		return nil, fmt.Errorf("loading the gateway certificate: %w", err)
	}
	signer, ok := cert.PrivateKey.(crypto.Signer)
	if !ok {
		return nil, errors.New("the gateway key cannot sign")
	}
	snk, err := sink.Open(cfg.TelemetrySink, sink.Options{})
	if err != nil {
		return nil, err
	}
	var suites []sessionkey.Suite
	for _, s := range cfg.Suites {
		suites = append(suites, sessionkey.Suite(s))
	}
	opts := broker.Options{Bundle: bundle, Certificate: cert, Log: log, RequireTPM: cfg.RequireTPM,
		Limits: broker.Limits{HandshakeTimeout: cfg.HandshakeTimeout, ConnectTimeout: cfg.ConnectTimeout, WriteTimeout: cfg.WriteTimeout, MaxPacketSize: cfg.MaxPacketSize, MaxClients: cfg.MaxClients, BufferSize: cfg.BufferSize,
			ConnPerSecondPerAddr: cfg.ConnPerSecondPerAddr},
		Sessions: &broker.Sessions{Identity: sessionkey.Identity{Signer: signer, Chain: cert.Certificate}, Suites: suites, Sink: snk,
			Rotation: sessionkey.Rotation{GenerationEvery: cfg.GenerationEvery, EpochEvery: cfg.EpochEvery, RetireAfter: cfg.RetireAfter}}}
	if cfg.PlaintextTelemetry {
		opts.Sessions, opts.PlaintextTelemetry = nil, true
		log.Warn("plaintext_telemetry: fkx1 is off; records are protected by TLS only, not stored in the sink, and relayed as they are")
	}
	b, err := broker.New(opts)
	if err != nil {
		snk.Close()
		return nil, err
	}
	g := &Gateway{cfg: cfg, log: log, bundle: bundle, cert: cert, broker: b, sink: snk}
	g.reg = g.metrics()
	return g, nil
}

// Config returns the configuration in force.
func (g *Gateway) Config() Config { return g.cfg }

// Broker returns the broker (for tests and embedding).
func (g *Gateway) Broker() *broker.Broker { return g.broker }

// Serve runs until ctx ends: the broker on ln, metrics on mln (nil for
// none), and the revocation follower if configured.
func (g *Gateway) Serve(ctx context.Context, ln, mln net.Listener) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	errc := make(chan error, 3)
	go func() { errc <- g.broker.Serve(ctx, ln) }()
	var msrv *http.Server
	if mln != nil {
		msrv = &http.Server{Handler: g.metricsHandler(), ReadHeaderTimeout: 5 * time.Second, ReadTimeout: 10 * time.Second, WriteTimeout: 10 * time.Second}
		go func() { errc <- msrv.Serve(mln) }()
	}
	if g.cfg.Provisioning != "" {
		f := &revocation.Follower{BaseURL: g.cfg.Provisioning, Bundle: g.bundle, Log: g.log, Revoke: func(s string) { g.broker.Revoke(s) },
			Client: &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{
				MinVersion: tls.VersionTLS12, RootCAs: g.bundle.RootPool(), Certificates: []tls.Certificate{g.cert}}}}}
		go func() { errc <- f.Run(ctx) }()
	}
	g.ApplyCRLFiles()
	go func() {
		t := time.NewTicker(g.cfg.CRLReload)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
				g.ApplyCRLFiles()
			}
		}
	}()
	g.ready.Store(true)
	g.log.Info("gateway listening", "mqtts", ln.Addr().String(), "trust_domain", g.bundle.TrustDomain(), "provisioning", g.cfg.Provisioning)
	var err error
	select {
	case <-ctx.Done():
	case err = <-errc:
	}
	g.ready.Store(false)
	cancel()
	if msrv != nil {
		shut, c := context.WithTimeout(context.Background(), 5*time.Second)
		_ = msrv.Shutdown(shut)
		c()
	}
	if errors.Is(err, http.ErrServerClosed) {
		err = nil
	}
	if cerr := g.sink.Close(); err == nil {
		err = cerr
	}
	return err
}

func (g *Gateway) metrics() *prometheus.Registry {
	reg := prometheus.NewRegistry()
	st := g.broker.Stats()
	fkx := g.broker.FKXStats()
	if fkx == nil {
		fkx = new(broker.FKXStats) // plaintext telemetry: fkx1 counts stay 0
	}
	fkxCounter := func(name, help string, v func(*broker.FKXStats) int64) prometheus.Collector {
		return prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "fleetkey_gateway_" + name, Help: help}, func() float64 { return float64(v(fkx)) })
	}
	counter := func(name, help string, v func() float64) prometheus.Collector {
		return prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "fleetkey_gateway_" + name, Help: help}, v)
	}
	reg.MustRegister(
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "fleetkey_gateway_connections", Help: "MQTT clients connected."},
			func() float64 { return float64(g.broker.Info().ClientsConnected) }),
		counter("handshakes_total", "TLS handshakes completed.", func() float64 { return float64(st.Handshakes.Load()) }),
		counter("handshake_failures_total", "TLS handshakes refused (see the log for each reason).", func() float64 { return float64(st.HandshakeFailures.Load()) }),
		counter("auth_denied_total", "CONNECTs refused (client id not the certificate's identity, revoked).", func() float64 { return float64(st.AuthDenied.Load()) }),
		counter("acl_denied_total", "Publishes and subscriptions refused by the ACL.", func() float64 { return float64(st.ACLDenied.Load()) }),
		counter("revocation_kicks_total", "Clients disconnected because their certificate was revoked.", func() float64 { return float64(st.RevocationKicks.Load()) }),
		counter("expiry_kicks_total", "Clients disconnected when their certificate expired.", func() float64 { return float64(st.ExpiryKicks.Load()) }),
		counter("plaintext_refused_total", "Plaintext publishes on devices/+/up/ refused.", func() float64 { return float64(st.PlaintextRefused.Load()) }),
		counter("panics_recovered_total", "Connections whose packet panicked the decoder; closed, the gateway went on.", func() float64 { return float64(st.Panics.Load()) }),
		counter("accept_errors_total", "Accept errors survived.", func() float64 { return float64(st.AcceptErrors.Load()) }),
		counter("connections_rate_limited_total", "New connections closed by the per-address rate limit.", func() float64 { return float64(st.ConnRateLimited.Load()) }),
		counter("messages_received_total", "MQTT PUBLISH packets received.", func() float64 { return float64(g.broker.Info().MessagesReceived) }),
		counter("messages_sent_total", "MQTT PUBLISH packets sent.", func() float64 { return float64(g.broker.Info().MessagesSent) }),
		refusals{st},
		fkxCounter("fkx1_handshakes_total", "fkx1 handshakes completed.", func(f *broker.FKXStats) int64 { return f.Handshakes.Load() }),
		fkxCounter("fkx1_records_total", "Telemetry records stored in the sink and delivered.", func(f *broker.FKXStats) int64 { return f.Records.Load() }),
		fkxCounter("fkx1_duplicates_total", "Retransmitted records acknowledged and not delivered again.", func(f *broker.FKXStats) int64 { return f.Duplicates.Load() }),
		fkxCounter("fkx1_envelopes_refused_total", "Envelopes refused (reasons under fleetkey_gateway_refusals_total{stage=\"fkx1\"}).", func(f *broker.FKXStats) int64 { return f.EnvelopesRefused.Load() }),
		fkxCounter("fkx1_kex_dropped_total", "Handshake messages dropped (refused, or the worker queue full).", func(f *broker.FKXStats) int64 { return f.KexDropped.Load() }),
		fkxCounter("fkx1_commands_total", "Commands sealed and sent to devices.", func(f *broker.FKXStats) int64 { return f.Commands.Load() }),
		fkxCounter("fkx1_commands_refused_total", "Commands refused (reserved channel, bad device id, queue full).", func(f *broker.FKXStats) int64 { return f.CommandsRefused.Load() }),
		fkxCounter("fkx1_hints_total", "Hints sent to devices.", func(f *broker.FKXStats) int64 { return f.Hints.Load() }),
		fkxCounter("sink_failures_total", "Records the sink could not make durable (not acknowledged; the device resends).", func(f *broker.FKXStats) int64 { return f.SinkFailures.Load() }),
		fkxCounter("subscriber_waits_total", "Deliveries that waited for a slow service subscriber (backpressure).", func(f *broker.FKXStats) int64 { return f.SubscriberWaits.Load() }),
		fkxCounter("subscriber_kicks_total", "Service subscribers disconnected after stalling.", func(f *broker.FKXStats) int64 { return f.SubscriberKicks.Load() }),
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
	)
	return reg
}

// refusals exports the broker's refusal counts by stage and reason.
type refusals struct{ st *broker.Stats }

var refusalsDesc = prometheus.NewDesc("fleetkey_gateway_refusals_total",
	"Refusals by stage (handshake, connect, acl, fkx1) and reason.", []string{"stage", "reason"}, nil)

func (r refusals) Describe(ch chan<- *prometheus.Desc) { ch <- refusalsDesc }

func (r refusals) Collect(ch chan<- prometheus.Metric) {
	for k, v := range r.st.Refusals() {
		ch <- prometheus.MustNewConstMetric(refusalsDesc, prometheus.CounterValue, float64(v), k[0], k[1])
	}
}

func (g *Gateway) metricsHandler() http.Handler {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(g.reg, promhttp.HandlerOpts{}))
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) { _, _ = w.Write([]byte("ok\n")) })
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, r *http.Request) {
		if !g.ready.Load() {
			http.Error(w, "not serving", http.StatusServiceUnavailable)
			return
		}
		_, _ = w.Write([]byte("ready\n"))
	})
	return mux
}

// ApplyCRLFiles reads the configured CRL files (glob patterns), checks
// each against the bundle's issuing CAs, and revokes every serial on them.
// A missing file is skipped; a bad or stale one is logged and skipped, and
// what was revoked before stays revoked. It returns how many serials it
// applied.
func (g *Gateway) ApplyCRLFiles() int {
	n := 0
	for _, pattern := range g.cfg.CRLFiles {
		paths, err := filepath.Glob(pattern)
		if err != nil {
			g.log.Warn("bad CRL file pattern", "pattern", pattern, "err", err)
			continue
		}
		for _, p := range paths {
			data, err := readLimited(p, crl.MaxBytes)
			if err != nil {
				g.log.Warn("reading CRL", "file", p, "err", err)
				continue
			}
			list, err := crl.Parse(data, g.bundle.Issuing(), time.Now())
			if err != nil {
				g.log.Warn("CRL refused", "file", p, "err", err)
				continue
			}
			for _, e := range list.RevokedCertificateEntries {
				g.broker.Revoke(e.SerialNumber.Text(16))
				n++
			}
		}
	}
	return n
}

func readLimited(path string, limit int64) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, limit+1))
	if err == nil && int64(len(b)) > limit {
		err = fmt.Errorf("larger than %d bytes", limit)
	}
	return b, err
}
