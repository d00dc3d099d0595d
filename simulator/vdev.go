package simulator

import (
	"bufio"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"fleetkey.dev/certs/tpm"
	_ "fleetkey.dev/certs/tpm/tpmsim" // --tpm sim
	"fleetkey.dev/device-agent/agent"
	"fleetkey.dev/sessionkey"
)

// Target is what the virtual devices speak.
type Target string

const (
	// TargetFleetkey is mTLS and fkx1: records are sealed under session
	// keys, and the gateway opens, stores and acknowledges them.
	TargetFleetkey Target = "fleetkey"
	// TargetMQTT is plain MQTT over mTLS: records go as they are, so that
	// any broker (Mosquitto, bare mochi) can take the same load.
	TargetMQTT Target = "mqtt"
)

// Record bodies start with what the receiving side needs to measure:
// u64 intended send time (Unix ns) ‖ u32 device index ‖ u32 sequence.
const bodyHeader = 16

// maxPending bounds the records a virtual device keeps unacknowledged
// (its outbox); past it, the oldest is dropped and counted.
const maxPending = 1024

// vdev is one virtual device: its identity, its connection, and its fkx1
// state (the device agent's own Device and Link). It holds no goroutine
// while idle but its connection's reader; timers drive the rest.
type vdev struct {
	f     *fleet
	idx   int
	id    string
	creds *agent.Credentials
	dev   *agent.Device // TargetFleetkey

	mu        sync.Mutex
	conn      *tls.Conn
	link      *agent.Link
	gen       uint32 // connection generation: a stale reader's end is ignored
	pid       uint16
	pend      []pendingRec // oldest first
	seq       uint32
	intended  time.Time // of the current connection attempt
	ready     bool      // may send records on this connection
	firstAck  bool      // the first record of the device was acknowledged
	attempt   int
	timer     *time.Timer
	nextPub   time.Time
	lastSend  time.Time
	lastRecv  time.Time
	done      bool
	onReady   func() // gives back the handshake place
	everReady bool
	// revokedAt: the fault drill revoked the device's certificate; out is
	// closed when the gateway has closed its connection.
	revokedAt time.Time
	out       chan struct{}
	lastErr   string
	startAt   time.Time // the device's intended start
	due       time.Time // when the timer was set to fire
	pingAt    time.Time // the last PINGREQ
	ackedSeqs seqSet    // the sequences acknowledged (QoS 1)
}

type pendingRec struct {
	at   int64 // intended send time, Unix ns
	seq  uint32
	pid  uint16
	sent bool
}

// fleet runs the virtual devices of one run.
type fleet struct {
	cfg     *RunConfig
	ctx     context.Context
	m       *meter
	tls     *tls.Config
	work    []chan func() // fkx1 messages and commands: CPU-heavy, off the readers; one queue per worker, a device always on the same one
	slots   chan struct{}
	devs    []*vdev
	recBase uint64 // record ids are recBase+seq: they rise across runs
	dial    string // the gateway address, resolved once
	stopPub time.Time
	keep    time.Duration
	readers sync.WaitGroup
	workers sync.WaitGroup
	tpmMu   sync.Mutex
	tpmDev  *tpm.Device // --tpm: the simulated TPM all devices share

	// active counts the start and reconnect callbacks running; close
	// waits for them before the readers and the workers.
	lifeMu  sync.Mutex
	closing bool
	active  sync.WaitGroup
}

type vdevKey struct{}

func newFleet(ctx context.Context, cfg *RunConfig, m *meter, start time.Time) (*fleet, error) {
	host, _, err := net.SplitHostPort(cfg.Gateway)
	if err != nil {
		return nil, fmt.Errorf("gateway address %q: want host:port", cfg.Gateway)
	}
	f := &fleet{cfg: cfg, ctx: ctx, m: m, recBase: uint64(start.UnixMicro()), dial: cfg.Gateway}
	// Resolve once: ten thousand devices reconnecting must not each ask
	// the resolver (TLS still checks the name).
	if net.ParseIP(host) == nil {
		if addrs, err := net.DefaultResolver.LookupHost(ctx, host); err == nil && len(addrs) > 0 {
			_, port, _ := net.SplitHostPort(cfg.Gateway)
			f.dial = net.JoinHostPort(addrs[0], port)
		}
	}
	f.keep = max(60*time.Second, 3*cfg.Interval)
	f.tls = &tls.Config{MinVersion: tls.VersionTLS12, ServerName: host, RootCAs: cfg.RootCAs,
		GetClientCertificate: func(cri *tls.CertificateRequestInfo) (*tls.Certificate, error) {
			v, ok := cri.Context().Value(vdevKey{}).(*vdev)
			if !ok {
				return nil, errors.New("no virtual device for this handshake")
			}
			c := v.creds.TLS()
			return &c, nil
		}}
	if cfg.Target == TargetFleetkey && cfg.Bundle != nil {
		verify := agent.VerifyGateway(cfg.Bundle, time.Now, x509.ExtKeyUsageServerAuth)
		f.tls.VerifyConnection = func(cs tls.ConnectionState) error { return verify(cs.PeerCertificates) }
	}
	if cfg.MaxHandshakes > 0 {
		f.slots = make(chan struct{}, cfg.MaxHandshakes)
	}
	for range max(2, 2*runtimeCPUs()) {
		q := make(chan func(), 1024)
		f.work = append(f.work, q)
		f.workers.Add(1)
		go func() {
			defer f.workers.Done()
			for job := range q {
				job()
			}
		}()
	}
	return f, nil
}

// enter starts a callback (a device's start or reconnect); false once the
// fleet is closing. The caller calls f.active.Done when it returns.
func (f *fleet) enter() bool {
	f.lifeMu.Lock()
	defer f.lifeMu.Unlock()
	if f.closing {
		return false
	}
	f.active.Add(1)
	return true
}

// close waits for the callbacks still running, then for the readers
// (every connection is closed by then), then stops the workers.
func (f *fleet) close() {
	f.lifeMu.Lock()
	f.closing = true
	f.lifeMu.Unlock()
	f.active.Wait()
	f.readers.Wait()
	for _, q := range f.work {
		close(q)
	}
	f.workers.Wait()
	f.tpmMu.Lock()
	if f.tpmDev != nil {
		f.tpmDev.Close()
		f.tpmDev = nil
	}
	f.tpmMu.Unlock()
}

// start brings device v up at its intended time: enrollment if it has
// no identity yet, then its connection, then its telemetry timer.
func (v *vdev) start(intended time.Time) {
	f := v.f
	if !f.enter() {
		return
	}
	defer f.active.Done()
	v.mu.Lock()
	v.startAt = intended
	v.mu.Unlock()
	f.m.offered.Add(1)
	f.m.record(PhaseLag, time.Since(intended))
	release := f.acquire()
	if release == nil {
		return
	}
	if v.creds == nil {
		creds, err := v.enroll()
		if err != nil {
			release()
			f.m.fail(reasonOf("enroll", err))
			return
		}
		f.m.record(PhaseEnroll, time.Since(intended))
		v.mu.Lock()
		v.creds = creds
		v.mu.Unlock()
	}
	// The first record is due at the device's intended start: it waits
	// for the connection, so first_ack is the whole way from start to a
	// stored record.
	v.mu.Lock()
	v.nextPub, v.due = intended, time.Now()
	v.timer = time.AfterFunc(0, v.tick)
	v.mu.Unlock()
	v.connect(intended, release)
}

// acquire takes a place among the handshakes in flight (--max-handshakes),
// waiting for one; it returns nil when the run ends first.
func (f *fleet) acquire() func() {
	if f.slots == nil {
		return func() {}
	}
	select {
	case f.slots <- struct{}{}:
	case <-f.ctx.Done():
		return nil
	}
	var once sync.Once
	return func() { once.Do(func() { <-f.slots }) }
}

func (v *vdev) enroll() (*agent.Credentials, error) {
	if v.f.cfg.TPM != "" {
		return v.f.enrollTPM(v.id)
	}
	return enrollDevice(v.f.ctx, v.f.cfg, filepath.Join(v.f.cfg.Dir, v.id), v.id)
}

// enrollTPM enrolls device id through TPM attestation on the simulated
// TPM: a new endorsement seed (so a new EK, as another TPM would have),
// the EK on the allowlist, then the agent's own attested enrollment. One
// TPM attests one device at a time.
func (f *fleet) enrollTPM(id string) (*agent.Credentials, error) {
	f.tpmMu.Lock()
	defer f.tpmMu.Unlock()
	if f.tpmDev == nil {
		d, err := tpm.Open(f.cfg.TPM)
		if err != nil {
			return nil, err
		}
		f.tpmDev = d
	}
	if err := f.tpmDev.ChangeEndorsementSeed(); err != nil {
		return nil, err
	}
	ek, err := f.tpmDev.EK()
	if err != nil {
		return nil, err
	}
	spki, err := x509.MarshalPKIXPublicKey(ek.Key)
	if err != nil {
		return nil, err
	}
	hash := sha256.Sum256(spki)
	ctx, cancel := context.WithTimeout(f.ctx, 30*time.Second)
	defer cancel()
	if err := f.cfg.AllowEK(ctx, hash[:]); err != nil {
		return nil, fmt.Errorf("allowing the EK: %w", err)
	}
	st := &agent.State{Dir: filepath.Join(f.cfg.Dir, id), TPMDevice: f.tpmDev}
	if _, err := st.Enroll(ctx, agent.EnrollOptions{Provisioning: f.cfg.Provisioning, RootCAs: f.cfg.RootCAs, Token: f.cfg.Token, ID: id, TPM: f.cfg.TPM}); err != nil {
		return nil, err
	}
	return st.LoadCredentials()
}

// enrollDevice enrolls device id over EST, as the agent does, with its
// state in dir.
func enrollDevice(ctx context.Context, cfg *RunConfig, dir, id string) (*agent.Credentials, error) {
	st := &agent.State{Dir: dir}
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if _, err := st.Enroll(ctx, agent.EnrollOptions{Provisioning: cfg.Provisioning, RootCAs: cfg.RootCAs, Token: cfg.Token, ID: id}); err != nil {
		return nil, err
	}
	return st.LoadCredentials()
}

// connect makes one connection: TCP, TLS, CONNECT, and for fleetkey the
// subscriptions and the first msg1. Each phase is timed from intended.
// release gives back the handshake place once the device is ready.
func (v *vdev) connect(intended time.Time, release func()) {
	f := v.f
	fail := func(stage string, err error) {
		release()
		f.m.fail(reasonOf(stage, err))
		v.mu.Lock()
		v.lastErr = reasonOf(stage, err)
		v.mu.Unlock()
		v.retry()
	}
	ctx, cancel := context.WithTimeout(context.WithValue(f.ctx, vdevKey{}, v), 10*time.Second)
	defer cancel()
	raw, err := (&net.Dialer{}).DialContext(ctx, "tcp", f.dial)
	if err != nil {
		fail("tcp", err)
		return
	}
	f.m.connects.Add(1)
	f.m.record(PhaseTCP, time.Since(intended))
	c := tls.Client(raw, f.tls)
	if err := c.HandshakeContext(ctx); err != nil {
		raw.Close()
		fail("tls", err)
		return
	}
	f.m.record(PhaseTLS, time.Since(intended))
	dl, _ := ctx.Deadline()
	_ = c.SetDeadline(dl)
	br := bufio.NewReaderSize(c, 256)
	p, err := v.exchange(c, br, connectPacket(v.id, uint16(f.keep/time.Second)))
	if err == nil {
		var code byte
		if code, err = p.connackCode(); err == nil && code != 0 {
			err = errors.New(connackReason(code))
		}
	}
	if err != nil {
		c.Close()
		fail("connect", err)
		return
	}
	f.m.record(PhaseConnack, time.Since(intended))
	if f.cfg.Target == TargetFleetkey {
		p, err := v.exchange(c, br, subscribePacket(1, v.dev.Subscriptions(), 1))
		if err == nil && (p.typ != pktSuback || len(p.body) != 5 || p.body[2] > 1 || p.body[3] > 1 || p.body[4] > 1) {
			err = fmt.Errorf("subscription refused (packet type %d)", p.typ)
		}
		if err != nil {
			c.Close()
			fail("subscribe", err)
			return
		}
	}
	_ = c.SetDeadline(time.Time{})
	v.mu.Lock()
	if v.done {
		v.mu.Unlock()
		c.Close()
		release()
		return
	}
	v.gen++
	g := v.gen
	v.conn, v.intended, v.pid = c, intended, 1
	f.readers.Add(1) // under mu, after the done check: close waits for it
	v.lastRecv, v.lastSend = time.Now(), time.Now()
	for i := range v.pend {
		v.pend[i].sent = false // resent on this connection: the gateway dedupes
	}
	if f.cfg.Target == TargetFleetkey {
		v.link, err = v.dev.NewLink(v.creds, v.send)
		if err == nil {
			err = v.link.Start()
		}
		v.onReady = release
	} else {
		v.becameReady(intended)
		release()
	}
	v.mu.Unlock()
	f.m.connected.Add(1)
	if err != nil {
		f.readers.Done()
		v.lost(g, fmt.Errorf("fkx1: %w", err))
		return
	}
	go v.read(c, br, g)
}

// exchange writes a packet and reads the answer (during connect, before
// the reader starts).
func (v *vdev) exchange(c *tls.Conn, br *bufio.Reader, out []byte) (packet, error) {
	if _, err := c.Write(out); err != nil {
		return packet{}, err
	}
	return readPacket(br)
}

// send publishes at QoS 1 on the current connection (the link's sends and
// the records). Caller holds mu.
func (v *vdev) send(topic string, payload []byte) error {
	_, err := v.sendPID(topic, payload, 1)
	return err
}

func (v *vdev) sendPID(topic string, payload []byte, qos byte) (uint16, error) {
	if v.conn == nil {
		return 0, errors.New("not connected")
	}
	v.pid++
	if v.pid == 0 {
		v.pid = 1
	}
	v.lastSend = time.Now()
	_ = v.conn.SetWriteDeadline(v.lastSend.Add(10 * time.Second))
	_, err := v.conn.Write(publishPacket(topic, payload, qos, v.pid))
	return v.pid, err
}

// read is the connection's reader: acknowledgements inline, messages for
// the device (fkx1, commands) to its worker, in order.
func (v *vdev) read(c *tls.Conn, br *bufio.Reader, g uint32) {
	defer v.f.readers.Done()
	for {
		p, err := readPacket(br)
		if err != nil {
			v.lost(g, err)
			return
		}
		now := time.Now()
		switch p.typ {
		case pktPuback:
			if len(p.body) == 2 {
				v.acked(g, binary.BigEndian.Uint16(p.body), now)
			}
		case pktPublish:
			topic, qos, pid, payload, err := p.publish()
			if err != nil {
				v.lost(g, err)
				return
			}
			v.mu.Lock()
			v.lastRecv = now
			if qos == 1 && v.gen == g && v.conn != nil {
				_ = v.conn.SetWriteDeadline(now.Add(10 * time.Second))
				_, _ = v.conn.Write(pubackPacket(pid))
			}
			v.mu.Unlock()
			if p.flags&1 != 0 {
				continue // retained: a receiver ignores them (FKX1.md)
			}
			job := func() {
				v.mu.Lock()
				defer v.mu.Unlock()
				if v.gen != g || v.link == nil {
					return
				}
				if err := v.link.Handle(topic, payload); err != nil {
					v.f.m.fail(reasonOf("fkx1", err))
				}
				v.flush()
			}
			select {
			case v.f.work[v.idx%len(v.f.work)] <- job:
			case <-v.f.ctx.Done():
				return
			}
		default:
			v.mu.Lock()
			v.lastRecv = now
			v.mu.Unlock()
		}
	}
}

// acked settles the record published as pid.
func (v *vdev) acked(g uint32, pid uint16, now time.Time) {
	f := v.f
	v.mu.Lock()
	defer v.mu.Unlock()
	v.lastRecv = now
	if v.gen != g {
		return
	}
	for i, r := range v.pend {
		if r.sent && r.pid == pid {
			v.pend = append(v.pend[:i], v.pend[i+1:]...)
			f.m.acked.Add(1)
			f.m.achieved.Add(1)
			f.m.record(PhaseAck, now.Sub(time.Unix(0, r.at)))
			if !v.firstAck {
				v.firstAck = true
				f.m.record(PhaseFirstAck, now.Sub(v.startAt))
			}
			v.ackedSeqs.add(r.seq)
			if len(v.pend) == 0 && cap(v.pend) > 64 {
				v.pend = nil // an outage's backlog is drained: give back its memory
			}
			v.flush()
			return
		}
	}
}

// becameReady: the connection may carry records. Caller holds mu.
func (v *vdev) becameReady(intended time.Time) {
	if v.ready {
		return
	}
	v.ready, v.everReady, v.attempt = true, true, 0
	v.f.m.achieved.Add(1)
	if v.f.cfg.Target == TargetFleetkey {
		v.f.m.record(PhaseFKX1, time.Since(intended))
	}
	if v.onReady != nil {
		v.onReady()
		v.onReady = nil
	}
	v.flush()
}

// onEpoch is the device's OnEpoch: under mu, from Link.Handle.
func (v *vdev) onEpoch(*sessionkey.Epoch) {
	v.f.m.handshakes.Add(1)
	v.becameReady(v.intended)
}

// lost ends connection g: the device reconnects after a backoff.
func (v *vdev) lost(g uint32, err error) {
	v.mu.Lock()
	if g != v.gen || v.conn == nil {
		v.mu.Unlock()
		return
	}
	// No close_notify wait: a broker that stopped reading must not hold
	// the lock for the write deadline.
	_ = v.conn.SetWriteDeadline(time.Now())
	v.conn.Close()
	v.conn, v.ready = nil, false
	if v.link != nil {
		v.link.Close()
		v.link = nil
	}
	if v.onReady != nil {
		v.onReady()
		v.onReady = nil
	}
	if !v.revokedAt.IsZero() && v.out != nil && !v.done {
		v.f.m.record(PhaseRevoked, time.Since(v.revokedAt))
		v.done = true
		v.dropPending()
		close(v.out)
		v.out = nil
		v.mu.Unlock()
		v.f.m.connected.Add(-1)
		return
	}
	done := v.done
	v.mu.Unlock()
	v.f.m.connected.Add(-1)
	if done || v.f.ctx.Err() != nil {
		return
	}
	v.f.m.fail(reasonOf("disconnected", err))
	v.mu.Lock()
	v.lastErr = reasonOf("disconnected", err)
	v.mu.Unlock()
	v.retry()
}

// retry reconnects after a full-jitter backoff (1 s doubling to 30 s).
func (v *vdev) retry() {
	v.mu.Lock()
	if v.done || v.f.ctx.Err() != nil {
		v.mu.Unlock()
		return
	}
	d := time.Duration(rand.Int64N(int64(min(time.Second<<min(v.attempt, 5), 30*time.Second)) + 1))
	v.attempt++
	v.mu.Unlock()
	at := time.Now().Add(d)
	time.AfterFunc(d, func() {
		if !v.f.enter() {
			return
		}
		defer v.f.active.Done()
		v.f.m.offered.Add(1)
		v.f.m.record(PhaseLag, time.Since(at))
		release := v.f.acquire()
		if release == nil {
			return
		}
		v.connect(at, release)
	})
}

// tick is the device's clock: a record every interval (on the intended
// schedule, whatever happened to the last one), fkx1's timers, and
// keep-alive.
func (v *vdev) tick() {
	f := v.f
	now := time.Now()
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.done {
		return
	}
	// The generator's lateness: from when this timer was due.
	f.m.record(PhaseLag, now.Sub(v.due))
	if v.link != nil {
		if err := v.link.Tick(); err != nil {
			f.m.fail(reasonOf("fkx1", err))
		}
	}
	// Every record now due, on the intended schedule (open model: a late
	// timer catches up rather than skipping).
	added := false
	for !v.nextPub.After(now) {
		intended := v.nextPub
		v.nextPub = intended.Add(f.cfg.Interval)
		if !intended.Before(f.stopPub) {
			continue
		}
		f.m.offered.Add(1)
		f.m.published.Add(1)
		v.seq++
		if len(v.pend) >= maxPending {
			// The device's outbox is full (the broker is not keeping up):
			// the oldest record is dropped on the device, as the agent's
			// drop-oldest policy would; counted apart from loss.
			v.pend = v.pend[1:]
			f.m.published.Add(-1)
			f.m.outboxDropped.Add(1)
		}
		v.pend = append(v.pend, pendingRec{seq: v.seq, at: intended.UnixNano()})
		added = true
	}
	if added {
		v.flush()
	}
	// Keep-alive: a PINGREQ when nothing was sent, or nothing heard, for
	// half the keep-alive (at QoS 0 a device sends but hears nothing);
	// the connection is given up after 1.5 keep-alives of silence.
	switch {
	case v.conn == nil:
	case now.Sub(v.lastRecv) > f.keep*3/2:
		c, g := v.conn, v.gen
		go v.lost(g, errors.New("keep-alive: nothing from the broker"))
		_ = c.SetDeadline(now)
	case now.Sub(v.lastSend) >= f.keep/2 || (now.Sub(v.lastRecv) >= f.keep/2 && !v.pingAt.After(v.lastRecv)):
		v.lastSend, v.pingAt = now, now
		_ = v.conn.SetWriteDeadline(now.Add(10 * time.Second))
		_, _ = v.conn.Write(pingreqPacket)
	}
	// Next: the next record, or in a second while a handshake is in
	// flight (its step timeout), or for keep-alive.
	next := v.nextPub
	if v.link != nil && v.link.Waiting() {
		next = minTime(next, now.Add(time.Second))
	}
	next = minTime(next, now.Add(f.keep/2))
	v.due = next
	v.timer.Reset(max(time.Until(next), 0))
}

func minTime(a, b time.Time) time.Time {
	if a.Before(b) {
		return a
	}
	return b
}

// flush sends the records not yet sent on this connection. Caller holds
// mu.
func (v *vdev) flush() {
	if !v.ready || v.conn == nil {
		return
	}
	f := v.f
	qos := byte(1)
	if f.cfg.AtMostOnce {
		qos = 0
		// What went at QoS 0 is gone, however the loop ends: an early
		// return must not leave it to be sent again.
		defer func() {
			v.pend = slices.DeleteFunc(v.pend, func(r pendingRec) bool { return r.sent })
		}()
	}
	for i := range v.pend {
		r := &v.pend[i]
		if r.sent {
			continue
		}
		body := v.body(r)
		channel := f.cfg.channels[int(r.seq)%len(f.cfg.channels)]
		payload := body
		if f.cfg.Target == TargetFleetkey {
			env, err := v.link.Seal(channel, f.recBase+uint64(r.seq), uint64(r.at/1e6), body)
			if errors.Is(err, sessionkey.ErrNeedEpoch) {
				return
			}
			if err != nil {
				f.m.fail(reasonOf("seal", err))
				return
			}
			payload = env
		}
		pid, err := v.sendPID("devices/"+v.id+"/up/"+channel, payload, qos)
		if err != nil {
			c, g := v.conn, v.gen
			_ = c.SetDeadline(time.Now())
			go v.lost(g, err)
			return
		}
		r.pid, r.sent = pid, true
		if qos == 0 {
			f.m.achieved.Add(1)
		}
	}
}

// body is record r's body: the header the receiving side measures with,
// then the template filled in, or Payload bytes in all.
func (v *vdev) body(r *pendingRec) []byte {
	var b []byte
	if t := v.f.cfg.Template; t != "" {
		t = strings.ReplaceAll(t, "{{device}}", v.id)
		t = strings.ReplaceAll(t, "{{seq}}", strconv.FormatUint(uint64(r.seq), 10))
		t = strings.ReplaceAll(t, "{{unix_ms}}", strconv.FormatInt(r.at/1e6, 10))
		b = append(make([]byte, bodyHeader, bodyHeader+len(t)), t...)
	} else {
		b = make([]byte, max(v.f.cfg.Payload, bodyHeader))
	}
	binary.BigEndian.PutUint64(b, uint64(r.at))
	binary.BigEndian.PutUint32(b[8:], uint32(v.idx))
	binary.BigEndian.PutUint32(b[12:], r.seq)
	return b
}

// stop closes the device for good.
func (v *vdev) stop() {
	v.mu.Lock()
	v.done = true
	if v.timer != nil {
		v.timer.Stop()
	}
	c, g := v.conn, v.gen
	v.mu.Unlock()
	if c != nil {
		v.lost(g, io.EOF)
	}
}

// dropPending forgets a revoked device's unacknowledged records: they
// were published, but no gateway may take them now. Caller holds mu.
func (v *vdev) dropPending() {
	v.f.m.published.Add(-int64(len(v.pend)))
	v.f.m.revokedDropped.Add(int64(len(v.pend)))
	v.pend = nil
	if v.timer != nil {
		v.timer.Stop()
	}
}

// describe says where a device stands, for a problem report. Caller
// holds mu.
func (v *vdev) describe() string {
	state := "not connected"
	switch {
	case v.creds == nil:
		state = "not enrolled"
	case v.conn != nil && v.link != nil && v.link.Waiting():
		state = "connected, fkx1 handshake in flight"
	case v.conn != nil:
		state = "connected, no handshake in flight"
	}
	st := ""
	if v.dev != nil {
		st = fmt.Sprintf(", %d handshake timeouts, %d answers refused", v.dev.Stats.HandshakeFailures.Load(), v.dev.Stats.KexRefused.Load())
	}
	return fmt.Sprintf("%s: %s after %d attempts%s; last error: %s", v.id, state, v.attempt, st, v.lastErr)
}

// unacked counts the device's records not yet acknowledged.
func (v *vdev) unacked() int {
	v.mu.Lock()
	defer v.mu.Unlock()
	return len(v.pend)
}

// reasonOf names an error for the errors-by-reason table: the stage and a
// short, stable cause (no addresses or ports, so that reasons aggregate).
func reasonOf(stage string, err error) string {
	var ne net.Error
	switch {
	case errors.Is(err, context.DeadlineExceeded), errors.As(err, &ne) && ne.Timeout():
		return stage + ": timeout"
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF):
		return stage + ": closed by the peer"
	case errors.Is(err, syscall.ECONNREFUSED):
		return stage + ": connection refused"
	case errors.Is(err, syscall.ECONNRESET):
		return stage + ": connection reset"
	case errors.Is(err, net.ErrClosed):
		return stage + ": closed"
	}
	var ae *tls.AlertError
	if errors.As(err, &ae) {
		return stage + ": " + ae.Error()
	}
	msg := err.Error()
	if i := strings.LastIndex(msg, ": "); i >= 0 && strings.Contains(msg[:i], "127.0.0.1") {
		msg = msg[i+2:]
	}
	msg = strings.TrimPrefix(msg, stage+": ")
	if len(msg) > 120 {
		msg = msg[:120]
	}
	return stage + ": " + msg
}

func runtimeCPUs() int { return runtime.GOMAXPROCS(0) }
