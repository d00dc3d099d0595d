package sessionkey

import (
	"bytes"
	"errors"
	"testing"
	"time"
)

type rig struct {
	pki    *testPKI
	clk    *clock
	gwID   Identity
	rcfg   *ResponderConfig
	resp   *Responder
	dev    *Initiator
	devID  Identity
	device string
}

func newRig(t *testing.T, suite Suite, allowed ...Suite) *rig {
	t.Helper()
	p := fleetPKI(t)
	r := &rig{pki: p, clk: newClock(), device: "dev-a"}
	r.gwID = p.leaf(t, "gateway", "gw-1")
	r.devID = p.leaf(t, "device", r.device)
	var err error
	r.rcfg, err = NewResponderConfig(ResponderConfig{Suites: allowed, Identity: r.gwID, VerifyDevice: p.deviceVerifier(), Now: r.clk.Now})
	if err != nil {
		t.Fatal(err)
	}
	r.resp = NewResponder(r.rcfg, r.device)
	r.dev = r.initiator(t, r.device, r.devID, suite)
	return r
}

func (r *rig) initiator(t *testing.T, deviceID string, id Identity, suite Suite) *Initiator {
	t.Helper()
	in, err := NewInitiator(InitiatorConfig{DeviceID: deviceID, Suite: suite, Identity: id, VerifyGateway: r.pki.gatewayVerifier(), Now: r.clk.Now})
	if err != nil {
		t.Fatal(err)
	}
	return in
}

// run completes one handshake and returns both epochs and the messages.
func (r *rig) run(t *testing.T) (dev, gw *Epoch, msgs [4][]byte) {
	t.Helper()
	var err error
	if msgs[0], err = r.dev.Start(); err != nil {
		t.Fatal(err)
	}
	if msgs[1], err = r.resp.HandleMsg1(msgs[0]); err != nil {
		t.Fatal(err)
	}
	if msgs[2], err = r.dev.HandleMsg2(msgs[1], nil); err != nil {
		t.Fatal(err)
	}
	if msgs[3], gw, err = r.resp.HandleMsg3(msgs[2], nil, nil); err != nil {
		t.Fatal(err)
	}
	if dev, err = r.dev.HandleMsg4(msgs[3], nil); err != nil {
		t.Fatal(err)
	}
	return dev, gw, msgs
}

func TestHandshakeBothSuites(t *testing.T) {
	for _, suite := range []Suite{Suite1, Suite2} {
		r := newRig(t, suite)
		dev, gw, msgs := r.run(t)
		if dev.KID != gw.KID {
			t.Fatalf("suite %d: kids differ", suite)
		}
		if len(msgs[3]) != msg4Size {
			t.Fatalf("msg4 is %d bytes", len(msgs[3]))
		}
		// d2g starts at 0; g2d data at 1 (msg4 took 0).
		env, _ := dev.Send.Seal("telemetry", []byte("t1"))
		if pt, err := gw.Recv.Open(env, "telemetry"); err != nil || string(pt) != "t1" {
			t.Fatalf("d2g: %q %v", pt, err)
		}
		if gw.Send.Seq() != 1 {
			t.Fatalf("g2d data starts at %d, want 1", gw.Send.Seq())
		}
		env, _ = gw.Send.Seal("cmd", []byte("c1"))
		if pt, err := dev.Recv.Open(env, "cmd"); err != nil || string(pt) != "c1" {
			t.Fatalf("g2d: %q %v", pt, err)
		}
		if r.dev.Waiting() {
			t.Fatal("initiator still waiting after msg4")
		}
	}
}

func TestMsg1Rules(t *testing.T) {
	r := newRig(t, Suite1)
	m1, _ := r.dev.Start()
	m2, err := r.resp.HandleMsg1(m1)
	if err != nil {
		t.Fatal(err)
	}
	// A QoS 1 duplicate gets the same msg2 and changes nothing.
	again, err := r.resp.HandleMsg1(m1)
	if err != nil || !bytes.Equal(again, m2) {
		t.Fatalf("duplicate msg1: %v", err)
	}
	// A new msg1 replaces the pending handshake; the old one is then a replay.
	m1b, _ := r.dev.Start()
	if _, err := r.resp.HandleMsg1(m1b); err != nil {
		t.Fatal(err)
	}
	if _, err := r.resp.HandleMsg1(m1); !errors.Is(err, ErrReplayedMsg1) {
		t.Fatalf("replayed msg1: %v", err)
	}
	// The old msg2 no longer matches the device's pending sid.
	if _, err := r.dev.HandleMsg2(m2, nil); !errors.Is(err, ErrUnexpected) {
		t.Fatalf("stale msg2: %v", err)
	}
	// 10 answered per minute, then refused until the minute passes.
	for i := 2; i < 10; i++ {
		m, _ := r.dev.Start()
		if _, err := r.resp.HandleMsg1(m); err != nil {
			t.Fatalf("msg1 #%d: %v", i+1, err)
		}
	}
	m11, _ := r.dev.Start()
	if _, err := r.resp.HandleMsg1(m11); !errors.Is(err, ErrRateLimited) {
		t.Fatalf("11th msg1 in a minute: %v", err)
	}
	r.clk.Advance(61 * time.Second)
	if _, err := r.resp.HandleMsg1(m11); err != nil {
		t.Fatalf("after a minute: %v", err)
	}
	// Memory of answered msg1s lasts 10 minutes.
	r.clk.Advance(10 * time.Minute)
	if _, err := r.resp.HandleMsg1(m1); err != nil {
		t.Fatalf("msg1 older than the replay memory: %v", err)
	}
}

func TestMsg3Rules(t *testing.T) {
	r := newRig(t, Suite1)
	_, _, msgs := r.run(t)
	// A QoS 1 duplicate of the msg3 that completed the handshake gets the
	// same msg4 for 30 s, and no new epoch.
	m4, ep, err := r.resp.HandleMsg3(msgs[2], nil, nil)
	if err != nil || ep != nil || !bytes.Equal(m4, msgs[3]) {
		t.Fatalf("duplicate msg3: %v %v", ep, err)
	}
	r.clk.Advance(31 * time.Second)
	if _, _, err := r.resp.HandleMsg3(msgs[2], nil, nil); !errors.Is(err, ErrUnexpected) {
		t.Fatalf("old msg3 replayed after 30 s: %v", err)
	}

	// Three failures end a pending handshake; the genuine msg3 then fails.
	m1, _ := r.dev.Start()
	m2, _ := r.resp.HandleMsg1(m1)
	m3, _ := r.dev.HandleMsg2(m2, nil)
	bad := bytes.Clone(m3)
	bad[len(bad)-1] ^= 1
	for i := 0; i < 3; i++ {
		_, _, err := r.resp.HandleMsg3(bad, nil, nil)
		if i < 2 && !errors.Is(err, ErrFinish) {
			t.Fatalf("failure %d: %v", i+1, err)
		}
		if i == 2 && !errors.Is(err, ErrAborted) {
			t.Fatalf("third failure: %v", err)
		}
	}
	if _, _, err := r.resp.HandleMsg3(m3, nil, nil); !errors.Is(err, ErrUnexpected) {
		t.Fatalf("msg3 after the handshake ended: %v", err)
	}

	// A pending handshake expires after 30 s.
	r.clk.Advance(time.Minute)
	m1, _ = r.dev.Start()
	m2, _ = r.resp.HandleMsg1(m1)
	m3, _ = r.dev.HandleMsg2(m2, nil)
	r.clk.Advance(31 * time.Second)
	if _, _, err := r.resp.HandleMsg3(m3, nil, nil); !errors.Is(err, ErrUnexpected) {
		t.Fatalf("msg3 after expiry: %v", err)
	}

	// Sids that do not match leave the pending handshake untouched.
	m1, _ = r.dev.Start()
	m2, _ = r.resp.HandleMsg1(m1)
	m3, _ = r.dev.HandleMsg2(m2, nil)
	other := bytes.Clone(m3)
	other[5] ^= 0xff // inside sid_D
	for i := 0; i < 5; i++ {
		if _, _, err := r.resp.HandleMsg3(other, nil, nil); !errors.Is(err, ErrUnexpected) {
			t.Fatalf("foreign sids: %v", err)
		}
	}
	if _, ep, err := r.resp.HandleMsg3(m3, nil, nil); err != nil || ep == nil {
		t.Fatalf("genuine msg3 after foreign ones: %v", err)
	}
}

func TestImpersonationRefused(t *testing.T) {
	// msg3 signed by device B's key on device A's topic.
	r := newRig(t, Suite1)
	b := r.pki.leaf(t, "device", "dev-b")
	r.dev = r.initiator(t, r.device, b, Suite1)
	m1, _ := r.dev.Start()
	m2, _ := r.resp.HandleMsg1(m1)
	m3, err := r.dev.HandleMsg2(m2, nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := r.resp.HandleMsg3(m3, nil, nil); !errors.Is(err, ErrPeer) {
		t.Fatalf("device B's msg3 on A's topic: %v", err)
	}

	// msg2 signed by a device certificate instead of a gateway's.
	r = newRig(t, Suite1)
	impostor := r.pki.leaf(t, "device", "dev-c")
	cfg, _ := NewResponderConfig(ResponderConfig{Identity: impostor, VerifyDevice: r.pki.deviceVerifier(), Now: r.clk.Now})
	fake := NewResponder(cfg, r.device)
	m1, _ = r.dev.Start()
	m2, _ = fake.HandleMsg1(m1)
	if _, err := r.dev.HandleMsg2(m2, nil); !errors.Is(err, ErrPeer) {
		t.Fatalf("msg2 from a device certificate: %v", err)
	}
	// The genuine msg2 still wins afterwards.
	m2, _ = r.resp.HandleMsg1(m1)
	if _, err := r.dev.HandleMsg2(m2, nil); err != nil {
		t.Fatalf("genuine msg2 after a refused one: %v", err)
	}

	// A certificate from another CA.
	r = newRig(t, Suite1)
	stranger := strangerIdentity(t, "device", r.device)
	r.dev = r.initiator(t, r.device, stranger, Suite1)
	m1, _ = r.dev.Start()
	m2, _ = r.resp.HandleMsg1(m1)
	m3, _ = r.dev.HandleMsg2(m2, nil)
	if _, _, err := r.resp.HandleMsg3(m3, nil, nil); !errors.Is(err, ErrPeer) {
		t.Fatalf("device of another CA: %v", err)
	}
}

// strangerIdentity is a leaf with the right name from a different CA.
func strangerIdentity(t *testing.T, role, name string) Identity {
	return newTestPKI().leaf(t, role, name)
}

func TestSuiteDowngradeRefused(t *testing.T) {
	// The gateway allows only the hybrid suite; a suite-1 msg1 is refused.
	r := newRig(t, Suite1, Suite2)
	m1, _ := r.dev.Start()
	if _, err := r.resp.HandleMsg1(m1); !errors.Is(err, ErrSuite) {
		t.Fatalf("suite 1 at a suite-2 gateway: %v", err)
	}
	// A suite-2 device refuses a msg2 rewritten to suite 1.
	r = newRig(t, Suite2)
	m1, _ = r.dev.Start()
	m2, _ := r.resp.HandleMsg1(m1)
	down := bytes.Clone(m2)
	down[2] = byte(Suite1)
	if _, err := r.dev.HandleMsg2(down, nil); err == nil {
		t.Fatal("device accepted a msg2 rewritten to suite 1")
	}
	if _, err := r.dev.HandleMsg2(m2, nil); err != nil {
		t.Fatalf("genuine msg2: %v", err)
	}
}

func TestMsg4Rules(t *testing.T) {
	r := newRig(t, Suite1)
	m1, _ := r.dev.Start()
	m2, _ := r.resp.HandleMsg1(m1)
	m3, _ := r.dev.HandleMsg2(m2, nil)
	m4, gw, err := r.resp.HandleMsg3(m3, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := r.dev.HandleMsg4(m4[:len(m4)-1], nil); !errors.Is(err, ErrMsg4) {
		t.Fatalf("short msg4: %v", err)
	}
	// An envelope at seq 1 under the right kid, but not msg4.
	env, _ := gw.Send.Seal(KexChannel, nil)
	if _, err := r.dev.HandleMsg4(env, nil); !errors.Is(err, ErrMsg4) {
		t.Fatalf("msg4 at seq 1: %v", err)
	}
	flip := bytes.Clone(m4)
	flip[len(flip)-1] ^= 1
	if _, err := r.dev.HandleMsg4(flip, nil); !errors.Is(err, ErrAuth) {
		t.Fatalf("tampered msg4: %v", err)
	}
	// A new kid equal to a live one: start again.
	if _, err := r.dev.HandleMsg4(m4, func(KID) bool { return true }); !errors.Is(err, ErrKIDCollision) {
		t.Fatalf("kid collision: %v", err)
	}
	if r.dev.Waiting() {
		t.Fatal("initiator still pending after a kid collision")
	}
	// The gateway refuses msg3 too when the kid is live.
	m1, _ = r.dev.Start()
	m2, _ = r.resp.HandleMsg1(m1)
	m3, _ = r.dev.HandleMsg2(m2, nil)
	if _, _, err := r.resp.HandleMsg3(m3, nil, func(KID) bool { return true }); !errors.Is(err, ErrKIDCollision) {
		t.Fatalf("gateway kid collision: %v", err)
	}
}

func TestReferenceCredential(t *testing.T) {
	r := newRig(t, Suite1)
	r.devID.SendRef = true
	r.dev = r.initiator(t, r.device, r.devID, Suite1)
	m1, _ := r.dev.Start()
	m2, _ := r.resp.HandleMsg1(m1)
	m3, err := r.dev.HandleMsg2(m2, nil)
	if err != nil {
		t.Fatal(err)
	}
	// No mTLS leaf (behind a terminating proxy): refused.
	if _, _, err := r.resp.HandleMsg3(m3, nil, nil); !errors.Is(err, ErrPeer) {
		t.Fatalf("reference without a leaf: %v", err)
	}
	other := r.pki.leaf(t, "device", r.device)
	if _, _, err := r.resp.HandleMsg3(m3, other.Chain[0], nil); !errors.Is(err, ErrPeer) {
		t.Fatalf("reference to another leaf: %v", err)
	}
	if _, ep, err := r.resp.HandleMsg3(m3, r.devID.Chain[0], nil); err != nil || ep == nil {
		t.Fatalf("reference to the connection's leaf: %v", err)
	}
}

func TestHandshakeWipesSecrets(t *testing.T) {
	r := newRig(t, Suite1)
	m1, _ := r.dev.Start()
	m2, _ := r.resp.HandleMsg1(m1)
	hs := r.resp.pending.hs
	m3, _ := r.dev.HandleMsg2(m2, nil)
	if _, _, err := r.resp.HandleMsg3(m3, nil, nil); err != nil {
		t.Fatal(err)
	}
	for name, b := range map[string][]byte{"PRK": hs.prk, "fk_G": hs.fkG, "fk_D": hs.fkD} {
		if !bytes.Equal(b, make([]byte, len(b))) {
			t.Errorf("%s not wiped after the handshake", name)
		}
	}
}
