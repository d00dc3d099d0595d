package broker

import (
	"bufio"
	"bytes"
	"crypto"
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"fleetkey.dev/certs/identity"
	"fleetkey.dev/gateway/sink"
	"fleetkey.dev/sessionkey"
)

// fkxEnv is a broker with fkx1 on, its sink file, and a clock tests can
// move.
type fkxEnv struct {
	*env
	sinkPath string
	clk      *testClock
}

type testClock struct {
	mu  sync.Mutex
	off time.Duration
}

func (c *testClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return time.Now().Add(c.off)
}

func (c *testClock) Advance(d time.Duration) {
	c.mu.Lock()
	c.off += d
	c.mu.Unlock()
}

// startFKX runs a broker with fkx1 over a sink in a temp dir; file, if
// not nil, wraps the sink's file (slow or failing disks).
func startFKX(t *testing.T, suites []sessionkey.Suite, file func(*os.File) sink.File, tune ...func(*Options)) *fkxEnv {
	t.Helper()
	f := &fkxEnv{sinkPath: filepath.Join(t.TempDir(), "telemetry.jsonl"), clk: &testClock{}}
	osf, err := os.OpenFile(f.sinkPath, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	var sf sink.File = osf
	if file != nil {
		sf = file(osf)
	}
	snk, err := sink.New(sf, sink.Options{})
	if err != nil {
		t.Fatal(err)
	}
	f.env = startWith(t, nil, func(o *Options) {
		o.Now = f.clk.Now
		o.Sessions = &Sessions{Identity: sessionkey.Identity{Signer: o.Certificate.PrivateKey.(crypto.Signer), Chain: o.Certificate.Certificate},
			Suites: suites, Sink: snk}
		for _, fn := range tune {
			fn(o)
		}
	})
	t.Cleanup(func() { snk.Close() })
	return f
}

// device is a test device that speaks fkx1 itself, over paho, so tests
// can also misbehave on purpose.
type device struct {
	t    *testing.T
	e    *fkxEnv
	id   string
	cert tls.Certificate
	c    paho.Client
	in   chan paho.Message
	init *sessionkey.Initiator
	ring *sessionkey.Keyring
	rec  uint64
}

func (f *fkxEnv) device(id string, suite sessionkey.Suite) *device {
	f.t.Helper()
	d := &device{t: f.t.(*testing.T), e: f, id: id, cert: f.leaf(f.issuer, identity.RoleDevice, id), ring: sessionkey.NewKeyring(false, sessionkey.Rotation{}, f.clk.Now)}
	d.setIdentity(d.cert, suite)
	d.connect()
	return d
}

// setIdentity makes the device's fkx1 credential that of cert.
func (d *device) setIdentity(cert tls.Certificate, suite sessionkey.Suite) {
	d.t.Helper()
	init, err := sessionkey.NewInitiator(sessionkey.InitiatorConfig{DeviceID: d.id, Suite: suite,
		Identity:      sessionkey.Identity{Signer: cert.PrivateKey.(crypto.Signer), Chain: [][]byte{cert.Leaf.Raw}},
		VerifyGateway: func(chain []*x509.Certificate) error { return nil }, Now: d.e.clk.Now})
	if err != nil {
		d.t.Fatal(err)
	}
	d.init = init
}

func (d *device) connect() {
	d.t.Helper()
	d.c = d.e.mustConnect(d.cert, d.id)
	d.in = make(chan paho.Message, 64)
	base := "devices/" + d.id + "/"
	tok := d.c.SubscribeMultiple(map[string]byte{base + "kex/resp": 1, base + "kex/hint": 1, base + "down/+": 1},
		func(_ paho.Client, m paho.Message) { d.in <- m })
	if !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		d.t.Fatalf("subscribe: %v", tok.Error())
	}
}

func (d *device) publish(topic string, payload []byte) paho.Token {
	d.t.Helper()
	tok := d.c.Publish(topic, 1, false, payload)
	if !tok.WaitTimeout(5 * time.Second) {
		d.t.Fatalf("no PUBACK for %s", topic)
	}
	return tok
}

// expect waits for the next message on devices/{id}/<suffix>.
func (d *device) expect(suffix string) []byte {
	d.t.Helper()
	timeout := time.After(10 * time.Second)
	for {
		select {
		case m := <-d.in:
			if m.Topic() == "devices/"+d.id+"/"+suffix {
				return m.Payload()
			}
		case <-timeout:
			d.t.Fatalf("nothing on %s", suffix)
		}
	}
}

// handshake runs fkx1 over MQTT and returns its four messages.
func (d *device) handshake() (msgs [4][]byte) {
	d.t.Helper()
	var err error
	msgs[0], _ = d.init.Start()
	d.publish("devices/"+d.id+"/kex/req", msgs[0])
	msgs[1] = d.expect("kex/resp")
	if msgs[2], err = d.init.HandleMsg2(msgs[1], nil); err != nil {
		d.t.Fatal(err)
	}
	d.publish("devices/"+d.id+"/kex/req", msgs[2])
	msgs[3] = d.expect("kex/resp")
	ep, err := d.init.HandleMsg4(msgs[3], d.ring.Live)
	if err != nil {
		d.t.Fatal(err)
	}
	d.ring.Add(ep)
	return msgs
}

// record seals the next telemetry record.
func (d *device) record(body string) []byte {
	d.t.Helper()
	d.rec++
	pt := binary.BigEndian.AppendUint64(nil, d.rec)
	pt = binary.BigEndian.AppendUint64(pt, uint64(time.Now().UnixMilli()))
	env, _, err := d.ring.Seal("telemetry", append(pt, body...))
	if err != nil {
		d.t.Fatal(err)
	}
	return env
}

func (f *fkxEnv) refusals(reason string) int64 {
	return f.b.Stats().Refusals()[[2]string{"fkx1", reason}]
}

func (f *fkxEnv) sinkLines() []string {
	f.t.Helper()
	b, err := os.ReadFile(f.sinkPath)
	if err != nil {
		f.t.Fatal(err)
	}
	var out []string
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		out = append(out, sc.Text())
	}
	return out
}

// service connects the fleet service and subscribes to telemetry.
func (f *fkxEnv) service(manualAck bool) (paho.Client, chan paho.Message) {
	f.t.Helper()
	cert := f.leaf(f.issuer, identity.RoleService, "analytics")
	got := make(chan paho.Message, 10000)
	opts := paho.NewClientOptions().AddBroker("tls://" + f.addr).SetClientID("analytics").SetTLSConfig(f.tlsConfig(&cert)).
		SetAutoReconnect(false).SetProtocolVersion(4).SetCleanSession(true).SetAutoAckDisabled(manualAck)
	c := paho.NewClient(opts)
	if tok := c.Connect(); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		f.t.Fatalf("service: %v", tok.Error())
	}
	f.t.Cleanup(func() { c.Disconnect(100) })
	if tok := c.Subscribe("fleet/telemetry/#", 1, func(_ paho.Client, m paho.Message) { got <- m }); !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		f.t.Fatalf("service subscribe: %v", tok.Error())
	}
	return c, got
}

func TestFKXTelemetryAndCommands(t *testing.T) {
	t.Parallel()
	f := startFKX(t, nil, nil)
	svc, got := f.service(false)
	for _, suite := range []sessionkey.Suite{sessionkey.Suite1, sessionkey.Suite2} {
		d := f.device(map[sessionkey.Suite]string{1: "dev-s1", 2: "dev-s2"}[suite], suite)
		d.handshake()
		for _, body := range []string{`{"t":1}`, `{"t":2}`} {
			d.publish("devices/"+d.id+"/up/telemetry", d.record(body))
			select {
			case m := <-got:
				if m.Topic() != "fleet/telemetry/"+d.id+"/telemetry" || string(m.Payload()) != body {
					t.Fatalf("service got %s %q", m.Topic(), m.Payload())
				}
			case <-time.After(10 * time.Second):
				t.Fatal("no telemetry at the service")
			}
		}
		// A command, sealed under the key the device confirmed.
		if tok := svc.Publish("fleet/commands/"+d.id+"/config", 1, false, "reboot"); !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
			t.Fatal(tok.Error())
		}
		pt, _, err := d.ring.Open(d.expect("down/config"), "config")
		if err != nil || string(pt[16:]) != "reboot" || binary.BigEndian.Uint64(pt) == 0 {
			t.Fatalf("command: %q %v", pt, err)
		}
	}
	if n := len(f.sinkLines()); n != 4 {
		t.Fatalf("sink holds %d lines", n)
	}
	// Commands for a device that is not connected wait, up to the limit.
	for i := 0; i < 64; i++ {
		if tok := svc.Publish("fleet/commands/dev-away/config", 1, false, "later"); !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
			t.Fatal(tok.Error())
		}
	}
	if f.refusals("command-queue-full") != 0 {
		t.Fatal("a command refused before the queue was full")
	}
	svc.Publish("fleet/commands/dev-away/config", 1, false, "one too many").WaitTimeout(5 * time.Second)
	waitFor(t, "the 65th queued command refused", func() bool { return f.refusals("command-queue-full") == 1 })
	// The kex channel is reserved.
	before := f.refusals("kex-channel")
	if tok := svc.Publish("fleet/commands/dev-s1/kex", 1, false, "x"); !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		t.Fatal(tok.Error())
	}
	if f.refusals("kex-channel") != before+1 {
		t.Fatal("a command on the kex channel was not refused")
	}
}

// TestFKXEnvelopeAttacks: each refused, counted, and nothing delivered.
func TestFKXEnvelopeAttacks(t *testing.T) {
	t.Parallel()
	f := startFKX(t, nil, nil)
	_, got := f.service(false)
	a := f.device("dev-a", sessionkey.Suite1)
	a.handshake()
	up := "devices/dev-a/up/telemetry"
	env := a.record("one")
	a.publish(up, env)
	<-got

	// A replayed envelope: acknowledged (so a QoS 1 sender stops), counted,
	// not stored or delivered again.
	dups := f.b.FKXStats().Duplicates.Load()
	a.publish(up, env)
	waitFor(t, "the duplicate counted", func() bool { return f.b.FKXStats().Duplicates.Load() == dups+1 })

	// Refusals close an MQTT 3.1.1 connection (it has no negative PUBACK);
	// each case reconnects and rekeys first.
	attack := func(name, reason string, payload []byte, topic string) {
		t.Helper()
		if !a.c.IsConnectionOpen() {
			a.connect()
			a.handshake()
		}
		before := f.refusals(reason)
		a.c.Publish(topic, 1, false, payload)
		waitFor(t, name+" refused as "+reason, func() bool { return f.refusals(reason) == before+1 })
		waitFor(t, name+": connection closed", func() bool { return !a.c.IsConnectionOpen() })
	}
	flipped := a.record("two")
	flipped[len(flipped)-3] ^= 0x01
	attack("flipped bit", "auth", flipped, up)
	a.connect()
	a.handshake()
	short := a.record("three")
	attack("truncated", "auth", short[:len(short)-1], up)
	attack("plaintext", "malformed", []byte(`{"t":21.5}`), up)
	attack("kex channel", "kex-channel", a.record("x"), "devices/dev-a/up/kex")

	// An envelope under another device's key id, on A's topic: refused, and
	// A gets a hint to rekey.
	b := f.device("dev-b", sessionkey.Suite1)
	b.handshake()
	a.connect()
	a.handshake()
	attack("another device's key id", "unknown-kid", b.record("b's"), up)
	if _, err := sessionkey.ParseHint(a.expect("kex/hint")); err != nil {
		t.Fatalf("hint: %v", err)
	}
	if f.b.FKXStats().Hints.Load() == 0 {
		t.Fatal("hint not counted")
	}
	// Exactly the one good record reached the sink and the service.
	if lines := f.sinkLines(); len(lines) != 1 {
		t.Fatalf("sink holds %d lines: %q", len(lines), lines)
	}
	select {
	case m := <-got:
		t.Fatalf("the service got %s %q", m.Topic(), m.Payload())
	default:
	}
}

// TestFKXHandshakeAttacks: each refused and counted, and no msg2 or msg4
// answers it.
func TestFKXHandshakeAttacks(t *testing.T) {
	t.Parallel()
	f := startFKX(t, []sessionkey.Suite{sessionkey.Suite2}, nil)
	req := "devices/dev-a/kex/req"

	// A suite downgrade: the gateway answers only suite 2.
	a := f.device("dev-a", sessionkey.Suite1)
	m1, _ := a.init.Start()
	a.publish(req, m1)
	waitFor(t, "suite-1 msg1 refused", func() bool { return f.refusals("suite") == 1 })

	// msg3 signed with device B's key and credential on A's topic.
	a.setIdentity(f.leaf(f.issuer, identity.RoleDevice, "dev-b"), sessionkey.Suite2)
	m1, _ = a.init.Start()
	a.publish(req, m1)
	m3, err := a.init.HandleMsg2(a.expect("kex/resp"), nil)
	if err != nil {
		t.Fatal(err)
	}
	a.publish(req, m3)
	waitFor(t, "B's msg3 on A's topic refused", func() bool { return f.refusals("peer-credential") == 1 })

	// A good handshake; then its msg1 and msg3 replayed.
	a.setIdentity(a.cert, sessionkey.Suite2)
	msgs := a.handshake()
	a.publish(req, msgs[0])
	waitFor(t, "replayed msg1 refused", func() bool { return f.refusals("replayed-msg1") == 1 })
	// Within 30 s a repeat of msg3 is a QoS 1 duplicate: same msg4 again.
	a.publish(req, msgs[2])
	if got := a.expect("kex/resp"); !bytes.Equal(got, msgs[3]) {
		t.Fatal("a duplicate msg3 did not get the same msg4")
	}
	f.clk.Advance(31 * time.Second)
	a.publish(req, msgs[2])
	waitFor(t, "old msg3 refused", func() bool { return f.refusals("unexpected") == 1 })
	if f.b.FKXStats().Handshakes.Load() != 1 {
		t.Fatalf("%d handshakes completed; want 1", f.b.FKXStats().Handshakes.Load())
	}
	select {
	case m := <-a.in:
		t.Fatalf("an attack was answered on %s", m.Topic())
	default:
	}
}

// slowFile blocks Sync until released.
type slowFile struct {
	*os.File
	gate chan struct{}
}

func (s *slowFile) Sync() error {
	<-s.gate
	return s.File.Sync()
}

// TestFKXSlowSink: while the sink cannot fsync, no record is
// acknowledged; once it can, every record is, and every one is stored.
func TestFKXSlowSink(t *testing.T) {
	t.Parallel()
	gate := make(chan struct{})
	f := startFKX(t, nil, func(osf *os.File) sink.File { return &slowFile{File: osf, gate: gate} })
	d := f.device("dev-a", sessionkey.Suite1)
	d.handshake()
	const n = 200
	toks := make([]paho.Token, n)
	for i := range toks {
		toks[i] = d.c.Publish("devices/dev-a/up/telemetry", 1, false, d.record("r"))
	}
	if toks[0].WaitTimeout(300 * time.Millisecond) {
		t.Fatal("a record was acknowledged before it was durable")
	}
	close(gate)
	for i, tok := range toks {
		if !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
			t.Fatalf("record %d not acknowledged: %v", i, tok.Error())
		}
	}
	if lines := f.sinkLines(); len(lines) != n {
		t.Fatalf("sink holds %d of %d", len(lines), n)
	}
}

// TestFKXSlowSubscriber: a service that stops acknowledging slows the
// devices down; nothing acknowledged to a device is lost to the service.
func TestFKXSlowSubscriber(t *testing.T) {
	t.Parallel()
	f := startFKX(t, nil, nil, func(o *Options) { o.Sessions.SubscriberWindow = 64 })
	_, got := f.service(true)
	d := f.device("dev-a", sessionkey.Suite1)
	d.handshake()
	const n = 400
	toks := make([]paho.Token, n)
	for i := range toks {
		toks[i] = d.c.Publish("devices/dev-a/up/telemetry", 1, false, d.record("r"))
	}
	// The service takes its window of messages and acknowledges none.
	var held []paho.Message
	for len(held) < 64 {
		select {
		case m := <-got:
			held = append(held, m)
		case <-time.After(10 * time.Second):
			t.Fatalf("the service got %d messages", len(held))
		}
	}
	if toks[n-1].WaitTimeout(300 * time.Millisecond) {
		t.Fatal("every record was acknowledged while the service held its window: something was dropped or queued without bound")
	}
	if f.b.FKXStats().SubscriberWaits.Load() == 0 {
		t.Fatal("no delivery waited for the subscriber")
	}
	// Now it acknowledges: everything flows, and it gets every record.
	for _, m := range held {
		m.Ack()
	}
	total := len(held)
	for total < n {
		select {
		case m := <-got:
			m.Ack()
			total++
		case <-time.After(10 * time.Second):
			t.Fatalf("the service got %d of %d", total, n)
		}
	}
	for i, tok := range toks {
		if !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
			t.Fatalf("record %d: %v", i, tok.Error())
		}
	}
	if mochiDropped := f.b.mqtt.Info.InflightDropped; mochiDropped != 0 {
		t.Fatalf("mochi dropped %d messages", mochiDropped)
	}
	// Every message counted into the service's write queue was counted
	// out as it was written.
	cl, ok := f.b.mqtt.Clients.Get("analytics")
	if !ok {
		t.Fatal("no client analytics")
	}
	q, ok := f.b.fkx.queued.Load(cl)
	if !ok {
		t.Fatal("the service's write queue is not counted")
	}
	waitFor(t, "the service's write queue counted empty", func() bool { return q.(*writeQueue).len() == 0 })
}

// TestHasRoom: a subscriber has room below both its window of
// unacknowledged messages and the write-queue window; the queued count
// is never taken above the unacknowledged one.
func TestHasRoom(t *testing.T) {
	t.Parallel()
	e := &engine{cfg: Sessions{SubscriberWindow: 6}, queueWindow: 3}
	cl := mqtt.New(nil).NewClient(nil, "t", "svc", false)
	queued := new(writeQueue)
	e.queued.Store(cl, queued)
	setQueued := func(n int) {
		*queued = writeQueue{}
		for i := range n {
			queued.announced(uint16(1000 + i))
		}
	}
	inflight := func(n int) {
		cl.State.Inflight = mqtt.NewInflights()
		for i := 1; i <= n; i++ {
			cl.State.Inflight.Set(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}, PacketID: uint16(i)})
		}
	}
	for _, c := range []struct {
		inflight int
		queued   int
		room     bool
	}{
		{0, 0, true},
		{5, 2, true},  // below both
		{5, 3, false}, // the write queue is full
		{6, 0, false}, // the window is full
		{2, 9, true},  // a count gone high is capped at the unacknowledged
		{4, 9, false},
	} {
		inflight(c.inflight)
		setQueued(c.queued)
		if got := e.hasRoom(cl); got != c.room {
			t.Errorf("inflight %d, queued %d: room %v, want %v", c.inflight, c.queued, got, c.room)
		}
	}
	// The queue is kept by packet id: a message announced twice (held for
	// a receive quota, then resent) counts once, and a second write of it
	// does not take the count below what is still waiting.
	setQueued(0)
	queued.announced(7)
	queued.announced(7)
	queued.announced(8)
	queued.written(7)
	queued.written(7)
	if n := queued.len(); n != 1 {
		t.Errorf("after 7 announced twice and written twice, 8 announced: %d queued, want 1", n)
	}
	// A client whose queue is not counted (none is, but for safety) is
	// taken as having every unacknowledged message queued.
	e.queued.Delete(cl)
	inflight(3)
	if e.hasRoom(cl) {
		t.Error("uncounted client with 3 unacknowledged: room, want none")
	}
}

// TestFKXStalledSubscriber: a service that never acknowledges is
// disconnected after SubscriberStall (its session keeps what it has not
// acknowledged), and the devices go on.
func TestFKXStalledSubscriber(t *testing.T) {
	t.Parallel()
	f := startFKX(t, nil, nil, func(o *Options) { o.Sessions.SubscriberWindow, o.Sessions.SubscriberStall = 8, 200*time.Millisecond })
	svc, _ := f.service(true)
	d := f.device("dev-a", sessionkey.Suite1)
	d.handshake()
	toks := make([]paho.Token, 40)
	for i := range toks {
		toks[i] = d.c.Publish("devices/dev-a/up/telemetry", 1, false, d.record("r"))
	}
	for i, tok := range toks {
		if !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
			t.Fatalf("record %d not acknowledged after the stalled service was cut off: %v", i, tok.Error())
		}
	}
	if f.b.FKXStats().SubscriberKicks.Load() != 1 {
		t.Fatalf("%d subscriber kicks", f.b.FKXStats().SubscriberKicks.Load())
	}
	waitFor(t, "the stalled service disconnected", func() bool { return !svc.IsConnectionOpen() })
}

// TestFKXKexFlood: garbage on kex/req is dropped before it costs a
// worker, and one device cannot hold more than a few places in the
// workers' queue; its own next handshake still completes.
func TestFKXKexFlood(t *testing.T) {
	t.Parallel()
	f := startFKX(t, nil, nil, func(o *Options) { o.Sessions.Workers = 1 })
	d := f.device("dev-a", sessionkey.Suite1)
	before := f.refusals("malformed")
	d.publish("devices/dev-a/kex/req", []byte{0x01, 0x07, 0x01})
	d.publish("devices/dev-a/kex/req", make([]byte, 256))
	waitFor(t, "garbage dropped", func() bool { return f.refusals("malformed") == before+2 })
	// Block the one worker, then flood: at most maxKexQueued wait.
	gate := make(chan struct{})
	f.b.fkx.jobs <- func() { <-gate }
	m1, _ := d.init.Start()
	for i := 0; i < 20; i++ {
		d.c.Publish("devices/dev-a/kex/req", 0, false, m1)
	}
	waitFor(t, "flood refused", func() bool { return f.refusals("kex-flood") >= 20-maxKexQueued })
	close(gate)
	// The copies that got in are one msg1 and its QoS-style repeats: the
	// handshake completes from it (repeats of msg2 are skipped).
	m3, err := d.init.HandleMsg2(d.expect("kex/resp"), nil)
	if err != nil {
		t.Fatal(err)
	}
	d.publish("devices/dev-a/kex/req", m3)
	for {
		if m := d.expect("kex/resp"); len(m) == 22 {
			if _, err := d.init.HandleMsg4(m, nil); err != nil {
				t.Fatal(err)
			}
			return
		}
	}
}

// TestFKXCommandsAfterDeviceRestart: a device that restarted has lost its
// keys; a command sent before its first record on the new connection
// waits, and then arrives under the new key.
func TestFKXCommandsAfterDeviceRestart(t *testing.T) {
	t.Parallel()
	f := startFKX(t, nil, nil)
	svc, got := f.service(false)
	d := f.device("dev-a", sessionkey.Suite1)
	d.handshake()
	d.publish("devices/dev-a/up/telemetry", d.record("before"))
	<-got
	d.c.Disconnect(100)
	// The restarted device: new keys, same certificate.
	d.ring = sessionkey.NewKeyring(false, sessionkey.Rotation{}, f.clk.Now)
	d.setIdentity(d.cert, sessionkey.Suite1)
	d.connect()
	d.handshake()
	if tok := svc.Publish("fleet/commands/dev-a/config", 1, false, "after restart"); !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		t.Fatal(tok.Error())
	}
	d.publish("devices/dev-a/up/telemetry", d.record("after"))
	pt, _, err := d.ring.Open(d.expect("down/config"), "config")
	if err != nil || string(pt[16:]) != "after restart" {
		t.Fatalf("command after the device restarted: %q %v", pt, err)
	}
}

// TestFKXRefusalUnderMQTT5: MQTT 5 has a negative PUBACK, so a refused
// envelope gets reason 0x80 and the connection stays up.
func TestFKXRefusalUnderMQTT5(t *testing.T) {
	t.Parallel()
	f := startFKX(t, nil, nil)
	cert := f.leaf(f.issuer, identity.RoleDevice, "dev-5")
	c, err := tls.Dial("tcp", f.addr, f.tlsConfig(&cert))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	connect := []byte{0, 4, 'M', 'Q', 'T', 'T', 5, 0x02, 0, 30, 0, 0, 5, 'd', 'e', 'v', '-', '5'}
	if _, err := c.Write(append([]byte{0x10, byte(len(connect))}, connect...)); err != nil {
		t.Fatal(err)
	}
	r := bufio.NewReader(c)
	readPacket := func() (byte, []byte) {
		t.Helper()
		_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
		h, err := r.ReadByte()
		if err != nil {
			t.Fatalf("reading: %v", err)
		}
		n, mult := 0, 1
		for {
			d, err := r.ReadByte()
			if err != nil {
				t.Fatal(err)
			}
			n += int(d&0x7f) * mult
			mult *= 128
			if d&0x80 == 0 {
				break
			}
		}
		body := make([]byte, n)
		if _, err := io.ReadFull(r, body); err != nil {
			t.Fatal(err)
		}
		return h, body
	}
	if h, body := readPacket(); h != 0x20 || len(body) < 2 || body[1] != 0 {
		t.Fatalf("CONNACK %x % x", h, body)
	}
	topic := "devices/dev-5/up/telemetry"
	for id := byte(1); id <= 2; id++ {
		pk := binary.BigEndian.AppendUint16(nil, uint16(len(topic)))
		pk = append(append(append(pk, topic...), 0, id, 0), []byte("plaintext, not an envelope")...)
		if _, err := c.Write(append([]byte{0x32, byte(len(pk))}, pk...)); err != nil {
			t.Fatal(err)
		}
		for {
			h, body := readPacket()
			if h>>4 != 4 {
				continue // not a PUBACK
			}
			if len(body) < 3 || body[1] != id || body[2] != 0x80 {
				t.Fatalf("PUBACK % x; want packet %d with reason 0x80", body, id)
			}
			break
		}
	}
	if f.refusals("malformed") < 2 {
		t.Fatal("refusals not counted")
	}
}

// TestFKXSubscriberThatStopsReading: a service that stops reading its
// socket. mochi writes to it under the client's lock, which publishing to
// it takes too, so the deliveries stall behind that write until
// WriteTimeout closes the connection; then the devices go on. Nothing is
// dropped from mochi's write queue on the way: deliveries also wait while
// that queue is nearly full, long before the service's window of
// unacknowledged messages (1024 by default) is reached.
func TestFKXSubscriberThatStopsReading(t *testing.T) {
	t.Parallel()
	f := startFKX(t, nil, nil, func(o *Options) { o.Limits.WriteTimeout = 500 * time.Millisecond })
	svc := f.rawConnect(t, f.leaf(f.issuer, identity.RoleService, "analytics"), "analytics", false)
	filter := "fleet/telemetry/#"
	sub := append([]byte{0, 1, 0, byte(len(filter))}, filter...)
	sub = append(sub, 1)
	if _, err := svc.Write(append([]byte{0x82, byte(len(sub))}, sub...)); err != nil {
		t.Fatal(err)
	}
	ack := make([]byte, 5)
	if _, err := io.ReadFull(svc, ack); err != nil || ack[0] != 0x90 || ack[4] != 1 {
		t.Fatalf("SUBACK: % x, %v", ack, err)
	}
	// From here the service reads nothing. 600 records of 32 KB are more
	// than the sockets between them buffer.
	d := f.device("dev-a", sessionkey.Suite1)
	d.handshake()
	body := strings.Repeat("r", 32<<10)
	toks := make([]paho.Token, 600)
	for i := range toks {
		toks[i] = d.c.Publish("devices/dev-a/up/telemetry", 1, false, d.record(body))
	}
	for i, tok := range toks {
		if !tok.WaitTimeout(30*time.Second) || tok.Error() != nil {
			t.Fatalf("record %d not acknowledged after the service that stopped reading was cut off: %v", i, tok.Error())
		}
	}
	if n := atomic.LoadInt64(&f.b.mqtt.Info.MessagesDropped); n != 0 {
		t.Fatalf("mochi dropped %d messages from its full write queue", n)
	}
	waitFor(t, "the service that stopped reading disconnected", func() bool {
		cl, ok := f.b.mqtt.Clients.Get("analytics")
		return !ok || cl.Closed()
	})
	if lines := f.sinkLines(); len(lines) != len(toks) {
		t.Fatalf("sink holds %d of %d", len(lines), len(toks))
	}
}
