package broker

import (
	"context"
	"crypto/x509"
	"encoding/binary"
	"errors"
	"fmt"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"fleetkey.dev/certs/identity"
	"fleetkey.dev/certs/trust"
	"fleetkey.dev/gateway/sink"
	"fleetkey.dev/sessionkey"
)

// Sessions turns on fkx1 at the gateway: handshakes on kex/req, envelopes
// on up/ decrypted into the sink and onto fleet/telemetry/, commands from
// fleet/commands/ encrypted onto down/.
type Sessions struct {
	// Identity signs msg2: the gateway certificate's key and chain.
	Identity sessionkey.Identity
	// Suites answered; default both.
	Suites   []sessionkey.Suite
	Rotation sessionkey.Rotation
	// Sink stores each record before its PUBACK.
	Sink *sink.Sink
	// Workers run handshakes off the publishers' goroutines; default
	// GOMAXPROCS. QueueSize bounds the handshakes waiting (default 4096);
	// beyond it msg1/msg3 are dropped and counted, and the device retries.
	Workers, QueueSize int
	// HintEvery is the least time between hints to one device. Default 10 s.
	HintEvery time.Duration
	// MaxQueuedCommands per device wait for a key the device has
	// confirmed; more are refused. Default 64.
	MaxQueuedCommands int
	// SubscriberWindow is how many unacknowledged QoS 1 messages a service
	// subscriber may have before deliveries wait for it (default 1024).
	// Deliveries also wait while mochi's write queue for it holds
	// MaxWritesPending less a margin for the delivery goroutines, so that
	// queue never overflows and drops. SubscriberStall is how long they
	// wait before the subscriber is disconnected, its session keeping what
	// it has not acknowledged (default 30 s).
	SubscriberWindow int
	SubscriberStall  time.Duration
	// Plaintext relays records as they are (Options.PlaintextTelemetry):
	// no handshakes, no envelopes, no sink; deliveries keep the same
	// order per device and the same subscriber backpressure.
	Plaintext bool
}

// FKXStats counts the session-key layer's work and refusals; refusals are
// also in Stats.Refusals under stage "fkx1".
type FKXStats struct {
	Handshakes       atomic.Int64 // completed
	KexDropped       atomic.Int64 // handshake queue full
	Records          atomic.Int64 // stored and delivered
	Duplicates       atomic.Int64 // retransmissions acknowledged, not delivered again
	EnvelopesRefused atomic.Int64
	Commands         atomic.Int64 // sent to devices
	CommandsRefused  atomic.Int64
	Hints            atomic.Int64
	SinkFailures     atomic.Int64
	SubscriberWaits  atomic.Int64 // deliveries that waited for a slow subscriber
	SubscriberKicks  atomic.Int64
}

type engine struct {
	b     *Broker
	cfg   Sessions
	rcfg  *sessionkey.ResponderConfig
	pub   *mqtt.Client // inline publisher
	jobs  chan func()
	stats FKXStats
	cmdID atomic.Uint64

	mu      sync.Mutex
	devices map[string]*deviceState

	room      roomSignal
	subsGen   atomic.Uint64
	subsCache sync.Map // topic -> *subsEntry
	ctx       context.Context
	shards    []*shard
	// queued counts, per service client (*mqtt.Client -> *writeQueue),
	// the QoS 1 messages mochi has queued for it and not yet written; a
	// delivery waits while it reaches queueWindow (see hook.OnQosPublish).
	queued      sync.Map
	queueWindow int
}

// deviceState is the gateway's fkx1 state of one device.
type deviceState struct {
	mu        sync.Mutex // serialises handshakes
	resp      *sessionkey.Responder
	ring      *sessionkey.Keyring
	lastHint  atomic.Int64 // unix nanos
	cmdMu     sync.Mutex
	queued    [][2]string // channel, body
	connected atomic.Int32
	leftAt    atomic.Int64 // unix nanos of the last disconnect
	kexQueued atomic.Int32 // handshake messages waiting for a worker
}

func newEngine(b *Broker, cfg Sessions) (*engine, error) {
	if cfg.Sink == nil && !cfg.Plaintext {
		return nil, errors.New("fkx1 needs a telemetry sink")
	}
	if cfg.Workers <= 0 {
		cfg.Workers = runtime.GOMAXPROCS(0)
	}
	if cfg.QueueSize <= 0 {
		cfg.QueueSize = 4096
	}
	if cfg.HintEvery == 0 {
		cfg.HintEvery = 10 * time.Second
	}
	if cfg.MaxQueuedCommands == 0 {
		cfg.MaxQueuedCommands = 64
	}
	if cfg.SubscriberWindow == 0 {
		cfg.SubscriberWindow = 1024
	}
	if cfg.SubscriberStall == 0 {
		cfg.SubscriberStall = 30 * time.Second
	}
	var rcfg *sessionkey.ResponderConfig
	var err error
	if !cfg.Plaintext {
		rcfg, err = responderConfig(b, cfg)
		if err != nil {
			return nil, err
		}
	}
	e := &engine{b: b, cfg: cfg, rcfg: rcfg, devices: map[string]*deviceState{}, jobs: make(chan func(), cfg.QueueSize),
		queueWindow: max(int(b.limits.MaxWritesPending)-deliveryMargin, 1)}
	e.pub = b.mqtt.NewClient(nil, mqtt.LocalListener, "fleetkey-gateway", true)
	e.cmdID.Store(uint64(time.Now().UnixNano())) // rises across restarts
	e.room.ch = make(chan struct{})
	return e, nil
}

// responderConfig is fkx1's responder: the gateway's identity, and the
// devices' credentials checked as at TLS.
func responderConfig(b *Broker, cfg Sessions) (*sessionkey.ResponderConfig, error) {
	return sessionkey.NewResponderConfig(sessionkey.ResponderConfig{
		Suites: cfg.Suites, Identity: cfg.Identity, Now: b.opts.Now,
		VerifyDevice: func(id string, chain []*x509.Certificate) error {
			peer, err := b.opts.Bundle.Verify(chain, trust.VerifyOptions{Now: b.opts.Now(), Usage: x509.ExtKeyUsageAny,
				Roles: []identity.Role{identity.RoleDevice}, IsRevoked: func(l *x509.Certificate) bool { return b.isRevoked(l.SerialNumber.Text(16)) }})
			if err != nil {
				return err
			}
			if err := b.checkTPM(peer); err != nil {
				return err
			}
			if peer.ID.Name != id {
				return fmt.Errorf("the credential names %s, not %s", peer.ID.Name, id)
			}
			return nil
		}})
}

// start runs the workers, the delivery shards and the housekeeping until
// ctx ends.
func (e *engine) start(ctx context.Context) {
	e.shards = make([]*shard, min(max(2, e.cfg.Workers), deliveryMargin))
	for i := range e.shards {
		sh := &shard{jobs: make(chan func(), 1024)}
		e.shards[i] = sh
		go func() {
			for {
				select {
				case <-ctx.Done():
					return
				case job := <-sh.jobs:
					job()
				}
				if len(sh.acks) >= maxAcksPending || len(sh.acks) > 0 && len(sh.jobs) == 0 {
					e.flushAcks(sh)
				}
			}
		}()
	}
	e.ctx = ctx
	for i := 0; i < e.cfg.Workers; i++ {
		go func() {
			for {
				select {
				case <-ctx.Done():
					return
				case job := <-e.jobs:
					job()
				}
			}
		}()
	}
	go func() {
		t := time.NewTicker(time.Minute)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
				e.housekeeping()
			}
		}
	}()
}

func (e *engine) state(id string) *deviceState {
	e.mu.Lock()
	defer e.mu.Unlock()
	st := e.devices[id]
	if st == nil {
		st = &deviceState{resp: sessionkey.NewResponder(e.rcfg, id), ring: sessionkey.NewKeyring(true, e.cfg.Rotation, e.b.opts.Now)}
		e.devices[id] = st
	}
	return st
}

func (e *engine) existing(id string) *deviceState {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.devices[id]
}

// forget wipes a device's keys (it was revoked).
func (e *engine) forget(id string) {
	e.mu.Lock()
	st := e.devices[id]
	delete(e.devices, id)
	e.mu.Unlock()
	if st != nil {
		st.ring.Wipe()
	}
}

// housekeeping ticks every keyring (retirement, the time ratchet) and
// drops the state of devices gone for longer than an epoch lasts.
func (e *engine) housekeeping() {
	e.mu.Lock()
	states := make(map[string]*deviceState, len(e.devices))
	for id, st := range e.devices {
		states[id] = st
	}
	e.mu.Unlock()
	rot := e.cfg.Rotation
	if rot.EpochEvery == 0 {
		rot.EpochEvery = time.Hour
	}
	now := e.b.opts.Now()
	for id, st := range states {
		st.ring.Tick()
		left := st.leftAt.Load()
		if st.connected.Load() == 0 && left != 0 && now.Sub(time.Unix(0, left)) > rot.EpochEvery {
			e.mu.Lock()
			if e.devices[id] == st {
				delete(e.devices, id)
			}
			e.mu.Unlock()
			st.ring.Wipe()
		}
	}
}

// connected notes a device's new connection. Commands wait for a d2g
// envelope on it: a device that restarted has lost every older kid.
func (e *engine) connected(id string) {
	st := e.state(id)
	st.ring.Unconfirm()
	st.connected.Add(1)
}

func (e *engine) disconnected(id string) {
	if st := e.existing(id); st != nil {
		st.connected.Add(-1)
		st.leftAt.Store(e.b.opts.Now().UnixNano())
	}
}

// topicParts splits a/b/c/d into its four levels.
func topicParts(topic string) ([4]string, bool) {
	var p [4]string
	for i := 0; i < 3; i++ {
		j := strings.IndexByte(topic, '/')
		if j < 0 {
			return p, false
		}
		p[i], topic = topic[:j], topic[j+1:]
	}
	if strings.IndexByte(topic, '/') >= 0 {
		return p, false
	}
	p[3] = topic
	return p, true
}

// onPlaintext relays a device's record as it is to the services, on the
// device's delivery shard (its order kept), after every QoS 1 subscriber
// has room, and only then acknowledges it: a slow service slows the
// devices instead of losing what the gateway acknowledged. Commands go to
// devices/{id}/down/ as they are. There is no fkx1 to speak.
func (e *engine) onPlaintext(cl *mqtt.Client, id identity.ID, p [4]string, pk packets.Packet) (bool, error) {
	switch {
	case id.Role == identity.RoleDevice && p[0] == "devices" && p[1] == id.Name && p[2] == "kex":
		e.refuse("plaintext-mode", &e.stats.KexDropped)
		e.nack(cl, pk, "fkx1 is off (plaintext_telemetry)")
		return true, packets.ErrRejectPacket
	case id.Role == identity.RoleDevice && p[0] == "devices" && p[1] == id.Name && p[2] == "up":
		topic := "fleet/telemetry/" + id.Name + "/" + p[3]
		payload, ref, sh := pk.Payload, ackOf(pk), e.shardOf(id.Name)
		e.onShard(sh, func() {
			e.waitRoom(sh, topic)
			e.publish(topic, payload, nil)
			e.stats.Records.Add(1)
			e.ackOnShard(sh, cl, ref)
		})
		return true, packets.ErrRejectPacket
	case id.Role != identity.RoleDevice && p[0] == "fleet" && p[1] == "commands":
		if identity.ValidateID(p[2]) != nil {
			e.refuse("bad-device-id", &e.stats.CommandsRefused)
			return true, nil
		}
		e.publish("devices/"+p[2]+"/down/"+p[3], pk.Payload, nil)
		e.stats.Commands.Add(1)
		return true, nil
	}
	return false, nil
}

// onPublish handles what the session-key layer owns. handled reports
// whether it took the packet; err is then what OnPublish returns.
func (e *engine) onPublish(cl *mqtt.Client, id identity.ID, pk packets.Packet) (handled bool, err error) {
	p, ok := topicParts(pk.TopicName)
	if !ok {
		return false, nil
	}
	if e.cfg.Plaintext {
		return e.onPlaintext(cl, id, p, pk)
	}
	switch {
	case id.Role == identity.RoleDevice && p[0] == "devices" && p[1] == id.Name && p[2] == "kex" && p[3] == "req":
		e.ack(cl, ackOf(pk))
		e.kex(cl, id.Name, pk)
		return true, packets.ErrRejectPacket
	case id.Role == identity.RoleDevice && p[0] == "devices" && p[1] == id.Name && p[2] == "up":
		e.up(cl, id.Name, p[3], pk)
		return true, packets.ErrRejectPacket
	case id.Role != identity.RoleDevice && p[0] == "fleet" && p[1] == "commands":
		if p[3] == sessionkey.KexChannel {
			e.refuse("kex-channel", &e.stats.CommandsRefused)
			e.ack(cl, ackOf(pk))
			return true, packets.ErrRejectPacket
		}
		e.command(p[2], p[3], pk.Payload)
		return true, nil
	}
	return false, nil
}

func (e *engine) refuse(reason string, c *atomic.Int64) {
	c.Add(1)
	e.b.stats.refused("fkx1", reason)
}

// ack writes a PUBACK for a QoS 1 packet at once (appendPuback, under the
// client's write lock); a client that does not read is cut off by its
// write deadline. Stored records' PUBACKs go through ackOnShard.
func (e *engine) ack(cl *mqtt.Client, ref ackRef) {
	if ref.qos > 0 {
		_ = writeRaw(cl, appendPuback(nil, ref.id))
	}
}

// ackRef is what a later PUBACK needs of a publish. Closures that wait
// for the sink keep it rather than the packet: a packets.Packet is about
// 1 KB, and captured it moved to the heap for every record.
type ackRef struct {
	qos byte
	id  uint16
}

func ackOf(pk packets.Packet) ackRef { return ackRef{qos: pk.FixedHeader.Qos, id: pk.PacketID} }

// nack refuses a QoS 1 envelope: PUBACK 0x80 under MQTT 5; under 3.1.1,
// which has no negative PUBACK, the connection is closed (FKX1.md,
// Receiver), and the device reconnects and rekeys.
func (e *engine) nack(cl *mqtt.Client, pk packets.Packet, why string) {
	if pk.FixedHeader.Qos == 0 {
		return
	}
	if cl.Properties.ProtocolVersion == 5 {
		_ = cl.WritePacket(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Puback}, PacketID: pk.PacketID,
			ReasonCode: packets.ErrUnspecifiedError.Code})
		return
	}
	cl.Stop(errors.New("fkx1: envelope refused: " + why))
}

// publish sends payload from the gateway itself, at QoS 1.
func (e *engine) publish(topic string, payload []byte, user []packets.UserProperty) {
	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}, TopicName: topic, Payload: payload, PacketID: 1}
	pk.Properties.User = user
	if err := e.b.mqtt.InjectPacket(e.pub, pk); err != nil {
		e.b.log.Warn("publishing", "topic", topic, "err", err)
	}
}

// kex queues a handshake message for a worker.
func (e *engine) kex(cl *mqtt.Client, id string, pk packets.Packet) {
	if pk.FixedHeader.Retain {
		e.refuse("kex-retained", &e.stats.KexDropped)
		return
	}
	payload := pk.Payload
	// What cannot be a msg1 or msg3 is dropped here, on the publisher's
	// goroutine, for the price of three byte compares.
	if len(payload) < 3 || len(payload) > sessionkey.MaxKexMessage || payload[0] != 0x01 || (payload[1] != 0x01 && payload[1] != 0x03) {
		e.refuse("malformed", &e.stats.KexDropped)
		return
	}
	st := e.state(id)
	// One device holds at most maxKexQueued places in the workers' queue,
	// so a device flooding kex/req cannot crowd out the others.
	if st.kexQueued.Add(1) > maxKexQueued {
		st.kexQueued.Add(-1)
		e.refuse("kex-flood", &e.stats.KexDropped)
		return
	}
	var leaf []byte
	if s := e.b.sessionOf(cl); s != nil {
		leaf = s.leaf
	}
	job := func() {
		st.kexQueued.Add(-1)
		e.handshake(id, payload, leaf)
	}
	select {
	case e.jobs <- job:
	default:
		st.kexQueued.Add(-1)
		e.refuse("kex-overload", &e.stats.KexDropped)
	}
}

// maxKexQueued bounds one device's handshake messages waiting for a
// worker (a handshake needs one at a time; QoS 1 duplicates may add one).
const maxKexQueued = 4

func (e *engine) handshake(id string, msg, leaf []byte) {
	if len(msg) < 2 || len(msg) > sessionkey.MaxKexMessage {
		e.refuse("malformed", &e.stats.KexDropped)
		return
	}
	st := e.state(id)
	st.mu.Lock()
	defer st.mu.Unlock()
	var out []byte
	var err error
	switch msg[1] {
	case 0x01:
		out, err = st.resp.HandleMsg1(msg)
	case 0x03:
		var ep *sessionkey.Epoch
		out, ep, err = st.resp.HandleMsg3(msg, leaf, st.ring.Live)
		if ep != nil {
			st.ring.Add(ep)
			e.stats.Handshakes.Add(1)
		}
	default:
		err = sessionkey.ErrMessage
	}
	if err != nil {
		e.refuse(sessionkey.Reason(err), &e.stats.KexDropped)
		e.b.log.Debug("fkx1 handshake message refused", "device", id, "reason", sessionkey.Reason(err), "err", err)
		return
	}
	e.publish("devices/"+id+"/kex/resp", out, nil)
}

// deliveryMargin bounds the delivery goroutines, each of which may pass
// the subscriber-room check at once and add one message.
const deliveryMargin = 8

// recordHeader is u64(record_id) ‖ u64(unix_ms).
const recordHeader = 16

// up opens a d2g envelope, stores its record, and acknowledges it once
// durable; then publishes it in plaintext to fleet/telemetry/.
func (e *engine) up(cl *mqtt.Client, id, channel string, pk packets.Packet) {
	if channel == sessionkey.KexChannel {
		e.refuse("kex-channel", &e.stats.EnvelopesRefused)
		e.nack(cl, pk, "the kex channel is reserved")
		return
	}
	st := e.state(id)
	pt, kid, seq, err := st.ring.OpenPending(pk.Payload, channel)
	if err == nil && len(pt) < recordHeader {
		err = fmt.Errorf("%w: a record of %d bytes", sessionkey.ErrMalformed, len(pt))
	}
	if err != nil {
		reason := sessionkey.Reason(err)
		if errors.Is(err, sessionkey.ErrReplay) {
			// A QoS 1 duplicate: acknowledged, counted, not delivered.
			e.refuse(reason, &e.stats.Duplicates)
			e.ack(cl, ackOf(pk))
			return
		}
		e.refuse(reason, &e.stats.EnvelopesRefused)
		if errors.Is(err, sessionkey.ErrMalformed) {
			e.b.stats.PlaintextRefused.Add(1) // not an envelope: plaintext, or garbage
		}
		if errors.Is(err, sessionkey.ErrUnknownKID) || errors.Is(err, sessionkey.ErrTooFarAhead) {
			e.hint(cl, id, st, kid)
		}
		e.nack(cl, pk, reason)
		return
	}
	e.flushCommands(id, st)
	rec := sink.Record{Device: id, Channel: channel, RecordID: binary.BigEndian.Uint64(pt), UnixMS: binary.BigEndian.Uint64(pt[8:]), Body: pt[recordHeader:]}
	ref := ackOf(pk)
	sh := e.shardOf(id)
	err = e.cfg.Sink.Submit(context.Background(), rec, func(r sink.Result) { e.onShard(sh, func() { e.stored(sh, cl, ref, st, kid, seq, &rec, r) }) })
	if err != nil {
		e.b.log.Error("telemetry sink", "err", err)
		cl.Stop(err)
	}
}

// shard is one delivery goroutine: the sink's results fan out to a few,
// each keeping its devices' order, so one slow write does not hold every
// device's PUBACK. The PUBACKs its jobs earn wait in acks until its queue
// is empty (or maxAcksPending have gathered) and then go out with one
// write per device: under load a device has several records in each
// group commit, and a write (a TLS record and a syscall) per PUBACK was
// the largest single cost of a record.
type shard struct {
	jobs chan func()
	acks []shardAck // only the shard's goroutine touches acks and buf
	buf  []byte
}

type shardAck struct {
	cl *mqtt.Client
	id uint16
}

// maxAcksPending bounds the PUBACKs a shard holds back while its queue is
// busy.
const maxAcksPending = 256

// shardOf is device id's delivery shard; nil before start (tests that
// drive the engine directly), where jobs run at once.
func (e *engine) shardOf(id string) *shard {
	if e.ctx == nil {
		return nil
	}
	h := uint32(2166136261)
	for i := 0; i < len(id); i++ {
		h = (h ^ uint32(id[i])) * 16777619
	}
	return e.shards[h%uint32(len(e.shards))]
}

// onShard runs job on shard sh's goroutine (at once when sh is nil).
func (e *engine) onShard(sh *shard, job func()) {
	if sh == nil {
		job()
		return
	}
	select {
	case sh.jobs <- job:
	case <-e.ctx.Done():
	}
}

// ackOnShard acknowledges a QoS 1 record from its shard's goroutine: held
// for the shard's next flush, or written at once without a shard.
func (e *engine) ackOnShard(sh *shard, cl *mqtt.Client, ref ackRef) {
	if sh == nil || ref.qos == 0 {
		e.ack(cl, ref)
		return
	}
	sh.acks = append(sh.acks, shardAck{cl: cl, id: ref.id})
}

// flushAcks writes the shard's held PUBACKs, all of a device's in one
// write, in the order they were earned.
func (e *engine) flushAcks(sh *shard) {
	acks := sh.acks
	for i := range acks {
		cl := acks[i].cl
		if cl == nil {
			continue // written with an earlier one of its device
		}
		buf := sh.buf[:0]
		for j := i; j < len(acks); j++ {
			if acks[j].cl == cl {
				buf = appendPuback(buf, acks[j].id)
				acks[j].cl = nil
			}
		}
		_ = writeRaw(cl, buf)
		sh.buf = buf
	}
	clear(acks) // drop the clients
	sh.acks = acks[:0]
}

// appendPuback appends a PUBACK for packet id: four bytes, the same under
// MQTT 3.1.1 and 5 (where a success with no properties omits its reason
// code, MQTT 5 section 3.4.2.1).
func appendPuback(dst []byte, id uint16) []byte {
	return append(dst, packets.Puback<<4, 2, byte(id>>8), byte(id))
}

// writeRaw writes whole packets, already encoded, to a client's
// connection under the lock mochi's own writes take, so they land
// between mochi's packets, never inside one.
func writeRaw(cl *mqtt.Client, b []byte) error {
	if cl.Closed() || cl.Net.Conn == nil {
		return mqtt.ErrConnectionClosed
	}
	cl.Lock()
	defer cl.Unlock()
	_, err := cl.Net.Conn.Write(b)
	return err
}

// stored finishes a record the sink has settled: on success it marks the
// envelope's seq, delivers the record (unless it was a duplicate) and
// acknowledges it.
func (e *engine) stored(sh *shard, cl *mqtt.Client, ref ackRef, st *deviceState, kid sessionkey.KID, seq uint64, rec *sink.Record, r sink.Result) {
	id, channel := rec.Device, rec.Channel
	{
		if r.Err != nil {
			e.stats.SinkFailures.Add(1)
			e.b.log.Error("telemetry record not stored; closing the device's connection so it resends", "device", id, "err", r.Err)
			cl.Stop(r.Err)
			return
		}
		st.ring.Mark(kid, seq)
		if r.Duplicate {
			e.stats.Duplicates.Add(1)
		} else {
			e.deliver(sh, "fleet/telemetry/"+id+"/"+channel, rec)
			e.stats.Records.Add(1)
		}
		e.ackOnShard(sh, cl, ref)
	}
}

// deliver publishes a stored record to the services, first waiting until
// each connected QoS 1 subscriber has room: a slow service slows the
// devices down instead of losing what they sent.
func (e *engine) deliver(sh *shard, topic string, rec *sink.Record) {
	e.waitRoom(sh, topic)
	e.publish(topic, rec.Body, []packets.UserProperty{
		{Key: "record_id", Val: strconv.FormatUint(rec.RecordID, 10)},
		{Key: "unix_ms", Val: strconv.FormatUint(rec.UnixMS, 10)},
	})
}

// hint asks the device for a new handshake, at most once per HintEvery.
// It is written straight to the device's connection, before a refusal
// may close it (MQTT 3.1.1).
func (e *engine) hint(cl *mqtt.Client, id string, st *deviceState, kid sessionkey.KID) {
	now := e.b.opts.Now().UnixNano()
	last := st.lastHint.Load()
	if last != 0 && now-last < int64(e.cfg.HintEvery) || !st.lastHint.CompareAndSwap(last, now) {
		return
	}
	e.stats.Hints.Add(1)
	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}, TopicName: "devices/" + id + "/kex/hint", Payload: sessionkey.MarshalHint(kid)}
	if pid, err := cl.NextPacketID(); err == nil {
		pk.PacketID = uint16(pid)
		cl.State.Inflight.Set(pk)
		_ = cl.WritePacket(pk) // on the device's own read goroutine
	}
}

// command encrypts a service's command for the device under the key the
// device has confirmed, or queues it until there is one. The ACL has
// checked the topic, so id is a valid device id.
func (e *engine) command(id, channel string, body []byte) {
	st := e.state(id)
	st.cmdMu.Lock()
	defer st.cmdMu.Unlock()
	if len(st.queued) > 0 || st.connected.Load() == 0 || !e.sendCommand(id, st, channel, body) {
		if len(st.queued) >= e.cfg.MaxQueuedCommands {
			e.refuse("command-queue-full", &e.stats.CommandsRefused)
			return
		}
		st.queued = append(st.queued, [2]string{channel, string(body)})
	}
}

// sendCommand seals and publishes one command; false: no key yet.
func (e *engine) sendCommand(id string, st *deviceState, channel string, body []byte) bool {
	pt := make([]byte, recordHeader, recordHeader+len(body))
	binary.BigEndian.PutUint64(pt, e.cmdID.Add(1))
	binary.BigEndian.PutUint64(pt[8:], uint64(e.b.opts.Now().UnixMilli()))
	env, _, err := st.ring.Seal(channel, append(pt, body...))
	if err != nil {
		return false
	}
	e.stats.Commands.Add(1)
	e.publish("devices/"+id+"/down/"+channel, env, nil)
	return true
}

// flushCommands sends queued commands once the device has confirmed a key.
func (e *engine) flushCommands(id string, st *deviceState) {
	st.cmdMu.Lock()
	defer st.cmdMu.Unlock()
	for len(st.queued) > 0 && st.connected.Load() > 0 {
		c := st.queued[0]
		if !e.sendCommand(id, st, c[0], []byte(c[1])) {
			return
		}
		st.queued = st.queued[1:]
	}
}

// roomSignal wakes deliveries waiting for a subscriber to acknowledge.
type roomSignal struct {
	mu      sync.Mutex
	ch      chan struct{}
	waiters atomic.Int32
}

func (r *roomSignal) wait() <-chan struct{} {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.ch
}

func (r *roomSignal) signal() {
	if r.waiters.Load() == 0 {
		return
	}
	r.mu.Lock()
	close(r.ch)
	r.ch = make(chan struct{})
	r.mu.Unlock()
}

// waitRoom waits until every connected QoS 1 subscriber of topic has room
// (hasRoom). One that makes no room for SubscriberStall is disconnected;
// its session keeps what it has not acknowledged.
func (e *engine) waitRoom(sh *shard, topic string) {
	for _, clientID := range e.qos1Subscribers(topic) {
		cl, ok := e.b.mqtt.Clients.Get(clientID)
		if !ok || cl.Net.Inline || cl.Closed() || e.hasRoom(cl) {
			continue
		}
		if sh != nil && len(sh.acks) > 0 {
			e.flushAcks(sh) // what is stored and delivered is not held behind a slow service
		}
		e.waitFor(cl, clientID)
	}
}

// hasRoom reports whether subscriber cl has fewer than SubscriberWindow
// messages unacknowledged and fewer than queueWindow waiting in mochi's
// write queue. The queued count is never taken above the unacknowledged
// one (every queued QoS 1 message is also unacknowledged), so a count
// that ever drifted high heals once the service catches up.
func (e *engine) hasRoom(cl *mqtt.Client) bool {
	inflight := cl.State.Inflight.Len()
	if inflight >= e.cfg.SubscriberWindow {
		return false
	}
	queued := inflight
	if q, ok := e.queued.Load(cl); ok {
		queued = min(q.(*writeQueue).len(), inflight)
	}
	return queued < e.queueWindow
}

// writeQueue tracks, by packet id, the QoS 1 messages mochi has announced
// for a client (OnQosPublish) and not yet written (OnPacketSent). By id,
// not by count: mochi announces a message it holds back for an MQTT 5
// client's Receive Maximum, writes it when the client resumes its session
// (ResendInflightMessages, announcing it again) and may then write it once
// more (as the next "immediate" one); a plain count would go low on the
// second write and let mochi's queue overflow. A bit set for a message
// mochi later dropped stays until its id is used again; that errs high,
// and hasRoom caps the count at the unacknowledged one.
type writeQueue struct {
	mu   sync.Mutex
	n    int
	bits [1 << 16 / 64]uint64 // 8 KiB, for a service connection
}

func (q *writeQueue) announced(id uint16) {
	q.mu.Lock()
	if w, b := &q.bits[id/64], uint64(1)<<(id%64); *w&b == 0 {
		*w |= b
		q.n++
	}
	q.mu.Unlock()
}

func (q *writeQueue) written(id uint16) {
	q.mu.Lock()
	if w, b := &q.bits[id/64], uint64(1)<<(id%64); *w&b != 0 {
		*w &^= b
		q.n--
	}
	q.mu.Unlock()
}

func (q *writeQueue) len() int {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.n
}

// waitFor waits until subscriber cl has room, or disconnects it after
// SubscriberStall.
func (e *engine) waitFor(cl *mqtt.Client, clientID string) {
	{
		e.stats.SubscriberWaits.Add(1)
		e.room.waiters.Add(1)
		defer e.room.waiters.Add(-1)
		deadline := time.NewTimer(e.cfg.SubscriberStall)
		defer deadline.Stop()
		for {
			ch := e.room.wait() // before the check, so no signal is missed
			if cl.Closed() || e.hasRoom(cl) {
				return
			}
			select {
			case <-ch:
			case <-deadline.C:
				e.stats.SubscriberKicks.Add(1)
				e.b.log.Warn("service subscriber made no room; disconnecting it (its session keeps its messages)", "client", clientID)
				cl.Stop(errors.New("subscriber stalled"))
				return
			}
		}
	}
}

// qos1Subscribers lists the client ids with a QoS 1 subscription
// matching topic (every member of a shared group: mochi picks one, and any
// may be picked). The answer is cached per topic until a subscription or
// session changes anywhere (subsGen).
func (e *engine) qos1Subscribers(topic string) []string {
	gen := e.subsGen.Load()
	if c, ok := e.subsCache.Load(topic); ok && c.(*subsEntry).gen == gen {
		return c.(*subsEntry).ids
	}
	subs := e.b.mqtt.Topics.Subscribers(topic)
	var ids []string
	for cid, sub := range subs.Subscriptions {
		if sub.Qos > 0 {
			ids = append(ids, cid)
		}
	}
	for _, group := range subs.Shared {
		for cid, sub := range group {
			if sub.Qos > 0 {
				ids = append(ids, cid)
			}
		}
	}
	e.subsCache.Store(topic, &subsEntry{gen: gen, ids: ids})
	return ids
}

type subsEntry struct {
	gen uint64
	ids []string
}

// subscriptionsChanged invalidates the subscriber cache.
func (e *engine) subscriptionsChanged() {
	e.subsGen.Add(1)
	e.subsCache.Clear()
}
