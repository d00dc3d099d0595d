package agent

import (
	"crypto/x509"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"log/slog"
	"strings"
	"sync"
	"time"

	"fleetkey.dev/certs/identity"
	"fleetkey.dev/certs/trust"
	"fleetkey.dev/sessionkey"
)

// Device is a device's fkx1 state that outlives its connections: the key
// ring, the last command id and the counters. It does no I/O: the agent
// runs it over paho, and the fleet simulator runs the same code over its
// own lean MQTT client (one per virtual device).
type Device struct {
	ID    string
	Ring  *sessionkey.Keyring
	Stats *Stats
	opts  DeviceOptions
	base  string // "devices/{id}/"

	mu        sync.Mutex
	lastCmdID uint64
}

// DeviceOptions are the protocol settings of a Device.
type DeviceOptions struct {
	Suite    sessionkey.Suite
	Rotation sessionkey.Rotation
	// StepTimeout bounds each handshake step (FKX1.md: 10 s).
	StepTimeout time.Duration
	// Backoff is the wait before the n-th retry of a timed-out handshake.
	Backoff   func(n int) time.Duration
	OnCommand func(Command)
	// OnEpoch is told of each new epoch.
	OnEpoch func(ep *sessionkey.Epoch)
	Log     *slog.Logger
	Now     func() time.Time
}

// NewDevice returns the fkx1 state of device id.
func NewDevice(id string, opts DeviceOptions) *Device {
	if opts.Suite == 0 {
		opts.Suite = sessionkey.Suite1
	}
	if opts.StepTimeout == 0 {
		opts.StepTimeout = 10 * time.Second
	}
	if opts.Backoff == nil {
		opts.Backoff = func(n int) time.Duration { return jitter(min(time.Second<<min(n, 6), time.Minute)) }
	}
	if opts.Log == nil {
		opts.Log = slog.New(slog.DiscardHandler)
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	return &Device{ID: id, Ring: sessionkey.NewKeyring(false, opts.Rotation, opts.Now), Stats: new(Stats), opts: opts, base: "devices/" + id + "/"}
}

// Topic is the device's topic for suffix (e.g. "kex/req", "up/temp").
func (d *Device) Topic(suffix string) string { return d.base + suffix }

// Subscriptions are the topic filters a device subscribes to, at QoS 1.
func (d *Device) Subscriptions() []string {
	return []string{d.base + "kex/resp", d.base + "kex/hint", d.base + "down/+"}
}

// VerifyGateway authenticates the gateway's chain, for TLS and for msg2:
// a gateway-role identity of the fleet's trust domain, valid now.
func VerifyGateway(b *trust.Bundle, now func() time.Time, usage x509.ExtKeyUsage) func([]*x509.Certificate) error {
	return func(chain []*x509.Certificate) error {
		_, err := b.Verify(chain, trust.VerifyOptions{Now: now(), Usage: usage, Roles: []identity.Role{identity.RoleGateway}})
		return err
	}
}

// Link is fkx1 on one MQTT connection: a handshake at a time, sealing,
// commands and the clock. Send publishes at QoS 1 on the connection; the
// caller serializes calls to a Link.
type Link struct {
	d       *Device
	send    func(topic string, payload []byte) error
	init    *sessionkey.Initiator
	fresh   bool // an epoch was made on this connection
	step    time.Time
	retryAt time.Time
	tries   int
	lastHnt time.Time
}

// NewLink starts fkx1 on a new connection, signing with creds. It sends
// no data until its own handshake completes: a restarted gateway has lost
// the older keys.
func (d *Device) NewLink(creds *Credentials, send func(topic string, payload []byte) error) (*Link, error) {
	init, err := sessionkey.NewInitiator(sessionkey.InitiatorConfig{DeviceID: d.ID, Suite: d.opts.Suite,
		Identity:      sessionkey.Identity{Signer: creds.Signer, Chain: [][]byte{creds.Leaf.Raw}},
		VerifyGateway: sessionkey.PeerVerifier(VerifyGateway(creds.Bundle, d.opts.Now, x509.ExtKeyUsageAny)), Now: d.opts.Now})
	if err != nil {
		return nil, err
	}
	return &Link{d: d, send: send, init: init}, nil
}

// Ready reports whether the link may seal: an epoch was made on it.
func (l *Link) Ready() bool { return l.fresh }

// Waiting reports whether a handshake is in flight.
func (l *Link) Waiting() bool { return l.init.Waiting() }

// Close forgets the handshake in flight.
func (l *Link) Close() { l.init.Reset() }

// Start sends a fresh msg1.
func (l *Link) Start() error {
	m1, err := l.init.Start()
	if err != nil {
		return err
	}
	l.step = l.d.opts.Now()
	l.retryAt = time.Time{}
	return l.send(l.d.base+"kex/req", m1)
}

// Seal seals record id (sent at unixMS) on channel. ErrNeedEpoch means
// the epoch is spent: the record waits, and a handshake has been started.
func (l *Link) Seal(channel string, id, unixMS uint64, body []byte) ([]byte, error) {
	pt := make([]byte, 16, 16+len(body))
	binary.BigEndian.PutUint64(pt, id)
	binary.BigEndian.PutUint64(pt[8:], unixMS)
	env, _, err := l.d.Ring.Seal(channel, append(pt, body...))
	if errors.Is(err, sessionkey.ErrNeedEpoch) && !l.init.Waiting() {
		if serr := l.Start(); serr != nil {
			return nil, serr
		}
	}
	return env, err
}

// Handle processes a message the gateway sent on topic. Retained
// messages are the caller's to drop (FKX1.md).
func (l *Link) Handle(topic string, payload []byte) error {
	base := l.d.base
	switch {
	case topic == base+"kex/resp":
		return l.kexResp(payload)
	case topic == base+"kex/hint":
		kid, err := sessionkey.ParseHint(payload)
		if err != nil {
			return nil
		}
		l.d.Stats.Hints.Add(1)
		now := l.d.opts.Now()
		if l.init.Waiting() || (!l.lastHnt.IsZero() && now.Sub(l.lastHnt) < time.Minute) {
			return nil
		}
		l.lastHnt = now
		l.d.opts.Log.Info("gateway hinted for a new handshake", "kid", hex.EncodeToString(kid[:]))
		return l.Start()
	case strings.HasPrefix(topic, base+"down/"):
		l.command(topic[len(base+"down/"):], payload)
	}
	return nil
}

func (l *Link) kexResp(b []byte) error {
	d := l.d
	switch {
	case !l.init.Waiting():
		return nil
	case l.init.Msg3() == nil:
		m3, err := l.init.HandleMsg2(b, nil)
		if err != nil {
			d.Stats.KexRefused.Add(1)
			d.opts.Log.Warn("msg2 refused", "reason", sessionkey.Reason(err), "err", err)
			return nil
		}
		l.step = d.opts.Now()
		return l.send(d.base+"kex/req", m3)
	default:
		if len(b) != 22 {
			return nil // waiting for msg4: only an exact envelope of 22 bytes
		}
		ep, err := l.init.HandleMsg4(b, d.Ring.Live)
		if errors.Is(err, sessionkey.ErrKIDCollision) {
			return l.Start()
		}
		if err != nil {
			d.Stats.KexRefused.Add(1)
			d.opts.Log.Warn("msg4 refused", "reason", sessionkey.Reason(err), "err", err)
			return nil
		}
		d.Ring.Add(ep)
		l.fresh, l.tries = true, 0
		d.Stats.Handshakes.Add(1)
		d.opts.Log.Debug("new epoch", "kid", hex.EncodeToString(ep.KID[:]))
		if d.opts.OnEpoch != nil {
			d.opts.OnEpoch(ep)
		}
	}
	return nil
}

// command opens and hands on a command, once.
func (l *Link) command(channel string, env []byte) {
	d := l.d
	if channel == sessionkey.KexChannel {
		d.Stats.CommandsRefused.Add(1)
		return
	}
	pt, _, err := d.Ring.Open(env, channel)
	if err == nil && len(pt) < 16 {
		err = errors.New("short command")
	}
	if err != nil {
		d.Stats.CommandsRefused.Add(1)
		d.opts.Log.Warn("command refused", "channel", channel, "reason", sessionkey.Reason(err))
		return
	}
	cmd := Command{Channel: channel, ID: binary.BigEndian.Uint64(pt), UnixMS: binary.BigEndian.Uint64(pt[8:]), Body: pt[16:]}
	d.mu.Lock()
	dup := cmd.ID <= d.lastCmdID
	if !dup {
		d.lastCmdID = cmd.ID
	}
	d.mu.Unlock()
	if dup {
		return
	}
	d.Stats.Commands.Add(1)
	if d.opts.OnCommand != nil {
		d.opts.OnCommand(cmd)
	}
}

// Tick applies the clock: the key ring's ratchet and epoch policy, and
// the handshake's step timeout and retry. Call it about once a second.
func (l *Link) Tick() error {
	d := l.d
	now := d.opts.Now()
	due := d.Ring.Tick()
	switch {
	case l.init.Waiting() && now.Sub(l.step) >= d.opts.StepTimeout:
		l.init.Reset()
		d.Stats.HandshakeFailures.Add(1)
		l.tries++
		l.retryAt = now.Add(d.opts.Backoff(l.tries - 1))
		d.opts.Log.Info("handshake timed out; retrying", "in", l.retryAt.Sub(now).Round(time.Millisecond))
	case !l.init.Waiting() && !l.retryAt.IsZero() && !now.Before(l.retryAt):
		return l.Start()
	case !l.init.Waiting() && l.retryAt.IsZero() && due && l.fresh:
		return l.Start()
	}
	return nil
}
