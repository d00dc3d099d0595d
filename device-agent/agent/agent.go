package agent

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"

	"log/slog"
	"math/big"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"fleetkey.dev/certs/identity"
	"fleetkey.dev/sessionkey"
)

// Config configures Run.
type Config struct {
	State *State
	// Gateway is host:port of the gateway's MQTT-over-TLS listener.
	Gateway string
	// Suite of fkx1; default 1. A device never falls back on its own.
	Suite    sessionkey.Suite
	Rotation sessionkey.Rotation
	Outbox   OutboxOptions
	// InFlight bounds envelopes awaiting PUBACK on one connection.
	// Default 64.
	InFlight int
	// OnCommand receives each command, in order, once.
	OnCommand func(Command)
	// OnEpoch, if set, is told of each new epoch (the fleet simulator
	// measures handshakes with it).
	OnEpoch func(kid sessionkey.KID)
	// Renew at this fraction of the certificate's lifetime (default 2/3),
	// plus up to RenewJitter of the lifetime (default 5 %).
	RenewAt, RenewJitter float64
	// Timeouts: connect (10 s), each handshake step (10 s, FKX1.md).
	ConnectTimeout, StepTimeout time.Duration
	// Backoff between connection attempts and handshakes: from BackoffMin
	// (1 s) doubling to BackoffMax (60 s), with full jitter.
	BackoffMin, BackoffMax time.Duration
	Log                    *slog.Logger
	Now                    func() time.Time
	// Credentials override what the state directory holds (the simulator
	// keeps them in memory).
	Credentials *Credentials
	// DeviceID overrides agent.json's id (with Credentials).
	DeviceID string
}

// Command is a command received from the gateway.
type Command struct {
	Channel string
	ID      uint64
	UnixMS  uint64
	Body    []byte
}

// Agent runs one device.
type Agent struct {
	cfg    Config
	id     string
	log    *slog.Logger
	dev    *Device
	outbox *Outbox
	disk   *diskLog

	mu      sync.Mutex
	creds   *Credentials
	status  Status
	renewed chan struct{} // closed when a renewal asks for a new connection

	acked atomic.Int64
	stats *Stats
}

// Stats counts what the agent saw.
type Stats struct {
	Connects, ConnectFailures, Handshakes, HandshakeFailures, Hints, Commands, CommandsRefused, Renewals atomic.Int64
	// KexRefused counts msg2/msg4 payloads refused (a forged or stale
	// msg2, a msg2 not from a gateway certificate, a bad msg4).
	KexRefused atomic.Int64
}

// New loads the device's state and returns an agent ready to Run.
func New(cfg Config) (*Agent, error) {
	if cfg.Suite == 0 {
		cfg.Suite = sessionkey.Suite1
	}
	if cfg.InFlight <= 0 {
		cfg.InFlight = 64
	}
	if cfg.RenewAt == 0 {
		cfg.RenewAt = 2.0 / 3
	}
	if cfg.RenewJitter == 0 {
		cfg.RenewJitter = 0.05
	}
	def := func(d *time.Duration, v time.Duration) {
		if *d == 0 {
			*d = v
		}
	}
	def(&cfg.ConnectTimeout, 10*time.Second)
	def(&cfg.StepTimeout, 10*time.Second)
	def(&cfg.BackoffMin, time.Second)
	def(&cfg.BackoffMax, 60*time.Second)
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if _, _, err := net.SplitHostPort(cfg.Gateway); err != nil {
		return nil, fmt.Errorf("gateway address %q: want host:port", cfg.Gateway)
	}
	a := &Agent{cfg: cfg, renewed: make(chan struct{})}
	creds, id := cfg.Credentials, cfg.DeviceID
	var meta Meta
	if creds == nil {
		var err error
		if meta, err = cfg.State.ReadMeta(); err != nil {
			return nil, err
		}
		if creds, err = cfg.State.LoadCredentials(); err != nil {
			return nil, err
		}
		id = meta.ID
	}
	if err := identity.ValidateID(id); err != nil {
		return nil, err
	}
	a.id, a.creds = id, creds
	a.log = cfg.Log.With("device", id)
	a.dev = NewDevice(id, DeviceOptions{Suite: cfg.Suite, Rotation: cfg.Rotation, StepTimeout: cfg.StepTimeout, Backoff: a.backoff,
		OnCommand: cfg.OnCommand, Log: a.log, Now: cfg.Now,
		OnEpoch: func(ep *sessionkey.Epoch) {
			a.setStatus(func(s *Status) { s.KID, s.EpochStarted = hex.EncodeToString(ep.KID[:]), ep.Started })
			if cfg.OnEpoch != nil {
				cfg.OnEpoch(ep.KID)
			}
		}})
	a.stats = a.dev.Stats
	var pending []Record
	if cfg.Outbox.Disk && cfg.State != nil {
		d, p, err := openDiskLog(cfg.State.path(OutboxFile), cfg.Outbox.SyncEvery)
		if err != nil {
			return nil, err
		}
		a.disk, pending = d, p
	}
	reserve := func(next uint64) (uint64, error) { return next + 1<<20, nil }
	first := uint64(1)
	if cfg.State != nil && cfg.Credentials == nil {
		first = max(meta.RecordReserved, 1)
		reserve = func(next uint64) (uint64, error) {
			m, err := cfg.State.ReadMeta()
			if err != nil {
				return 0, err
			}
			m.RecordReserved = next + 4096
			return m.RecordReserved, cfg.State.WriteMeta(m)
		}
	} else {
		// In memory: ids from the clock, so they rise across restarts.
		first = uint64(cfg.Now().UnixMicro())
	}
	a.outbox = newOutbox(cfg.Outbox, first, reserve, a.disk, pending)
	var lastFull atomic.Int64
	a.outbox.full = func(p FullPolicy) {
		now := cfg.Now().UnixNano()
		if last := lastFull.Load(); now-last >= int64(time.Minute) && lastFull.CompareAndSwap(last, now) {
			a.log.Warn("outbox full: records arrive faster than the gateway acknowledges them", "max", a.outbox.opts.Max, "policy", string(p),
				"meaning", map[FullPolicy]string{Block: "the source waits", DropOldest: "the oldest unsent record is dropped", Refuse: "new records are refused"}[p])
		}
	}
	a.status = Status{ID: id, Gateway: cfg.Gateway, CertNotAfter: creds.Leaf.NotAfter, PID: os.Getpid()}
	return a, nil
}

// ID is the device id.
func (a *Agent) ID() string { return a.id }

// Publish queues a telemetry record on channel (the outbox's policy
// applies when it is full) and returns its record id.
func (a *Agent) Publish(ctx context.Context, channel string, body []byte) (uint64, error) {
	if channel == sessionkey.KexChannel || identity.ValidateID(channel) != nil {
		return 0, fmt.Errorf("channel %q: one topic level of lowercase letters, digits and '-', and not %q", channel, sessionkey.KexChannel)
	}
	return a.outbox.Add(ctx, channel, body, a.cfg.Now())
}

// Outbox returns the agent's outbox.
func (a *Agent) Outbox() *Outbox { return a.outbox }

// Acked counts records the gateway acknowledged.
func (a *Agent) Acked() int64 { return a.acked.Load() }

// Stats returns the counters.
func (a *Agent) Stats() *Stats { return a.stats }

// Status returns the agent's current status.
func (a *Agent) Status() Status {
	a.mu.Lock()
	defer a.mu.Unlock()
	st := a.status
	st.Epochs, st.RecordsAcked, st.Outbox = a.stats.Handshakes.Load(), a.acked.Load(), a.outbox.Len()
	st.Updated = a.cfg.Now()
	return st
}

func (a *Agent) setStatus(f func(*Status)) {
	a.mu.Lock()
	f(&a.status)
	a.mu.Unlock()
	if a.cfg.State != nil && a.cfg.Credentials == nil {
		_ = a.cfg.State.WriteStatus(a.Status())
	}
}

// Run connects, handshakes and delivers until ctx ends, reconnecting
// with backoff. It returns nil when ctx ends.
func (a *Agent) Run(ctx context.Context) error {
	defer func() {
		if a.cfg.Credentials == nil {
			_ = a.credentials().Close()
		}
		a.dev.Ring.Wipe()
		if a.disk != nil {
			_ = a.disk.close()
		}
		a.setStatus(func(s *Status) { s.Connected = false })
	}()
	go a.renewLoop(ctx)
	attempt := 0
	for ctx.Err() == nil {
		connected, err := a.connection(ctx)
		if ctx.Err() != nil {
			return nil
		}
		if connected {
			attempt = 0
		}
		msg := "connection failed"
		if connected {
			msg = "connection ended"
		}
		a.log.Warn(msg, "err", err)
		a.setStatus(func(s *Status) { s.Connected, s.LastError = false, errString(err) })
		if !sleepCtx(ctx, a.backoff(attempt)) {
			return nil
		}
		attempt++
	}
	return nil
}

func errString(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}

// backoff is full jitter: uniform in [0, min(max, min·2^attempt)].
func (a *Agent) backoff(attempt int) time.Duration {
	d := a.cfg.BackoffMax
	if attempt < 30 {
		d = min(a.cfg.BackoffMin<<attempt, a.cfg.BackoffMax)
	}
	return jitter(d)
}

func jitter(d time.Duration) time.Duration {
	if d <= 0 {
		return 0
	}
	n, err := rand.Int(rand.Reader, big.NewInt(int64(d)+1))
	if err != nil {
		return d
	}
	return time.Duration(n.Int64())
}

func sleepCtx(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}

func (a *Agent) credentials() *Credentials {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.creds
}

// tlsConfig authenticates the gateway as the fleet's: a chain to the
// fleet roots for the dialled host, and a gateway-role identity of the
// fleet's trust domain.
func (a *Agent) tlsConfig(c *Credentials) *tls.Config {
	host, _, _ := net.SplitHostPort(a.cfg.Gateway)
	cert := c.TLS()
	verify := VerifyGateway(c.Bundle, a.cfg.Now, x509.ExtKeyUsageServerAuth)
	return &tls.Config{
		MinVersion:   tls.VersionTLS12,
		ServerName:   host,
		RootCAs:      c.Bundle.RootPool(),
		Certificates: []tls.Certificate{cert},
		VerifyConnection: func(cs tls.ConnectionState) error {
			return verify(cs.PeerCertificates)
		},
	}
}

// inflight is an envelope awaiting its PUBACK.
type inflight struct {
	id  uint64
	tok paho.Token
}

// conn is one MQTT connection's state.
type conn struct {
	a       *Agent
	c       paho.Client
	in      chan paho.Message
	lost    chan error
	link    *Link
	lastSt  time.Time
	pending []inflight
}

// connection runs one connection until it fails or ctx ends; connected
// reports whether the MQTT connection was made.
func (a *Agent) connection(ctx context.Context) (connected bool, err error) {
	creds := a.credentials()
	k := &conn{a: a, in: make(chan paho.Message, 256), lost: make(chan error, 1)}
	opts := paho.NewClientOptions().AddBroker("tls://" + a.cfg.Gateway).SetClientID(a.id).SetTLSConfig(a.tlsConfig(creds)).
		SetProtocolVersion(4).SetCleanSession(true).SetAutoReconnect(false).SetConnectRetry(false).
		SetConnectTimeout(a.cfg.ConnectTimeout).SetWriteTimeout(a.cfg.StepTimeout).SetKeepAlive(30 * time.Second).SetPingTimeout(10 * time.Second).
		SetOrderMatters(true).SetResumeSubs(false).
		SetConnectionLostHandler(func(_ paho.Client, err error) {
			select {
			case k.lost <- err:
			default:
			}
		})
	k.c = paho.NewClient(opts)
	a.stats.Connects.Add(1)
	tok := k.c.Connect()
	if !waitToken(ctx, tok, a.cfg.ConnectTimeout) {
		k.c.Disconnect(0)
		a.stats.ConnectFailures.Add(1)
		return false, fmt.Errorf("connecting to %s: timed out or cancelled", a.cfg.Gateway)
	}
	if err := tok.Error(); err != nil {
		a.stats.ConnectFailures.Add(1)
		return false, fmt.Errorf("connecting to %s: %w", a.cfg.Gateway, err)
	}
	defer k.c.Disconnect(250)
	handler := func(_ paho.Client, m paho.Message) {
		select {
		case k.in <- m:
		case <-ctx.Done():
		}
	}
	subs := map[string]byte{}
	for _, f := range a.dev.Subscriptions() {
		subs[f] = 1
	}
	st := k.c.SubscribeMultiple(subs, handler)
	if !waitToken(ctx, st, a.cfg.StepTimeout) || st.Error() != nil {
		return true, fmt.Errorf("subscribing: %v", st.Error())
	}
	a.log.Info("connected", "gateway", a.cfg.Gateway)
	a.setStatus(func(s *Status) { s.Connected, s.Since, s.LastError = true, a.cfg.Now(), "" })
	a.outbox.Rewind()
	link, err := a.dev.NewLink(creds, func(topic string, payload []byte) error {
		k.c.Publish(topic, 1, false, payload)
		return nil
	})
	if err != nil {
		return true, err
	}
	k.link = link
	defer link.Close()
	if err := link.Start(); err != nil {
		return true, err
	}
	a.mu.Lock()
	renewed := a.renewed
	a.mu.Unlock()
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for {
		if err := k.fill(); err != nil {
			return true, err
		}
		var headDone <-chan struct{}
		if len(k.pending) > 0 {
			headDone = k.pending[0].tok.Done()
		}
		var room <-chan struct{}
		if k.link.Ready() && len(k.pending) < a.cfg.InFlight {
			room = a.outbox.Changed()
		}
		select {
		case <-ctx.Done():
			return true, nil
		case err := <-k.lost:
			return true, fmt.Errorf("connection lost: %w", err)
		case <-renewed:
			return true, errors.New("certificate renewed; reconnecting with it")
		case m := <-k.in:
			if m.Retained() {
				continue // a receiver ignores retained messages (FKX1.md)
			}
			if err := k.link.Handle(m.Topic(), m.Payload()); err != nil {
				return true, err
			}
		case <-headDone:
			h := k.pending[0]
			if err := h.tok.Error(); err != nil {
				return true, fmt.Errorf("publishing record %d: %w", h.id, err)
			}
			k.pending = k.pending[1:]
			a.outbox.Ack(h.id)
			a.acked.Add(1)
		case <-room:
		case <-tick.C:
			if err := k.tick(); err != nil {
				return true, err
			}
		}
	}
}

func waitToken(ctx context.Context, t paho.Token, d time.Duration) bool {
	timer := time.NewTimer(d)
	defer timer.Stop()
	select {
	case <-t.Done():
		return true
	case <-timer.C:
		return false
	case <-ctx.Done():
		return false
	}
}

// fill seals and publishes records while the in-flight window has room.
// Data waits for an epoch made on this connection: after a reconnect the
// gateway may have restarted and lost the older keys.
func (k *conn) fill() error {
	if !k.link.Ready() {
		return nil
	}
	for len(k.pending) < k.a.cfg.InFlight {
		r, ok := k.a.outbox.Next()
		if !ok {
			return nil
		}
		env, err := k.link.Seal(r.Channel, r.ID, r.UnixMS, r.Body)
		if errors.Is(err, sessionkey.ErrNeedEpoch) {
			k.a.outbox.Unnext() // the epoch is spent: the record waits for the next one
			return nil
		}
		if err != nil {
			return fmt.Errorf("sealing record %d: %w", r.ID, err)
		}
		tok := k.c.Publish(k.a.dev.Topic("up/"+r.Channel), 1, false, env)
		k.pending = append(k.pending, inflight{id: r.ID, tok: tok})
	}
	return nil
}

// tick applies the clock to the link, and refreshes the status file.
func (k *conn) tick() error {
	if now := k.a.cfg.Now(); now.Sub(k.lastSt) >= 5*time.Second {
		k.lastSt = now
		k.a.setStatus(func(*Status) {})
	}
	return k.link.Tick()
}

// renewTime is when to renew leaf: at fraction at of its lifetime, plus a
// uniform jitter of up to fraction spread of it, so a fleet enrolled in one
// day does not renew in one minute.
func renewTime(leaf *x509.Certificate, at, spread float64) time.Time {
	life := leaf.NotAfter.Sub(leaf.NotBefore)
	return leaf.NotBefore.Add(time.Duration(float64(life)*at) + jitter(time.Duration(float64(life)*spread)))
}

// renewLoop renews the certificate at RenewAt of its lifetime, with
// jitter, and then makes the connection start over with it.
func (a *Agent) renewLoop(ctx context.Context) {
	if a.cfg.State == nil || a.cfg.Credentials != nil {
		return
	}
	attempt := 0
	for {
		at := renewTime(a.credentials().Leaf, a.cfg.RenewAt, a.cfg.RenewJitter)
		if attempt > 0 {
			at = a.cfg.Now().Add(a.backoff(attempt))
		}
		if !sleepCtx(ctx, at.Sub(a.cfg.Now())) {
			return
		}
		creds, err := a.cfg.State.Renew(ctx, a.credentials(), 30*time.Second)
		if err != nil {
			attempt++
			a.log.Warn("certificate renewal failed; will retry", "err", err)
			continue
		}
		attempt = 0
		a.stats.Renewals.Add(1)
		a.log.Info("certificate renewed", "not_after", creds.Leaf.NotAfter)
		a.mu.Lock()
		a.creds = creds
		close(a.renewed)
		a.renewed = make(chan struct{})
		a.status.CertNotAfter = creds.Leaf.NotAfter
		a.mu.Unlock()
	}
}
