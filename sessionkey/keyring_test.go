package sessionkey

import (
	"bytes"
	"errors"
	"testing"
	"time"
)

// pairOfRings runs one handshake and adds the epochs to a device ring
// and a gateway ring that share the rig's clock.
func pairOfRings(t *testing.T, r *rig) (dev, gw *Keyring) {
	dev = NewKeyring(false, Rotation{}, r.clk.Now)
	gw = NewKeyring(true, Rotation{}, r.clk.Now)
	rekey(t, r, dev, gw)
	return dev, gw
}

func rekey(t *testing.T, r *rig, dev, gw *Keyring) (de, ge *Epoch) {
	t.Helper()
	m1, _ := r.dev.Start()
	m2, err := r.resp.HandleMsg1(m1)
	if err != nil {
		t.Fatal(err)
	}
	m3, err := r.dev.HandleMsg2(m2, nil)
	if err != nil {
		t.Fatal(err)
	}
	m4, ge, err := r.resp.HandleMsg3(m3, nil, gw.Live)
	if err != nil {
		t.Fatal(err)
	}
	gw.Add(ge)
	de, err = r.dev.HandleMsg4(m4, dev.Live)
	if err != nil {
		t.Fatal(err)
	}
	dev.Add(de)
	return de, ge
}

func TestRotationUnderTestClock(t *testing.T) {
	r := newRig(t, Suite1)
	dev, gw := pairOfRings(t, r)
	send := func(ch, body string) KID {
		t.Helper()
		env, kid, err := dev.Seal(ch, []byte(body))
		if err != nil {
			t.Fatal(err)
		}
		pt, got, err := gw.Open(env, ch)
		if err != nil || string(pt) != body || got != kid {
			t.Fatalf("d2g %q: %q %v", body, pt, err)
		}
		return kid
	}
	first := send("telemetry", "a")

	// The gateway has no confirmed epoch until the first d2g; now it has.
	if _, kid, err := gw.Seal("cmd", []byte("x")); err != nil || kid != first {
		t.Fatalf("g2d under the confirmed epoch: %v", err)
	}

	// Generations roll over with time alone.
	r.clk.Advance(10 * time.Minute)
	if due := dev.Tick(); due {
		t.Fatal("epoch due after 10 minutes")
	}
	gw.Tick()
	env, _, _ := dev.Seal("telemetry", []byte("b"))
	if _, seq, _, _ := ParseHeader(env); seq != 1<<16 {
		t.Fatalf("seq after the time ratchet: %d", seq)
	}
	if pt, _, err := gw.Open(env, "telemetry"); err != nil || string(pt) != "b" {
		t.Fatalf("open across a generation: %v", err)
	}
	old, _, _ := dev.Seal("telemetry", []byte("under the old epoch"))

	// An epoch is due after an hour; a new handshake replaces it.
	r.clk.Advance(51 * time.Minute)
	if !dev.Tick() || !gw.Tick() {
		t.Fatal("no epoch due after an hour")
	}
	de, _ := rekey(t, r, dev, gw)
	if de.KID == first {
		t.Fatal("new epoch has the old kid")
	}
	// Cut-over: the gateway keeps sending under the old kid until the
	// first d2g under the new one.
	if _, kid, _ := gw.Seal("cmd", nil); kid != first {
		t.Fatal("gateway sent under the new kid before the device used it")
	}
	if kid := send("telemetry", "c"); kid != de.KID {
		t.Fatal("device did not move to the new kid")
	}
	if _, kid, _ := gw.Seal("cmd", nil); kid != de.KID {
		t.Fatal("gateway did not move to the new kid")
	}
	// The old kid stays live for 60 s, then it is gone from both sides.
	if pt, _, err := gw.Open(old, "telemetry"); err != nil || string(pt) != "under the old epoch" {
		t.Fatalf("old kid inside its grace period: %v", err)
	}
	var oldGw *liveEpoch
	for _, e := range gw.epochs {
		if e.KID == first {
			oldGw = e
		}
	}
	r.clk.Advance(61 * time.Second)
	dev.Tick()
	gw.Tick()
	for _, k := range []*Keyring{dev, gw} {
		if k.Live(first) || len(k.KIDs()) != 1 {
			t.Fatalf("old kid still live: %x", k.KIDs())
		}
	}
	if !bytes.Equal(oldGw.Recv.cur.key, make([]byte, 32)) || !bytes.Equal(oldGw.Send.cur.key, make([]byte, 32)) {
		t.Fatal("retired epoch's keys were not wiped")
	}
	if _, _, err := gw.Open(old, "telemetry"); !errors.Is(err, ErrUnknownKID) {
		t.Fatalf("envelope under a retired kid: %v", err)
	}
}

func TestAtMostThreeLiveKIDs(t *testing.T) {
	r := newRig(t, Suite1)
	dev, gw := pairOfRings(t, r)
	first, _, _ := dev.Newest()
	for i := 0; i < 3; i++ {
		rekey(t, r, dev, gw)
	}
	for _, k := range []*Keyring{dev, gw} {
		if n := len(k.KIDs()); n != 3 {
			t.Fatalf("%d live kids", n)
		}
		if k.Live(first) {
			t.Fatal("the oldest kid survived a fourth epoch")
		}
	}
}

func TestEpochDueAtSeqLimit(t *testing.T) {
	r := newRig(t, Suite1)
	dev := NewKeyring(false, Rotation{EpochAtSeq: 3}, r.clk.Now)
	gw := NewKeyring(true, Rotation{}, r.clk.Now)
	rekey(t, r, dev, gw)
	for i := 0; i < 3; i++ {
		if dev.Tick() {
			t.Fatalf("epoch due after %d envelopes", i)
		}
		if _, _, err := dev.Seal("t", nil); err != nil {
			t.Fatal(err)
		}
	}
	if !dev.Tick() {
		t.Fatal("no epoch due at the seq limit")
	}
}

func TestKeyringRefusals(t *testing.T) {
	r := newRig(t, Suite1)
	dev, gw := pairOfRings(t, r)
	if _, _, err := NewKeyring(true, Rotation{}, nil).Seal("c", nil); !errors.Is(err, ErrNoSendKey) {
		t.Fatalf("empty ring: %v", err)
	}
	env, _, _ := dev.Seal("telemetry", []byte("x"))
	if _, _, err := gw.Open(env, "other"); !errors.Is(err, ErrAuth) {
		t.Fatalf("wrong channel: %v", err)
	}
	if _, _, err := gw.Open(env[:len(env)-1], "telemetry"); !errors.Is(err, ErrAuth) {
		t.Fatalf("truncated: %v", err)
	}
	if _, _, err := gw.Open(env[:5], "telemetry"); !errors.Is(err, ErrMalformed) {
		t.Fatalf("header only: %v", err)
	}
	if _, _, err := gw.Open(env, "telemetry"); err != nil {
		t.Fatal(err)
	}
	if _, _, err := gw.Open(env, "telemetry"); !errors.Is(err, ErrReplay) {
		t.Fatalf("replay: %v", err)
	}

	// Another device's envelope (same kid bytes cannot be forced, so the
	// kid is unknown here).
	r2 := newRig(t, Suite1)
	other, _ := pairOfRings(t, r2)
	env2, _, _ := other.Seal("telemetry", []byte("y"))
	if _, _, err := gw.Open(env2, "telemetry"); !errors.Is(err, ErrUnknownKID) {
		t.Fatalf("another device's envelope: %v", err)
	}

	// OpenPending does not mark: the same envelope opens until Mark.
	env3, _, _ := dev.Seal("telemetry", []byte("z"))
	_, kid, seq, err := gw.OpenPending(env3, "telemetry")
	if err != nil {
		t.Fatal(err)
	}
	if _, _, _, err := gw.OpenPending(env3, "telemetry"); err != nil {
		t.Fatalf("unmarked envelope opened again: %v", err)
	}
	gw.Mark(kid, seq)
	if _, _, _, err := gw.OpenPending(env3, "telemetry"); !errors.Is(err, ErrReplay) {
		t.Fatalf("marked envelope: %v", err)
	}
}

// An idle sender's time ratchet must not outrun the receiver's window
// before the first envelope: after 5 jumps with nothing sent, the sender
// asks for a new epoch rather than seal what the receiver would refuse.
func TestIdleJumpsBeforeFirstEnvelope(t *testing.T) {
	r := newRig(t, Suite1)
	dev, gw := pairOfRings(t, r)
	for i := 0; i < 4; i++ {
		r.clk.Advance(10 * time.Minute)
		dev.Tick()
	}
	env, _, err := dev.Seal("telemetry", []byte("after 4 idle jumps"))
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := gw.Open(env, "telemetry"); err != nil {
		t.Fatalf("4 generations ahead: %v", err)
	}
	r2 := newRig(t, Suite1)
	dev2, _ := pairOfRings(t, r2)
	for i := 0; i < 5; i++ {
		r2.clk.Advance(10 * time.Minute)
		if due := dev2.Tick(); due != (i == 4) {
			t.Fatalf("after %d idle jumps, epoch due = %v", i+1, due)
		}
	}
	if _, _, err := dev2.Seal("telemetry", nil); !errors.Is(err, ErrNeedEpoch) {
		t.Fatalf("5 idle jumps: %v; want ErrNeedEpoch", err)
	}
}
