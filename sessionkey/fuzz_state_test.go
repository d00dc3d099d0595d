package sessionkey

import (
	"bytes"
	"crypto/ecdsa"
	"encoding/binary"
	"errors"
	mathrand "math/rand/v2"
	"sync"
	"testing"
	"testing/cryptotest"
)

// FuzzHandshakeStates delivers arbitrary bytes to one of the four
// handlers (Responder.HandleMsg1 and HandleMsg3, Initiator.HandleMsg2 and
// HandleMsg4) at one point of a handshake, one to four times, and then
// runs the rest of the handshake with the genuine messages. It checks,
// against a model of FKX1.md (Handshake: order of checks, state):
//
//   - nothing panics, and a refused message produces nothing to send;
//   - a handler refuses, with ErrUnexpected, a message its side is not
//     waiting for;
//   - a handler accepts only the genuine message (the handshake is made
//     deterministic below, so the genuine bytes are known in advance), and
//     an accepted message does what the genuine one would;
//   - a refused message leaves the pending handshake able to complete with
//     the genuine next message, except: a msg3 that matches the pending
//     sids and fails a later check counts, and the third such failure ends
//     the handshake (ErrAborted; the genuine msg3 is then ErrUnexpected);
//     and another well-formed msg1 replaces the gateway's pending
//     handshake, so the genuine msg3 is then ErrUnexpected;
//   - a completed handshake gives both sides the same kid and working
//     envelopes, and a duplicate of its msg3 still gets the same msg4.
//
// The input's first byte picks the suite (bit 0), the handler (bits 1-2:
// msg1, msg2, msg3, msg4), the number of deliveries minus one (bits 3-4)
// and how many genuine steps come first (bits 5-7, modulo 6).
func FuzzHandshakeStates(f *testing.F) {
	fx := newStateFuzz(f)
	for _, suite := range []Suite{Suite1, Suite2} {
		seeds := fx.seedRun(f, suite)
		for stage := range 6 {
			for h := range 4 {
				ctl := func(times int) uint8 {
					return uint8(int(suite-Suite1) | h<<1 | (times-1)<<3 | stage<<5)
				}
				genuine := seeds[h]
				flipped := bytes.Clone(genuine)
				flipped[len(flipped)-1] ^= 1
				f.Add(ctl(1), genuine)
				f.Add(ctl(3), flipped)
				f.Add(ctl(1), genuine[:len(genuine)-1])
			}
		}
	}
	f.Add(uint8(0), []byte{})
	f.Fuzz(func(t *testing.T, ctl uint8, junk []byte) {
		suite := Suite1 + Suite(ctl&1)
		handler := int(ctl>>1) & 3
		times := 1 + int(ctl>>3)&3
		stage := int(ctl>>5) % 6
		m := fx.newModel(t, suite)
		for step := range stage {
			m.step(t, step)
		}
		for range times {
			m.deliver(t, handler, junk)
		}
		for step := stage; step < 5; step++ {
			if !m.step(t, step) {
				return // the handshake ended, as the model expected
			}
		}
		m.checkCompleted(t)
	})
}

// stateFuzz holds what every execution shares: the identities and, per
// suite, the genuine messages of the deterministic handshake.
type stateFuzz struct {
	pki    *testPKI
	dev    Identity
	gw     Identity
	device string

	mu    sync.Mutex
	canon map[Suite]*[4][]byte
	seeds map[Suite][4][]byte
}

// The fixed seeds of the deterministic handshake.
var (
	fuzzDeviceSeed  = [32]byte{'d', 'e', 'v'}
	fuzzGatewaySeed = [32]byte{'g', 'w'}
)

const fuzzGlobalSeed = 0xf1c1

func newStateFuzz(tb testing.TB) *stateFuzz {
	p := fleetPKI(tb)
	fx := &stateFuzz{pki: p, device: "dev-fuzz", canon: map[Suite]*[4][]byte{}, seeds: map[Suite][4][]byte{}}
	fx.dev = p.leaf(tb, "device", fx.device)
	fx.gw = p.leaf(tb, "gateway", "gw-fuzz")
	// RFC 6979 signatures: with the ChaCha8 streams below (and, for the
	// ML-KEM encapsulation, cryptotest.SetGlobalRandom), every message of
	// a handshake is the same from one execution to the next.
	fx.dev.Signer = rfc6979Signer{fx.dev.Signer.(*ecdsa.PrivateKey)}
	fx.gw.Signer = rfc6979Signer{fx.gw.Signer.(*ecdsa.PrivateKey)}
	return fx
}

// pair makes a fresh initiator and responder with the fixed randomness.
func (fx *stateFuzz) pair(tb testing.TB, suite Suite) (*Initiator, *Responder) {
	tb.Helper()
	clk := newClock()
	in, err := NewInitiator(InitiatorConfig{DeviceID: fx.device, Suite: suite, Identity: fx.dev,
		VerifyGateway: fx.pki.gatewayVerifier(), Rand: mathrand.NewChaCha8(fuzzDeviceSeed), Now: clk.Now})
	if err != nil {
		tb.Fatal(err)
	}
	cfg, err := NewResponderConfig(ResponderConfig{Identity: fx.gw, VerifyDevice: fx.pki.deviceVerifier(),
		Rand: mathrand.NewChaCha8(fuzzGatewaySeed), Now: clk.Now})
	if err != nil {
		tb.Fatal(err)
	}
	return in, NewResponder(cfg, fx.device)
}

// run completes one handshake and returns its four messages.
func (fx *stateFuzz) run(tb testing.TB, suite Suite) [4][]byte {
	tb.Helper()
	in, resp := fx.pair(tb, suite)
	var msgs [4][]byte
	var err error
	if msgs[0], err = in.Start(); err != nil {
		tb.Fatal(err)
	}
	if msgs[1], err = resp.HandleMsg1(msgs[0]); err != nil {
		tb.Fatal(err)
	}
	if msgs[2], err = in.HandleMsg2(msgs[1], nil); err != nil {
		tb.Fatal(err)
	}
	if msgs[3], _, err = resp.HandleMsg3(msgs[2], nil, nil); err != nil {
		tb.Fatal(err)
	}
	if _, err = in.HandleMsg4(msgs[3], nil); err != nil {
		tb.Fatal(err)
	}
	return msgs
}

// seedRun is a handshake for the seed corpus. It runs without
// SetGlobalRandom (the corpus is built before there is a *testing.T), so
// for suite 2 the ML-KEM ciphertext, and with it msg2 to msg4, differ
// from the executions' genuine ones; their sids still match. Its msg2 is
// then one the genuine gateway signed for the device's sid_D in another
// handshake: the device accepts it (it cannot tell), and the gateway
// refuses the msg3 built on it.
func (fx *stateFuzz) seedRun(f *testing.F, suite Suite) [4][]byte {
	msgs := fx.run(f, suite)
	fx.seeds[suite] = msgs
	return msgs
}

// canonical returns the genuine messages of suite's deterministic
// handshake, computing them on first use, and resets the global random
// stream so that the execution repeats them.
func (fx *stateFuzz) canonical(t *testing.T, suite Suite) [4][]byte {
	fx.mu.Lock()
	defer fx.mu.Unlock()
	c := fx.canon[suite]
	if c == nil {
		cryptotest.SetGlobalRandom(t, fuzzGlobalSeed)
		msgs := fx.run(t, suite)
		c = &msgs
		fx.canon[suite] = c
	}
	cryptotest.SetGlobalRandom(t, fuzzGlobalSeed)
	return *c
}

// stateModel is one execution: the two sides, and what FKX1.md says their
// state is.
type stateModel struct {
	fx    *stateFuzz
	suite Suite
	in    *Initiator
	resp  *Responder
	canon [4][]byte // the genuine msg1..msg4

	// done[i]: genuine step i has happened, or an accepted message did it.
	// Steps: 0 device Start, 1 gateway msg1, 2 device msg2, 3 gateway msg3,
	// 4 device msg4.
	done      [5]bool
	msgs      [4][]byte // msg1..msg4 as this execution produced them
	perturbed bool      // the gateway answered another msg1 first: its randomness moved on
	diverged  bool      // the device accepted the seed run's msg2, signed for its sid_D in another handshake
	replaced  bool      // another msg1 replaced the genuine pending handshake
	aborted   bool      // the pending handshake ended after 3 failures
	failures  int
	devEp     *Epoch
	gwEp      *Epoch
}

func (fx *stateFuzz) newModel(t *testing.T, suite Suite) *stateModel {
	canon := fx.canonical(t, suite)
	in, resp := fx.pair(t, suite)
	return &stateModel{fx: fx, suite: suite, in: in, resp: resp, canon: canon}
}

func (m *stateModel) deviceWaitsMsg2() bool { return m.done[0] && !m.done[2] }
func (m *stateModel) deviceWaitsMsg4() bool { return m.done[2] && !m.done[4] }
func (m *stateModel) deviceIdle() bool      { return !m.deviceWaitsMsg2() && !m.deviceWaitsMsg4() }
func (m *stateModel) gatewayPending() bool {
	return m.done[1] && !m.done[3] && !m.replaced && !m.aborted
}

// same checks a message against its genuine bytes, unless the gateway's
// randomness has moved on.
func (m *stateModel) same(t *testing.T, what string, got []byte, i int) {
	t.Helper()
	if !m.perturbed && !bytes.Equal(got, m.canon[i]) {
		t.Fatalf("%s differs from the genuine one: the handshake is not deterministic", what)
	}
}

// step runs genuine step i, unless an accepted message already did. It
// reports false when the model says the handshake has ended.
func (m *stateModel) step(t *testing.T, i int) bool {
	t.Helper()
	if m.done[i] {
		return true
	}
	var err error
	switch i {
	case 0:
		if m.msgs[0], err = m.in.Start(); err != nil {
			t.Fatalf("Start: %v", err)
		}
		m.same(t, "msg1", m.msgs[0], 0)
	case 1:
		if m.msgs[1], err = m.resp.HandleMsg1(m.msgs[0]); err != nil {
			t.Fatalf("genuine msg1: %v", err)
		}
		m.same(t, "msg2", m.msgs[1], 1)
	case 2:
		if m.msgs[2], err = m.in.HandleMsg2(m.msgs[1], nil); err != nil {
			t.Fatalf("genuine msg2: %v", err)
		}
		m.same(t, "msg3", m.msgs[2], 2)
	case 3:
		msg4, ep, err := m.resp.HandleMsg3(m.msgs[2], nil, nil)
		if m.diverged {
			if !errors.Is(err, ErrFinish) || msg4 != nil {
				t.Fatalf("msg3 built on another handshake's msg2: %v, want ErrFinish", err)
			}
			return false
		}
		if m.replaced || m.aborted {
			if !errors.Is(err, ErrUnexpected) || msg4 != nil {
				t.Fatalf("genuine msg3 after the pending handshake ended (replaced %v, aborted %v): %v", m.replaced, m.aborted, err)
			}
			return false
		}
		if err != nil || ep == nil {
			t.Fatalf("genuine msg3: %v", err)
		}
		m.msgs[3], m.gwEp = msg4, ep
		m.same(t, "msg4", msg4, 3)
	case 4:
		if m.devEp, err = m.in.HandleMsg4(m.msgs[3], nil); err != nil {
			t.Fatalf("genuine msg4: %v", err)
		}
	}
	m.done[i] = true
	return true
}

// deliver hands junk to one handler and checks the outcome against the
// model, updating it.
func (m *stateModel) deliver(t *testing.T, handler int, junk []byte) {
	t.Helper()
	switch handler {
	case 0:
		m.deliverMsg1(t, junk)
	case 1:
		waiting := m.deviceWaitsMsg2()
		out, err := m.in.HandleMsg2(junk, nil)
		if err == nil {
			other := m.fx.seeds[m.suite][1]
			switch {
			case !waiting:
				t.Fatal("the device accepted a msg2 while not waiting for one")
			case bytes.Equal(junk, m.canon[1]):
				m.same(t, "msg3", out, 2)
			case bytes.Equal(junk, other) && !bytes.Equal(other, m.canon[1]):
				m.diverged = true
			default:
				t.Fatal("the device accepted a msg2 that the gateway did not sign")
			}
			m.msgs[2], m.done[2] = out, true
			return
		}
		if out != nil {
			t.Fatal("a refused msg2 produced a msg3")
		}
		if !waiting && !errors.Is(err, ErrUnexpected) {
			t.Fatalf("msg2 while not waiting for one: %v, want ErrUnexpected", err)
		}
		m.checkDevice(t)
	case 2:
		m.deliverMsg3(t, junk)
	case 3:
		waiting := m.deviceWaitsMsg4()
		ep, err := m.in.HandleMsg4(junk, nil)
		if err == nil {
			if !waiting || !bytes.Equal(junk, m.canon[3]) || ep == nil {
				t.Fatalf("the device accepted a msg4 that is not the genuine one (waiting for msg4: %v)", waiting)
			}
			m.devEp, m.done[4] = ep, true
			return
		}
		if ep != nil {
			t.Fatal("a refused msg4 produced an epoch")
		}
		if !waiting && !errors.Is(err, ErrUnexpected) {
			t.Fatalf("msg4 while not waiting for one: %v, want ErrUnexpected", err)
		}
		m.checkDevice(t)
	}
}

// checkDevice: a refused message leaves the device's state as it was.
func (m *stateModel) checkDevice(t *testing.T) {
	t.Helper()
	if m.in.Waiting() == m.deviceIdle() {
		t.Fatalf("the device's state changed on a refused message (waiting: %v)", m.in.Waiting())
	}
	if _, ok := m.in.PendingKID(); ok != m.deviceWaitsMsg4() {
		t.Fatal("the device's pending kid changed on a refused message")
	}
}

func (m *stateModel) deliverMsg1(t *testing.T, junk []byte) {
	t.Helper()
	out, err := m.resp.HandleMsg1(junk)
	if err != nil {
		if out != nil {
			t.Fatal("a refused msg1 produced a msg2")
		}
		if bytes.Equal(junk, m.canon[0]) && !m.done[3] {
			t.Fatalf("the genuine msg1 refused before its handshake completed: %v", err)
		}
		return
	}
	m1, err1 := ParseMsg1(junk)
	m2, err2 := ParseMsg2(out)
	if err1 != nil || err2 != nil || m2.SidD != m1.SidD || m2.Suite != m1.Suite {
		t.Fatalf("msg1 answered with a msg2 that does not match it: %v, %v", err1, err2)
	}
	if !bytes.Equal(junk, m.canon[0]) {
		// Another device's handshake, as far as this one is concerned: it
		// replaces the genuine pending one, if any.
		if m.gatewayPending() {
			m.replaced = true
		}
		if !m.done[1] {
			m.perturbed = true
		}
		return
	}
	switch {
	case m.done[3]:
		t.Fatal("the gateway answered again a msg1 whose handshake has completed")
	case m.done[1] && !m.replaced && !m.aborted:
		if !bytes.Equal(out, m.msgs[1]) {
			t.Fatal("a duplicate msg1 got a different msg2")
		}
	case !m.done[1]:
		m.msgs[1], m.done[1] = out, true
		m.same(t, "msg2", out, 1)
	}
}

func (m *stateModel) deliverMsg3(t *testing.T, junk []byte) {
	t.Helper()
	pending := m.gatewayPending()
	msg4, ep, err := m.resp.HandleMsg3(junk, nil, nil)
	if err == nil {
		if !bytes.Equal(junk, m.canon[2]) {
			t.Fatal("the gateway accepted a msg3 that is not the genuine one")
		}
		switch {
		case m.done[3]: // a duplicate of the msg3 that completed it
			if ep != nil || !bytes.Equal(msg4, m.msgs[3]) {
				t.Fatal("a duplicate msg3 did not get the same msg4 and no epoch")
			}
		case pending:
			if ep == nil {
				t.Fatal("msg3 completed the handshake without an epoch")
			}
			m.msgs[3], m.gwEp, m.done[3] = msg4, ep, true
			m.same(t, "msg4", msg4, 3)
		default:
			t.Fatal("the gateway accepted a msg3 with no pending handshake")
		}
		return
	}
	if msg4 != nil || ep != nil {
		t.Fatal("a refused msg3 produced a msg4 or an epoch")
	}
	p, perr := ParseMsg3(junk)
	counted := pending && perr == nil && bytes.Equal(p.SidD[:], m.canon[0][3:3+sidSize]) &&
		bytes.Equal(p.SidG[:], m.canon[1][3+sidSize:3+2*sidSize])
	switch {
	case counted:
		m.failures++
		if m.failures >= 3 {
			if !errors.Is(err, ErrAborted) {
				t.Fatalf("third failure of a pending handshake: %v, want ErrAborted", err)
			}
			m.aborted = true
		} else if errors.Is(err, ErrAborted) || errors.Is(err, ErrUnexpected) {
			t.Fatalf("failure %d of a pending handshake: %v", m.failures, err)
		}
	case perr == nil && !errors.Is(err, ErrUnexpected):
		t.Fatalf("msg3 that matches no pending handshake: %v, want ErrUnexpected", err)
	}
}

// checkCompleted checks the outcome of a completed handshake.
func (m *stateModel) checkCompleted(t *testing.T) {
	t.Helper()
	if m.devEp == nil || m.gwEp == nil {
		t.Fatalf("handshake over without both epochs")
	}
	if m.devEp.KID != m.gwEp.KID {
		t.Fatal("the sides' kids differ")
	}
	if m.in.Waiting() {
		t.Fatal("the device still waits after msg4")
	}
	env, err := m.devEp.Send.Seal("telemetry", []byte("d2g"))
	if err != nil {
		t.Fatal(err)
	}
	if pt, err := m.gwEp.Recv.Open(env, "telemetry"); err != nil || string(pt) != "d2g" {
		t.Fatalf("d2g under the new epoch: %v", err)
	}
	if env, err = m.gwEp.Send.Seal("config", []byte("g2d")); err != nil {
		t.Fatal(err)
	}
	if pt, err := m.devEp.Recv.Open(env, "config"); err != nil || string(pt) != "g2d" {
		t.Fatalf("g2d under the new epoch: %v", err)
	}
	if msg4, ep, err := m.resp.HandleMsg3(m.msgs[2], nil, nil); err != nil || ep != nil || !bytes.Equal(msg4, m.msgs[3]) {
		t.Fatalf("duplicate of the completing msg3: %v", err)
	}
}

// FuzzParseHint checks that a parsed hint re-encodes to its bytes and is
// no other kind of message.
func FuzzParseHint(f *testing.F) {
	f.Add(MarshalHint(KID{}))
	f.Add(MarshalHint(KID{0xde, 0xad, 0xbe, 0xef}))
	f.Add([]byte{1, 0x10, 1, 2, 3})
	f.Add([]byte{1, 0x10, 1, 2, 3, 4, 5})
	f.Add([]byte{2, 0x10, 1, 2, 3, 4})
	f.Fuzz(func(t *testing.T, b []byte) {
		kid, err := ParseHint(b)
		if err != nil {
			if !errors.Is(err, ErrMessage) {
				t.Fatalf("refusal that is not ErrMessage: %v", err)
			}
			return
		}
		if !bytes.Equal(MarshalHint(kid), b) {
			t.Fatal("hint does not re-encode to its bytes")
		}
		if _, err := ParseMsg1(b); err == nil {
			t.Fatal("a hint parses as msg1")
		}
		if _, _, _, err := ParseHeader(b); err == nil {
			t.Fatal("a hint parses as an envelope")
		}
	})
}

// FuzzParseHeader checks ParseHeader against the envelope's encoding
// (FKX1.md, Envelope), and that a Receiver refuses what it refuses and
// changes nothing on a refusal.
func FuzzParseHeader(f *testing.F) {
	s := NewSender(testMS, testKID, D2G, "sensor-1", 0)
	for _, pt := range [][]byte{nil, []byte("0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef")} {
		env, err := s.Seal("telemetry", pt)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(env)
	}
	for _, seq := range []uint64{0, 1<<7 - 1, 1 << 7, 1<<14 - 1, 1 << 14, 1<<16 + 5, 1<<21 - 1, 1 << 21, 1<<28 - 1, 1 << 28, 1<<32 - 1, 1 << 32, 1<<64 - 1} {
		hdr := binary.AppendUvarint(append([]byte{envelopeVersion}, testKID[:]...), seq)
		f.Add(append(hdr, make([]byte, tagSize)...))
	}
	f.Add(append([]byte{1, 1, 2, 3, 4, 0x80, 0x00}, make([]byte, tagSize)...)) // non-minimal
	f.Add(append([]byte{1, 1, 2, 3, 4, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01}, make([]byte, tagSize)...))
	f.Add([]byte{1, 1, 2, 3, 4, 0})
	f.Fuzz(func(t *testing.T, b []byte) {
		r := NewReceiver(testMS, testKID, D2G, "sensor-1")
		kid, seq, hl, err := ParseHeader(b)
		if err != nil {
			if !errors.Is(err, ErrMalformed) {
				t.Fatalf("refusal that is not ErrMalformed: %v", err)
			}
			if _, err := r.Open(b, "telemetry"); !errors.Is(err, ErrMalformed) {
				t.Fatalf("Open of an envelope ParseHeader refuses: %v, want ErrMalformed", err)
			}
			return
		}
		if seq >= maxSeq {
			t.Fatalf("seq %d accepted", seq)
		}
		want := binary.AppendUvarint(append([]byte{envelopeVersion}, kid[:]...), seq)
		if hl != len(want) || !bytes.Equal(b[:hl], want) {
			t.Fatalf("header of %d bytes %x does not re-encode to %x", hl, b[:hl], want)
		}
		if len(b) < hl+tagSize {
			t.Fatalf("an envelope of %d bytes with a %d-byte header has no room for its tag", len(b), hl)
		}
		pt, err := r.Open(b, "telemetry")
		switch {
		case err == nil:
			if r.Highest() != int64(seq) || len(pt) != len(b)-hl-tagSize {
				t.Fatalf("opened seq %d: S = %d, %d bytes of plaintext", seq, r.Highest(), len(pt))
			}
		case errors.Is(err, ErrMalformed):
			t.Fatalf("Open refuses as malformed what ParseHeader accepts: %v", err)
		case r.Highest() != -1:
			t.Fatalf("a refused envelope (%v) moved S to %d", err, r.Highest())
		case kid != testKID && !errors.Is(err, ErrUnknownKID):
			t.Fatalf("an envelope under another kid: %v, want ErrUnknownKID", err)
		}
	})
}
