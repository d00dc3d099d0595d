// Package server wires the provisioning service together: the registry,
// the issuing CA, EST, the admin API, the CRL, the revocation feed for
// gateways, metrics and health, behind one HTTPS listener with deadlines,
// size limits, rate limits and a cap on concurrent requests.
package server

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"fleetkey.dev/certs/authority"
	"fleetkey.dev/certs/identity"
	"fleetkey.dev/certs/pkidir"
	"fleetkey.dev/certs/trust"
	"fleetkey.dev/provisioning/attest"
	"fleetkey.dev/provisioning/enroll"
	"fleetkey.dev/provisioning/est"
	"fleetkey.dev/provisioning/registry"
)

// Server is a running provisioning service.
type Server struct {
	cfg      Config
	log      *slog.Logger
	store    registry.Store
	bundle   *trust.Bundle
	issuing  *authority.CA
	retired  []*authority.CA
	issuer   *authority.Issuer
	enroll   *enroll.Service
	tlsCert  tls.Certificate
	handler  http.Handler
	metrics  *metrics
	notify   *notifier
	offline  offlineCRLs
	now      func() time.Time
	closeMu  sync.Mutex
	closedDB bool
}

// Options carries what tests and embedders inject.
type Options struct {
	Log *slog.Logger
	// Store, if set, is used instead of opening one from the config.
	Store registry.Store
	// Now is the clock; default time.Now.
	Now func() time.Time
}

// New loads the CA, opens the registry and builds the handlers. It does
// not listen; see Serve.
func New(ctx context.Context, cfg Config, opts Options) (*Server, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	cfg = cfg.withDefaults()
	s := &Server{cfg: cfg, log: opts.Log, now: opts.Now, notify: newNotifier()}
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	if s.now == nil {
		s.now = time.Now
	}
	bundle, err := pkidir.LoadBundle(cfg.PKIDir)
	if err != nil {
		return nil, err
	}
	pass, err := pkidir.ResolvePassphrase(cfg.PKIDir, cfg.PassphraseFile)
	if err != nil {
		return nil, err
	}
	if s.issuing, err = pkidir.LoadIssuing(cfg.PKIDir, pass); err != nil {
		return nil, err
	}
	if s.retired, err = pkidir.LoadRetired(cfg.PKIDir, pass); err != nil {
		return nil, err
	}
	s.bundle = bundle
	policy := authority.Policy{TrustDomain: bundle.TrustDomain(), KeyTypes: cfg.KeyTypes,
		Validity: map[identity.Role]time.Duration{identity.RoleDevice: cfg.DeviceValidity}}
	if s.issuer, err = authority.NewIssuer(s.issuing, policy); err != nil {
		return nil, err
	}
	s.issuer.Now = s.now
	if err := s.issueServerCert(); err != nil {
		return nil, err
	}
	s.store = opts.Store
	if s.store == nil {
		if s.store, err = OpenStore(ctx, cfg); err != nil {
			return nil, err
		}
	}
	s.metrics = newMetrics()
	s.enroll = &enroll.Service{Store: s.store, Issuer: s.issuer, Bundle: bundle, Log: s.log, Now: s.now}
	s.offline.reload(cfg.PKIDir, bundle.Issuing(), s.now(), s.log)
	estH, err := est.New(s.enroll, bundle, est.Options{
		IsRevoked:    s.offline.revoked,
		TokenLimiter: newRateLimiter(cfg.Limits.EnrollPerMinutePerToken, s.now),
		AddrLimiter:  newRateLimiter(cfg.Limits.EnrollPerMinutePerAddr, s.now),
		Observer:     s.metrics, Log: s.log, Now: s.now,
	})
	if err != nil {
		return nil, err
	}
	mux := http.NewServeMux()
	estH.Register(mux)
	ekTrust, err := loadEKTrust(cfg, s.store)
	if err != nil {
		return nil, err
	}
	(&attest.Handler{Svc: s.enroll, Trust: ekTrust, Log: s.log, Now: s.now,
		AddrLimiter: newRateLimiter(cfg.Limits.EnrollPerMinutePerAddr, s.now)}).Register(mux)
	mux.HandleFunc("GET /crl", s.serveCRL)
	mux.HandleFunc("GET /revocations/v1/stream", s.serveFeed)
	s.registerAdmin(mux)
	mux.HandleFunc("GET /healthz", s.healthz)
	mux.HandleFunc("GET /readyz", s.readyz)
	s.handler = s.limitConcurrency(mux)
	return s, nil
}

// OpenStore opens the registry the configuration names: PostgreSQL if
// Database is set, else SQLite in DataDir.
func OpenStore(ctx context.Context, cfg Config) (registry.Store, error) {
	cfg = cfg.withDefaults()
	if cfg.Database != "" {
		return registry.OpenPostgres(ctx, cfg.Database)
	}
	if err := mkdirPrivate(cfg.DataDir); err != nil {
		return nil, err
	}
	return registry.OpenSQLite(ctx, filepath.Join(cfg.DataDir, "registry.db"))
}

// issueServerCert gives the service a TLS certificate of its own, issued
// from the issuing CA it already holds, with a key that lives in memory
// only: nothing to provision, nothing on disk to steal.
func (s *Server) issueServerCert() error {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	leaf, err := s.issuer.Issue(&authority.Request{Role: identity.RoleService, Name: "provisioning", PublicKey: key.Public(),
		DNSNames: s.cfg.HostNames, IPAddresses: s.cfg.HostIPs})
	if err != nil {
		return fmt.Errorf("issuing the service's TLS certificate: %w", err)
	}
	s.tlsCert = tls.Certificate{Certificate: [][]byte{leaf.Raw, s.issuing.Cert.Raw}, PrivateKey: key, Leaf: leaf}
	return nil
}

// TLSConfig is the HTTPS listener's configuration: TLS 1.2+, and a client
// certificate requested but not required at the TLS layer. EST enrollment
// needs none; renewal, the admin API and the feed check it per route
// against the trust bundle (est.PeerOf), so one verifier decides.
func (s *Server) TLSConfig() *tls.Config {
	return &tls.Config{
		MinVersion:   tls.VersionTLS12,
		Certificates: []tls.Certificate{s.tlsCert},
		ClientAuth:   tls.RequestClientCert,
		Time:         s.now,
	}
}

// Serve runs the HTTPS server on ln and the metrics server on mln (which
// may be nil) until ctx is done, then shuts down gracefully.
func (s *Server) Serve(ctx context.Context, ln, mln net.Listener) error {
	l := s.cfg.Limits
	srv := &http.Server{
		Handler:           s.handler,
		TLSConfig:         s.TLSConfig(),
		ReadHeaderTimeout: l.ReadHeaderTimeout,
		ReadTimeout:       l.ReadTimeout,
		WriteTimeout:      l.WriteTimeout,
		IdleTimeout:       l.IdleTimeout,
		MaxHeaderBytes:    l.MaxHeaderBytes,
		ErrorLog:          slog.NewLogLogger(s.log.Handler(), slog.LevelDebug),
		BaseContext:       func(net.Listener) context.Context { return ctx },
	}
	servers := []*http.Server{srv}
	errc := make(chan error, 2)
	go func() { errc <- srv.Serve(tls.NewListener(ln, srv.TLSConfig)) }()
	if mln != nil {
		msrv := &http.Server{Handler: s.metricsHandler(), ReadHeaderTimeout: 5 * time.Second, ReadTimeout: 10 * time.Second, WriteTimeout: 10 * time.Second}
		servers = append(servers, msrv)
		go func() { errc <- msrv.Serve(mln) }()
	}
	go func() {
		t := time.NewTicker(time.Minute)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
				s.offline.reload(s.cfg.PKIDir, s.bundle.Issuing(), s.now(), s.log)
			}
		}
	}()
	s.log.Info("provisioning service listening", "https", ln.Addr().String(), "trust_domain", s.bundle.TrustDomain(), "issuing_ca", s.issuing.Cert.Subject.CommonName)
	var err error
	select {
	case <-ctx.Done():
	case err = <-errc:
	}
	shutdown, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s.notify.close() // ends the feed streams so shutdown does not wait on them
	for _, hs := range servers {
		_ = hs.Shutdown(shutdown)
	}
	if errors.Is(err, http.ErrServerClosed) {
		err = nil
	}
	return errors.Join(err, s.Close())
}

// Close releases the registry.
func (s *Server) Close() error {
	s.closeMu.Lock()
	defer s.closeMu.Unlock()
	if s.closedDB {
		return nil
	}
	s.closedDB = true
	return s.store.Close()
}

// Store returns the registry (for the CLI and tests).
func (s *Server) Store() registry.Store { return s.store }

func (s *Server) metricsHandler() http.Handler {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(s.metrics.reg, promhttp.HandlerOpts{}))
	mux.HandleFunc("GET /healthz", s.healthz)
	mux.HandleFunc("GET /readyz", s.readyz)
	return mux
}

func (s *Server) healthz(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "text/plain")
	_, _ = w.Write([]byte("ok\n"))
}

func (s *Server) readyz(w http.ResponseWriter, r *http.Request) {
	ctx, cancel := context.WithTimeout(r.Context(), 2*time.Second)
	defer cancel()
	if err := s.store.Ping(ctx); err != nil {
		s.log.Warn("not ready", "err", err)
		http.Error(w, "registry unavailable", http.StatusServiceUnavailable)
		return
	}
	if !s.now().Before(s.issuing.Cert.NotAfter) {
		http.Error(w, "issuing CA expired", http.StatusServiceUnavailable)
		return
	}
	w.Header().Set("Content-Type", "text/plain")
	_, _ = w.Write([]byte("ready\n"))
}

// limitConcurrency answers 503 with Retry-After once MaxConcurrent
// requests are in flight, instead of queueing without bound. Feed streams
// are long-lived and do not count.
func (s *Server) limitConcurrency(next http.Handler) http.Handler {
	sem := make(chan struct{}, s.cfg.Limits.MaxConcurrent)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/revocations/v1/stream" {
			next.ServeHTTP(w, r)
			return
		}
		select {
		case sem <- struct{}{}:
			defer func() { <-sem }()
			next.ServeHTTP(w, r)
		default:
			s.metrics.overload.Inc()
			w.Header().Set("Retry-After", "1")
			http.Error(w, "the service is at its concurrency limit; retry shortly", http.StatusServiceUnavailable)
		}
	})
}

type metrics struct {
	reg      *prometheus.Registry
	est      *prometheus.CounterVec
	revoked  prometheus.Counter
	feeds    prometheus.Gauge
	overload prometheus.Counter
	admin    *prometheus.CounterVec
}

func newMetrics() *metrics {
	m := &metrics{reg: prometheus.NewRegistry()}
	m.est = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "fleetkey_provisioning_est_requests_total", Help: "EST requests by endpoint and outcome (issued, retry, or the refusal reason)."}, []string{"endpoint", "outcome"})
	m.revoked = prometheus.NewCounter(prometheus.CounterOpts{Name: "fleetkey_provisioning_revocations_total", Help: "Certificates revoked."})
	m.feeds = prometheus.NewGauge(prometheus.GaugeOpts{Name: "fleetkey_provisioning_feed_subscribers", Help: "Gateways following the revocation feed."})
	m.overload = prometheus.NewCounter(prometheus.CounterOpts{Name: "fleetkey_provisioning_overload_total", Help: "Requests refused at the concurrency limit."})
	m.admin = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "fleetkey_provisioning_admin_requests_total", Help: "Admin API requests by outcome."}, []string{"outcome"})
	m.reg.MustRegister(m.est, m.revoked, m.feeds, m.overload, m.admin, collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// Outcome implements est.Observer.
func (m *metrics) Outcome(endpoint, outcome string) { m.est.WithLabelValues(endpoint, outcome).Inc() }

// rateLimiter is a token bucket per key, refilled at perMinute per minute
// with a burst of perMinute. Idle buckets are dropped so the map stays
// bounded by the active keys.
type rateLimiter struct {
	mu        sync.Mutex
	perMinute float64
	now       func() time.Time
	buckets   map[string]*bucket
	swept     time.Time
}

type bucket struct {
	tokens float64
	last   time.Time
}

func newRateLimiter(perMinute int, now func() time.Time) *rateLimiter {
	return &rateLimiter{perMinute: float64(perMinute), now: now, buckets: map[string]*bucket{}}
}

// Allow implements est.Limiter.
func (l *rateLimiter) Allow(key string) (bool, time.Duration) {
	l.mu.Lock()
	defer l.mu.Unlock()
	now := l.now()
	if now.Sub(l.swept) > time.Minute {
		for k, b := range l.buckets {
			if now.Sub(b.last) > time.Minute {
				delete(l.buckets, k)
			}
		}
		l.swept = now
	}
	b, ok := l.buckets[key]
	if !ok {
		b = &bucket{tokens: l.perMinute, last: now}
		l.buckets[key] = b
	}
	b.tokens = min(l.perMinute, b.tokens+now.Sub(b.last).Minutes()*l.perMinute)
	b.last = now
	if b.tokens >= 1 {
		b.tokens--
		return true, 0
	}
	wait := time.Duration((1 - b.tokens) / l.perMinute * float64(time.Minute))
	return false, wait
}

// notifier wakes feed streams when this replica revokes something; other
// replicas' revocations are found by polling.
type notifier struct {
	mu     sync.Mutex
	ch     chan struct{}
	closed bool
}

func newNotifier() *notifier { return &notifier{ch: make(chan struct{})} }

// wait returns a channel closed at the next notify.
func (n *notifier) wait() <-chan struct{} {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.ch
}

func (n *notifier) notify() {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.closed {
		return
	}
	close(n.ch)
	n.ch = make(chan struct{})
}

func (n *notifier) close() {
	n.mu.Lock()
	defer n.mu.Unlock()
	if !n.closed {
		n.closed = true
		close(n.ch)
	}
}

func (n *notifier) isClosed() bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.closed
}

// Config returns the configuration in force, defaults filled in.
func (s *Server) Config() Config { return s.cfg }

// loadEKTrust builds the attestation's EK trust from the configuration.
// The allowlist is the configuration's ek_allowlist and the registry's
// (provisioning ek add, the admin API).
func loadEKTrust(cfg Config, store registry.Store) (*attest.EKTrust, error) {
	allowed := map[string]bool{}
	for _, h := range cfg.EKAllowlist {
		allowed[strings.ToLower(h)] = true
	}
	t := &attest.EKTrust{Allowed: func(hash []byte) (bool, error) {
		if allowed[hex.EncodeToString(hash)] {
			return true, nil
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		return store.HasEK(ctx, hash)
	}}
	if len(cfg.EKRoots) > 0 {
		t.Roots, t.Intermediates = x509.NewCertPool(), x509.NewCertPool()
		for _, path := range cfg.EKRoots {
			data, err := os.ReadFile(path)
			if err != nil {
				return nil, fmt.Errorf("config ek_roots: %w", err)
			}
			certs, err := trust.ParseCertificatesPEM(data)
			if err != nil || len(certs) == 0 {
				return nil, fmt.Errorf("config ek_roots: %s holds no PEM certificate: %v", path, err)
			}
			for _, c := range certs {
				if bytes.Equal(c.RawSubject, c.RawIssuer) {
					t.Roots.AddCert(c)
				} else {
					t.Intermediates.AddCert(c)
				}
			}
		}
	}
	return t, nil
}
