package server

import (
	"bytes"
	"context"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math/big"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"time"

	"fleetkey.dev/certs/authority"
	"fleetkey.dev/certs/crl"
	"fleetkey.dev/certs/identity"
	"fleetkey.dev/certs/pkidir"
	"fleetkey.dev/provisioning/est"
	"fleetkey.dev/provisioning/registry"
)

func mkdirPrivate(dir string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("creating data directory: %w", err)
	}
	return nil
}

// RevokeDevice revokes a device and every certificate it holds in store,
// recording who did it. Revoking a revoked device is not an error; it
// returns no certificates. The CLI calls this directly on the registry;
// running services find the change within feedPoll.
func RevokeDevice(ctx context.Context, store registry.Store, id, reason, actor, remote string, now time.Time) ([]registry.Certificate, error) {
	code, ok := crl.Reasons[reason]
	if !ok {
		return nil, fmt.Errorf("%w %q: want keyCompromise, cessationOfOperation, affiliationChanged, superseded, privilegeWithdrawn or unspecified", ErrUnknownReason, reason)
	}
	if err := identity.ValidateID(id); err != nil {
		return nil, err
	}
	return store.RevokeDevice(ctx, id, code, now, registry.AuditEvent{At: now, Actor: actor, Action: "revoke", Subject: id,
		Outcome: registry.Allowed, Reason: reason, RemoteAddr: remote})
}

// ErrUnknownReason is returned for a revocation reason RFC 5280 does not name.
var ErrUnknownReason = errors.New("unknown revocation reason")

// revokeDevice is RevokeDevice plus this replica's metrics and a wake-up
// for its feed streams.
func (s *Server) revokeDevice(ctx context.Context, id, reason, actor, remote string) ([]registry.Certificate, error) {
	certs, err := RevokeDevice(ctx, s.store, id, reason, actor, remote, s.now())
	if err != nil {
		return nil, err
	}
	if len(certs) > 0 {
		s.metrics.revoked.Add(float64(len(certs)))
		s.notify.notify()
		s.log.Info("device revoked", "device", id, "reason", reason, "actor", actor, "certificates", len(certs))
	}
	return certs, nil
}

// serveCRL signs a fresh CRL (RFC 5280) of every unexpired revoked
// certificate. ?ca=<serial hex> asks for a retired issuing CA's CRL;
// default is the current issuing CA. The CRL number is the signing time
// in milliseconds, which increases across restarts and replicas.
func (s *Server) serveCRL(w http.ResponseWriter, r *http.Request) {
	ca := s.issuing
	if q := r.URL.Query().Get("ca"); q != "" {
		ca = nil
		for _, c := range append([]*authority.CA{s.issuing}, s.retired...) {
			if c.Cert.SerialNumber.Text(16) == q {
				ca = c
			}
		}
		if ca == nil {
			http.Error(w, fmt.Sprintf("no issuing CA with serial %q", q), http.StatusNotFound)
			return
		}
	}
	now := s.now()
	revoked, err := s.store.RevokedUnexpired(r.Context(), now)
	if err != nil {
		s.log.Error("reading revocations", "err", err)
		http.Error(w, "registry unavailable", http.StatusServiceUnavailable)
		return
	}
	var entries []crl.Entry
	for _, c := range revoked {
		if c.Issuer != ca.Cert.Subject.CommonName {
			continue
		}
		n, ok := new(big.Int).SetString(c.Serial, 16)
		if !ok {
			continue
		}
		entries = append(entries, crl.Entry{Serial: n, RevokedAt: c.RevokedAt, Reason: c.RevocationReason})
	}
	der, err := crl.Build(ca, entries, big.NewInt(now.UnixMilli()), now, now.Add(s.cfg.CRLLifetime))
	if err != nil {
		s.log.Error("signing CRL", "err", err)
		http.Error(w, "cannot sign the CRL", http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "application/pkix-crl")
	w.Header().Set("Cache-Control", "no-store")
	_, _ = w.Write(der)
}

// FeedEvent is one revocation on the feed.
type FeedEvent struct {
	Seq       int64     `json:"seq"`
	Serial    string    `json:"serial"`
	Device    string    `json:"device"`
	Issuer    string    `json:"issuer"`
	RevokedAt time.Time `json:"revoked_at"`
	Reason    int       `json:"reason"`
	NotAfter  time.Time `json:"not_after"`
}

// feedPoll is how often a stream looks for revocations made by other
// replicas; this replica's own wake the stream at once.
const feedPoll = 250 * time.Millisecond

// serveFeed streams revocations as server-sent events to gateways
// (gateway-role mTLS). It starts after ?since=N or the Last-Event-ID
// header, sends every revocation with a greater sequence number, in order,
// each as "id: <seq>", "event: revoked", "data: <json>", and a comment line
// every 15 s so idle connections stay open and dead ones are found.
func (s *Server) serveFeed(w http.ResponseWriter, r *http.Request) {
	if _, err := est.PeerOf(r, s.bundle, s.now(), s.offline.revoked, identity.RoleGateway); err != nil {
		http.Error(w, err.Error(), http.StatusForbidden)
		return
	}
	since := r.URL.Query().Get("since")
	if id := r.Header.Get("Last-Event-ID"); id != "" {
		since = id
	}
	var cursor int64
	if since != "" {
		n, err := strconv.ParseInt(since, 10, 64)
		if err != nil || n < 0 {
			http.Error(w, fmt.Sprintf("since %q is not a revocation sequence number", since), http.StatusBadRequest)
			return
		}
		cursor = n
	}
	rc := http.NewResponseController(w)
	w.Header().Set("Content-Type", "text/event-stream")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(http.StatusOK)
	// Send the headers now: a follower must know the stream is open even
	// when there is nothing to say yet.
	if !s.write(rc, w, []byte(": fleetkey revocation feed\n\n")) {
		return
	}
	s.metrics.feeds.Inc()
	defer s.metrics.feeds.Dec()
	ctx := r.Context()
	heartbeat := time.NewTicker(15 * time.Second)
	defer heartbeat.Stop()
	poll := time.NewTicker(feedPoll)
	defer poll.Stop()
	var buf bytes.Buffer
	for {
		wake := s.notify.wait()
		events, err := s.store.RevocationsSince(ctx, cursor, 500)
		if err != nil {
			if ctx.Err() == nil {
				s.log.Warn("feed: reading revocations", "err", err)
			}
			return
		}
		buf.Reset()
		for _, c := range events {
			data, _ := json.Marshal(FeedEvent{Seq: c.RevocationSeq, Serial: c.Serial, Device: c.DeviceID, Issuer: c.Issuer,
				RevokedAt: c.RevokedAt, Reason: c.RevocationReason, NotAfter: c.NotAfter})
			fmt.Fprintf(&buf, "id: %d\nevent: revoked\ndata: %s\n\n", c.RevocationSeq, data)
			cursor = c.RevocationSeq
		}
		if buf.Len() > 0 {
			if !s.write(rc, w, buf.Bytes()) {
				return
			}
		}
		if len(events) == 500 {
			continue
		}
		if s.notify.isClosed() {
			return
		}
		select {
		case <-ctx.Done():
			return
		case <-wake:
		case <-poll.C:
		case <-heartbeat.C:
			if !s.write(rc, w, []byte(": keep-alive\n\n")) {
				return
			}
		}
	}
}

// write sends and flushes with a fresh write deadline: the server's
// WriteTimeout would otherwise end every stream after 30 s.
func (s *Server) write(rc *http.ResponseController, w http.ResponseWriter, b []byte) bool {
	_ = rc.SetWriteDeadline(time.Now().Add(10 * time.Second))
	if _, err := w.Write(b); err != nil {
		return false
	}
	return rc.Flush() == nil
}

// offlineCRLs holds the serials on the CRLs that `certs crl` signs offline
// (crl.pem and retired/issuing-*.crl in the PKI directory): how an admin,
// service or gateway certificate, which the registry does not hold, is
// revoked. They are re-read every minute; a damaged or stale file is logged
// and skipped, and what was revoked stays revoked.
type offlineCRLs struct {
	mu      sync.RWMutex
	serials map[string]struct{}
}

func (o *offlineCRLs) revoked(c *x509.Certificate) bool {
	o.mu.RLock()
	defer o.mu.RUnlock()
	_, ok := o.serials[c.SerialNumber.Text(16)]
	return ok
}

// reload reads the offline CRLs of pkiDir and returns how many serials
// they list.
func (o *offlineCRLs) reload(pkiDir string, issuing []*x509.Certificate, now time.Time, log *slog.Logger) int {
	paths, _ := filepath.Glob(filepath.Join(pkiDir, pkidir.RetiredDir, "issuing-*.crl"))
	paths = append(paths, filepath.Join(pkiDir, pkidir.CRLFile))
	n := 0
	for _, p := range paths {
		data, err := os.ReadFile(p)
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err == nil && len(data) > crl.MaxBytes {
			err = fmt.Errorf("larger than %d bytes", crl.MaxBytes)
		}
		var list *crl.List
		if err == nil {
			list, err = crl.Parse(data, issuing, now)
		}
		if err != nil {
			log.Warn("offline CRL skipped", "file", p, "err", err)
			continue
		}
		o.mu.Lock()
		if o.serials == nil {
			o.serials = map[string]struct{}{}
		}
		for _, e := range list.RevokedCertificateEntries {
			o.serials[e.SerialNumber.Text(16)] = struct{}{}
			n++
		}
		o.mu.Unlock()
	}
	return n
}
