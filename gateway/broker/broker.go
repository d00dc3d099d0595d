// Package broker is the gateway's MQTT broker: mochi-mqtt v2 behind a
// listener and a single hook of fleetkey's own, which together close the
// gaps the design found in mochi v2.7.9:
//
//   - TLS 1.2+ with a client certificate required, verified in
//     VerifyConnection by trust.Bundle.Verify (chain, expiry, EKU, SPIFFE
//     identity, role, revocation) before mochi sees the connection;
//   - a deadline for the TLS handshake and for CONNECT (mochi has none);
//   - an accept loop that survives temporary errors such as EMFILE;
//   - a recover() around each connection, so a packet that panics mochi's
//     decoder (the 8-byte MQTT 5 SUBSCRIBE without options) closes that
//     connection only;
//   - MaximumPacketSize and MaximumClientWritesPending set;
//   - exactly one hook decides authentication and ACLs, so no permissive
//     hook can be OR-ed in;
//   - the client id must equal the certificate's device id.
package broker

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"fleetkey.dev/certs/identity"
	"fleetkey.dev/certs/trust"
	"fleetkey.dev/gateway/acl"
)

// Limits bound what one client can make the gateway do. The zero value is
// the defaults.
type Limits struct {
	// HandshakeTimeout bounds the TLS handshake; ConnectTimeout the time
	// from TCP accept to a CONNECT packet. Defaults 10 s each.
	HandshakeTimeout time.Duration
	ConnectTimeout   time.Duration
	// WriteTimeout bounds one write to a client; a client that takes no
	// data for that long is disconnected (its session stays). Default 5 s.
	WriteTimeout time.Duration
	// MaxPacketSize in bytes, refused before it is allocated. Default 64 KiB.
	MaxPacketSize uint32
	// MaxWritesPending per client: the queue of messages waiting to be
	// written to it (mochi's default of 8192 costs ~108 KB a connection;
	// 128 gives ~47 KB, 512 ~55 KB). It also bounds how far a service
	// subscriber may fall behind before deliveries wait for it (fkx1's
	// backpressure). mochi sizes it for every client alike, and devices are
	// most of the clients, so the default is 128.
	MaxWritesPending int32
	// MaxClients connected at once. Default 50,000.
	MaxClients int64
	// BufferSize of each client's read buffer in mochi. Device packets are
	// a few hundred bytes, and at tens of thousands of connections these
	// buffers are a large part of what each costs, so the default is 512
	// bytes (mochi's is 2 KiB); raise it for clients that stream large
	// messages. Writes are gathered into one of up to writeGather bytes
	// while more wait in a client's queue; that buffer lives only as long
	// as the queue is busy.
	BufferSize int
	// ConnPerSecondPerAddr bounds new connections from one IP address (a
	// token bucket with a burst of twice as many); more are closed before
	// the TLS handshake costs anything. Default 200: a factory NAT may put
	// many devices behind one address.
	ConnPerSecondPerAddr int
}

// writeGather bounds what mochi gathers for one write to a client whose
// queue is busy (a service taking thousands of records a second): one TLS
// record's worth.
const writeGather = 16 << 10

func (l Limits) withDefaults() Limits {
	if l.HandshakeTimeout == 0 {
		l.HandshakeTimeout = 10 * time.Second
	}
	if l.ConnectTimeout == 0 {
		l.ConnectTimeout = 10 * time.Second
	}
	if l.WriteTimeout == 0 {
		l.WriteTimeout = 5 * time.Second
	}
	if l.MaxPacketSize == 0 {
		l.MaxPacketSize = 64 << 10
	}
	if l.MaxWritesPending == 0 {
		l.MaxWritesPending = 128
	}
	if l.MaxClients == 0 {
		l.MaxClients = 50_000
	}
	if l.BufferSize == 0 {
		l.BufferSize = 512
	}
	if l.ConnPerSecondPerAddr == 0 {
		l.ConnPerSecondPerAddr = 200
	}
	return l
}

// Options configures a Broker.
type Options struct {
	Bundle *trust.Bundle
	// Certificate is the gateway's TLS server certificate (leaf + chain).
	Certificate tls.Certificate
	// IsRevoked reports whether a client certificate is revoked; nil means
	// none is.
	IsRevoked func(serial string) bool
	Limits    Limits
	// RequireTPM admits only devices whose certificate is TPM-bound (issued
	// after TPM attestation); services and admins are not affected.
	RequireTPM bool
	// Sessions turns on fkx1; nil refuses everything on devices/+/up/,
	// unless PlaintextTelemetry.
	Sessions *Sessions
	// PlaintextTelemetry, without Sessions, relays what a device publishes
	// on devices/{id}/up/{ch} as it is to fleet/telemetry/{id}/{ch}: mTLS
	// and the ACLs still hold, but records are not end-to-end encrypted,
	// not stored in the sink, and acknowledged when mochi takes them. It is
	// the gateway as a plain mTLS broker: for fleets without fkx1, and for
	// measuring against other brokers with the same load.
	PlaintextTelemetry bool
	Log                *slog.Logger
	// Now is the clock; default time.Now.
	Now func() time.Time
}

// Broker is a running gateway broker.
type Broker struct {
	opts    Options
	limits  Limits
	mqtt    *mqtt.Server
	log     *slog.Logger
	tls     *tls.Config
	stats   Stats
	mu      sync.Mutex
	clients map[*mqtt.Client]*session
	byConn  map[net.Conn]*mqtt.Client // the same clients, by connection
	revoked map[string]struct{}       // serials, lowercase hex
	fkx     *engine
}

// session is what the broker knows of a connected client: the identity
// its certificate proved, and when that certificate stops being valid.
type session struct {
	id     identity.ID
	serial string
	leaf   []byte      // DER, for fkx1 reference credentials
	timer  *time.Timer // fires at the certificate's NotAfter
	kicked string      // why the broker disconnected it, if it did
}

// Stats counts what the broker refused and survived, for metrics and tests.
type Stats struct {
	Handshakes        atomic.Int64
	HandshakeFailures atomic.Int64
	AuthDenied        atomic.Int64
	ACLDenied         atomic.Int64
	Panics            atomic.Int64
	AcceptErrors      atomic.Int64
	PlaintextRefused  atomic.Int64
	RevocationKicks   atomic.Int64
	ExpiryKicks       atomic.Int64
	WillsSent         atomic.Int64
	ConnRateLimited   atomic.Int64

	reasons sync.Map // [2]string{stage, reason} -> *atomic.Int64
}

// refused counts a refusal at a stage (handshake, connect, acl, fkx1)
// with its reason, for the metrics' labels. It takes no lock once a
// reason has been seen: a flood of refusals must stay cheap.
func (s *Stats) refused(stage, reason string) {
	k := [2]string{stage, reason}
	c, ok := s.reasons.Load(k)
	if !ok {
		c, _ = s.reasons.LoadOrStore(k, new(atomic.Int64))
	}
	c.(*atomic.Int64).Add(1)
}

// Refusals returns the refusal counts by stage and reason.
func (s *Stats) Refusals() map[[2]string]int64 {
	out := map[[2]string]int64{}
	s.reasons.Range(func(k, v any) bool {
		out[k.([2]string)] = v.(*atomic.Int64).Load()
		return true
	})
	return out
}

// New builds a broker; it listens once Serve is called.
func New(opts Options) (*Broker, error) {
	if opts.Bundle == nil || len(opts.Certificate.Certificate) == 0 {
		return nil, errors.New("broker needs a trust bundle and a server certificate")
	}
	if opts.Log == nil {
		opts.Log = slog.New(slog.DiscardHandler)
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	b := &Broker{opts: opts, limits: opts.Limits.withDefaults(), log: opts.Log, clients: map[*mqtt.Client]*session{}, byConn: map[net.Conn]*mqtt.Client{}, revoked: map[string]struct{}{}}
	caps := mqtt.NewDefaultServerCapabilities()
	caps.MaximumPacketSize = b.limits.MaxPacketSize
	caps.MaximumClientWritesPending = b.limits.MaxWritesPending
	caps.MaximumClients = b.limits.MaxClients
	caps.MaximumSessionExpiryInterval = 24 * 60 * 60
	b.mqtt = mqtt.New(&mqtt.Options{Capabilities: caps, Logger: opts.Log.With("component", "mochi"), InlineClient: true,
		ClientNetReadBufferSize: b.limits.BufferSize, ClientNetWriteBufferSize: writeGather})
	if err := b.mqtt.AddHook(&hook{b: b}, nil); err != nil {
		return nil, err
	}
	if opts.Sessions != nil && opts.PlaintextTelemetry {
		return nil, errors.New("plaintext telemetry and fkx1 sessions exclude each other")
	}
	if opts.PlaintextTelemetry {
		opts.Sessions = &Sessions{Plaintext: true}
	}
	if opts.Sessions != nil {
		e, err := newEngine(b, *opts.Sessions)
		if err != nil {
			return nil, err
		}
		b.fkx = e
	}
	b.tls = &tls.Config{
		MinVersion:   tls.VersionTLS12,
		Certificates: []tls.Certificate{opts.Certificate},
		// The certificate is required here and verified in full (chain,
		// expiry, EKU, identity, role, revocation) by VerifyConnection,
		// with the one verifier the whole system uses.
		ClientAuth:       tls.RequireAnyClientCert,
		VerifyConnection: b.verifyConnection,
		Time:             opts.Now,
	}
	return b, nil
}

// verifyConnection refuses, during the TLS handshake, any client that is
// not a valid, unrevoked device, service or admin of this fleet.
func (b *Broker) verifyConnection(cs tls.ConnectionState) error {
	peer, err := b.opts.Bundle.Verify(cs.PeerCertificates, trust.VerifyOptions{
		Now:       b.opts.Now(),
		Roles:     []identity.Role{identity.RoleDevice, identity.RoleService, identity.RoleAdmin},
		IsRevoked: func(leaf *x509.Certificate) bool { return b.isRevoked(leaf.SerialNumber.Text(16)) },
	})
	if err == nil {
		err = b.checkTPM(peer)
	}
	if err != nil {
		reason := string(trust.ReasonOf(err))
		if errors.Is(err, errNotTPMBound) {
			reason = "not-tpm-bound"
		}
		if reason == "" {
			reason = "invalid"
		}
		b.stats.HandshakeFailures.Add(1)
		b.stats.refused("handshake", reason)
		b.log.Info("TLS client refused", "reason", reason, "err", err)
	}
	return err
}

// errNotTPMBound refuses a device without a TPM-bound certificate when
// the gateway requires one.
var errNotTPMBound = errors.New("this gateway admits only TPM-bound device certificates (enroll with TPM attestation)")

func (b *Broker) checkTPM(peer *trust.Peer) error {
	if b.opts.RequireTPM && peer.ID.Role == identity.RoleDevice && !peer.TPMBound {
		return fmt.Errorf("%s: %w", peer.ID, errNotTPMBound)
	}
	return nil
}

func (b *Broker) isRevoked(serial string) bool {
	b.mu.Lock()
	_, revoked := b.revoked[serial]
	b.mu.Unlock()
	return revoked || (b.opts.IsRevoked != nil && b.opts.IsRevoked(serial))
}

// Revoke marks a certificate serial (lowercase hex) revoked: new
// handshakes with it are refused, and a client connected with it is
// disconnected at once, its Will suppressed and its session removed. It
// reports how many clients it disconnected.
func (b *Broker) Revoke(serial string) int {
	b.mu.Lock()
	b.revoked[serial] = struct{}{}
	var victims []*mqtt.Client
	var ids []identity.ID
	for cl, s := range b.clients {
		if s.serial == serial {
			victims = append(victims, cl)
			ids = append(ids, s.id)
		}
	}
	b.mu.Unlock()
	for i, cl := range victims {
		b.kick(cl, "revoked")
		if b.fkx != nil && ids[i].Role == identity.RoleDevice {
			b.fkx.forget(ids[i].Name)
		}
	}
	return len(victims)
}

// kick disconnects a client the broker no longer trusts. Its Will is
// cleared first: a revoked or expired device must not get a last word
// (mochi would otherwise publish it on a server-side disconnect).
func (b *Broker) kick(cl *mqtt.Client, reason string) {
	b.mu.Lock()
	s, ok := b.clients[cl]
	if ok {
		s.kicked = reason
	}
	b.mu.Unlock()
	if !ok {
		return
	}
	atomic.StoreUint32(&cl.Properties.Will.Flag, 0)
	switch reason {
	case "revoked":
		b.stats.RevocationKicks.Add(1)
	case "expired":
		b.stats.ExpiryKicks.Add(1)
	}
	b.log.Info("disconnecting client", "identity", s.id.String(), "serial", s.serial, "reason", reason)
	_ = b.mqtt.DisconnectClient(cl, packets.ErrNotAuthorized)
	cl.Stop(errors.New("certificate " + reason))
}

// Stats returns the counters.
func (b *Broker) Stats() *Stats { return &b.stats }

// Serve accepts connections on ln until ctx ends, then closes every
// client and returns.
func (b *Broker) Serve(ctx context.Context, ln net.Listener) error {
	l := &listener{b: b, ln: ln, id: "mtls"}
	if err := b.mqtt.AddListener(l); err != nil {
		return err
	}
	// The session-key layer's workers and delivery shards run before the
	// first client can publish.
	if b.fkx != nil {
		b.fkx.start(ctx)
	}
	if err := b.mqtt.Serve(); err != nil {
		return err
	}
	<-ctx.Done()
	return b.mqtt.Close()
}

// FKXStats returns the session-key layer's counters (nil without fkx1).
func (b *Broker) FKXStats() *FKXStats {
	if b.fkx == nil {
		return nil
	}
	return &b.fkx.stats
}

// sessionOf returns what the broker knows of a connected client.
func (b *Broker) sessionOf(cl *mqtt.Client) *session {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.clients[cl]
}

// identityOf returns the identity bound to a connected client.
func (b *Broker) identityOf(cl *mqtt.Client) (identity.ID, bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	s, ok := b.clients[cl]
	if !ok || s.kicked != "" {
		return identity.ID{}, false
	}
	return s.id, true
}

// hook is the one hook that decides. It embeds mochi's HookBase only for
// the methods it does not provide.
type hook struct {
	mqtt.HookBase
	b *Broker
}

func (h *hook) ID() string { return "fleetkey" }

func (h *hook) Provides(b byte) bool {
	switch b {
	case mqtt.OnConnectAuthenticate, mqtt.OnACLCheck, mqtt.OnDisconnect, mqtt.OnPublish, mqtt.OnWillSent, mqtt.OnPacketRead, mqtt.OnQosComplete,
		mqtt.OnSubscribed, mqtt.OnUnsubscribed, mqtt.OnSessionEstablished, mqtt.OnQosPublish, mqtt.OnPacketSent:
		return true
	}
	return false
}

// OnConnectAuthenticate binds the session to the certificate's identity:
// a device's client id must be its device id; a service or admin uses its
// own name.
func (h *hook) OnConnectAuthenticate(cl *mqtt.Client, pk packets.Packet) bool {
	tc, ok := cl.Net.Conn.(interface{ ConnectionState() tls.ConnectionState })
	if !ok {
		h.b.denyConnect("not-tls")
		return false
	}
	peer := tc.ConnectionState().PeerCertificates
	id, err := trust.Identity(peer)
	if err != nil {
		h.b.denyConnect("no-identity", "err", err)
		return false
	}
	if !clientIDAllowed(cl.ID, id) {
		h.b.denyConnect("client-id-mismatch", "client_id", cl.ID, "identity", id.String())
		return false
	}
	leaf := peer[0]
	serial := leaf.SerialNumber.Text(16)
	// Revoked between its handshake and its CONNECT.
	if h.b.isRevoked(serial) {
		h.b.denyConnect("revoked", "identity", id.String())
		return false
	}
	s := &session{id: id, serial: serial, leaf: leaf.Raw}
	s.timer = time.AfterFunc(leaf.NotAfter.Sub(h.b.opts.Now()), func() { h.b.kick(cl, "expired") })
	h.b.mu.Lock()
	h.b.clients[cl] = s
	h.b.byConn[cl.Net.Conn] = cl
	h.b.mu.Unlock()
	if h.b.fkx != nil {
		if id.Role == identity.RoleDevice {
			h.b.fkx.connected(id.Name)
		} else {
			h.b.fkx.queued.Store(cl, new(writeQueue)) // before anything can be queued for it
		}
	}
	return true
}

// clientIDAllowed binds a client id to the certificate's identity. A
// device's client id is its device id, exactly. A service or admin may also
// open several connections as "<name>/<instance>" (a subscriber and a
// publisher, or a pool of workers): '/' cannot occur in an id, so such a
// client id never names a device's session or another identity's.
func clientIDAllowed(clientID string, id identity.ID) bool {
	if clientID == id.Name {
		return true
	}
	if id.Role != identity.RoleService && id.Role != identity.RoleAdmin {
		return false
	}
	inst, ok := strings.CutPrefix(clientID, id.Name+"/")
	return ok && identity.ValidateID(inst) == nil
}

func (b *Broker) denyConnect(reason string, args ...any) {
	b.stats.AuthDenied.Add(1)
	b.stats.refused("connect", reason)
	b.log.Info("CONNECT refused", append([]any{"reason", reason}, args...)...)
}

// OnACLCheck applies the ACL table to the client's bound identity.
func (h *hook) OnACLCheck(cl *mqtt.Client, topic string, write bool) bool {
	id, ok := h.b.identityOf(cl)
	if !ok {
		h.b.stats.ACLDenied.Add(1)
		return false
	}
	d := acl.Check(id, topic, write)
	if !d.Allowed {
		h.b.stats.ACLDenied.Add(1)
		h.b.stats.refused("acl", map[bool]string{true: "publish", false: "subscribe"}[write])
		h.b.log.Info("ACL denied", "identity", id.String(), "topic", topic, "write", write, "reason", d.Reason)
	}
	return d.Allowed
}

// OnPacketRead answers a QoS 1 PUBLISH from an MQTT 3.1.1 client that the
// ACL will refuse. MQTT 3.1.1 has no negative PUBACK: a server must either
// acknowledge and drop, or close the connection [MQTT-3.3.5-2], and mochi
// closes it, so one device with a wrong topic in its configuration would
// reconnect in a loop. Here the PUBACK goes out, the packet continues as
// QoS 0, and mochi's ACL check drops it (and counts it) without a word.
func (h *hook) OnPacketRead(cl *mqtt.Client, pk packets.Packet) (packets.Packet, error) {
	if pk.FixedHeader.Type != packets.Publish || pk.FixedHeader.Qos != 1 || cl.Properties.ProtocolVersion == 5 {
		return pk, nil
	}
	id, ok := h.b.identityOf(cl)
	if ok && acl.Check(id, pk.TopicName, true).Allowed {
		return pk, nil
	}
	ack := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Puback}, PacketID: pk.PacketID}
	if err := cl.WritePacket(ack); err != nil {
		return pk, err
	}
	pk.FixedHeader.Qos, pk.PacketID = 0, 0 // a QoS 0 packet carries no id
	return pk, nil
}

// OnPublish hands the session-key layer what it owns: handshakes,
// envelopes on up/, commands. Without it, everything a device sends on
// devices/{id}/up/ is refused: the gateway can open no envelope.
func (h *hook) OnPublish(cl *mqtt.Client, pk packets.Packet) (packets.Packet, error) {
	if cl.Net.Inline {
		return pk, nil
	}
	id, ok := h.b.identityOf(cl)
	if ok && h.b.fkx != nil {
		if handled, err := h.b.fkx.onPublish(cl, id, pk); handled {
			if errors.Is(err, packets.ErrRejectPacket) {
				// The session-key layer took the packet and answers it
				// itself (a PUBACK once the record is stored). It goes back
				// to mochi ignored and at QoS 0, so that mochi neither
				// delivers nor acknowledges it. Returning ErrRejectPacket
				// has the same effect, but mochi then boxes the whole packet
				// into a debug log call: about 1 KB of garbage per record.
				pk.Ignore, pk.FixedHeader.Qos, pk.FixedHeader.Retain = true, 0, false
				return pk, nil
			}
			return pk, err
		}
	}
	if ok && id.Role == identity.RoleDevice && isUp(pk.TopicName) {
		h.b.stats.PlaintextRefused.Add(1)
		return pk, packets.ErrRejectPacket
	}
	return pk, nil
}

func isUp(topic string) bool {
	var levels int
	for i := 0; i < len(topic); i++ {
		if topic[i] == '/' {
			levels++
			if levels == 2 {
				rest := topic[i+1:]
				return len(rest) > 3 && rest[:3] == "up/"
			}
		}
	}
	return false
}

// OnDisconnect forgets the client, and for one the broker kicked out,
// its session too: a revoked device keeps no subscriptions or queued
// messages to come back to.
func (h *hook) OnDisconnect(cl *mqtt.Client, err error, expire bool) {
	h.b.mu.Lock()
	s := h.b.clients[cl]
	delete(h.b.clients, cl)
	if h.b.byConn[cl.Net.Conn] == cl {
		delete(h.b.byConn, cl.Net.Conn)
	}
	h.b.mu.Unlock()
	if s == nil {
		return
	}
	s.timer.Stop()
	if h.b.fkx != nil {
		h.b.fkx.queued.Delete(cl)
		h.b.fkx.subscriptionsChanged()
		h.b.fkx.room.signal()
		if s.id.Role == identity.RoleDevice {
			h.b.fkx.disconnected(s.id.Name)
		}
	}
	if s.kicked != "" {
		h.b.mqtt.UnsubscribeClient(cl)
		cl.ClearInflights()
		if cur, ok := h.b.mqtt.Clients.Get(cl.ID); ok && cur == cl {
			h.b.mqtt.Clients.Delete(cl.ID)
		}
	}
}

// OnSubscribed, OnUnsubscribed and OnSessionEstablished invalidate the
// session-key layer's cache of who subscribes to what.
func (h *hook) OnSubscribed(cl *mqtt.Client, pk packets.Packet, reasonCodes []byte) {
	if h.b.fkx != nil {
		h.b.fkx.subscriptionsChanged()
	}
}

func (h *hook) OnUnsubscribed(cl *mqtt.Client, pk packets.Packet) {
	if h.b.fkx != nil {
		h.b.fkx.subscriptionsChanged()
	}
}

func (h *hook) OnSessionEstablished(cl *mqtt.Client, pk packets.Packet) {
	if h.b.fkx != nil {
		h.b.fkx.subscriptionsChanged()
	}
}

// OnQosComplete wakes deliveries waiting for a subscriber's room.
func (h *hook) OnQosComplete(cl *mqtt.Client, pk packets.Packet) {
	if h.b.fkx != nil {
		h.b.fkx.room.signal()
	}
}

// OnQosPublish and OnPacketSent keep track of the QoS 1 messages mochi has
// queued for a service but not yet written to it (engine.queued, a
// writeQueue): mochi drops what overflows a client's write queue, so
// deliveries wait for that count as well as for the service's
// acknowledgements. mochi announces every QoS 1 PUBLISH it queues, holds
// for a receive quota or resends with OnQosPublish before writing it, and
// every write calls OnPacketSent.
func (h *hook) OnQosPublish(cl *mqtt.Client, pk packets.Packet, sent int64, resends int) {
	if h.b.fkx != nil && pk.FixedHeader.Type == packets.Publish {
		if q, ok := h.b.fkx.queued.Load(cl); ok {
			q.(*writeQueue).announced(pk.PacketID)
		}
	}
}

func (h *hook) OnPacketSent(cl *mqtt.Client, pk packets.Packet, b []byte) {
	if h.b.fkx != nil && pk.FixedHeader.Type == packets.Publish && pk.FixedHeader.Qos > 0 {
		if q, ok := h.b.fkx.queued.Load(cl); ok {
			q.(*writeQueue).written(pk.PacketID)
			h.b.fkx.room.signal()
		}
	}
}

// OnWillSent counts Wills published (none may come from a kicked client).
func (h *hook) OnWillSent(cl *mqtt.Client, pk packets.Packet) {
	h.b.stats.WillsSent.Add(1)
}

// Info is a snapshot of the broker's connection and message counters.
type Info struct {
	ClientsConnected, MessagesReceived, MessagesSent int64
}

// Info reads mochi's counters atomically.
func (b *Broker) Info() Info {
	i := b.mqtt.Info
	return Info{
		ClientsConnected: atomic.LoadInt64(&i.ClientsConnected),
		MessagesReceived: atomic.LoadInt64(&i.MessagesReceived),
		MessagesSent:     atomic.LoadInt64(&i.MessagesSent),
	}
}
