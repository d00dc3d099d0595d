package sessionkey

import (
	"bytes"
	"errors"
	"testing"
)

var (
	testMS  = bytes.Repeat([]byte{0x42}, 32)
	testKID = KID{1, 2, 3, 4}
)

func pair(t *testing.T) (*Sender, *Receiver) {
	t.Helper()
	return NewSender(testMS, testKID, D2G, "sensor-1", 0), NewReceiver(testMS, testKID, D2G, "sensor-1")
}

func seal(t *testing.T, s *Sender, ch string, pt []byte) []byte {
	t.Helper()
	env, err := s.Seal(ch, pt)
	if err != nil {
		t.Fatal(err)
	}
	return env
}

func TestRoundTripAndOverhead(t *testing.T) {
	t.Parallel()
	s, r := pair(t)
	for i := 0; i < 200; i++ {
		pt := bytes.Repeat([]byte{byte(i)}, i)
		env := seal(t, s, "telemetry", pt)
		over := len(env) - len(pt)
		want := 22
		if i >= 128 {
			want = 23
		}
		if over != want {
			t.Fatalf("seq %d: overhead %d, want %d", i, over, want)
		}
		got, err := r.Open(env, "telemetry")
		if err != nil || !bytes.Equal(got, pt) {
			t.Fatalf("seq %d: %v", i, err)
		}
	}
}

func TestRefusalsLeaveStateUnchanged(t *testing.T) {
	t.Parallel()
	s, r := pair(t)
	first := seal(t, s, "telemetry", []byte("a"))
	second := seal(t, s, "telemetry", []byte("b"))
	if _, err := r.Open(second, "telemetry"); err != nil {
		t.Fatal(err)
	}
	tampered := append([]byte(nil), first...)
	tampered[len(tampered)-1] ^= 1
	nonMinimal := append([]byte{1, 1, 2, 3, 4, 0x80, 0x00}, make([]byte, 16)...)
	bigSeq := append([]byte{1, 1, 2, 3, 4, 0x80, 0x80, 0x80, 0x80, 0x10}, make([]byte, 16)...)
	otherKID := append([]byte(nil), first...)
	otherKID[1] ^= 0xff
	cases := []struct {
		name    string
		env     []byte
		channel string
		want    error
	}{
		{"fail/replay", second, "telemetry", ErrReplay},
		{"fail/tampered", tampered, "telemetry", ErrAuth},
		{"fail/other-channel", first, "status", ErrAuth},
		{"fail/non-minimal-uvarint", nonMinimal, "telemetry", ErrMalformed},
		{"fail/seq-2^32", bigSeq, "telemetry", ErrMalformed},
		{"fail/short", first[:20], "telemetry", ErrMalformed},
		{"fail/version", append([]byte{2}, first[1:]...), "telemetry", ErrMalformed},
		{"fail/other-kid", otherKID, "telemetry", ErrUnknownKID},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			before := r.Highest()
			if _, err := r.Open(c.env, c.channel); !errors.Is(err, c.want) {
				t.Fatalf("Open = %v, want %v", err, c.want)
			}
			if r.Highest() != before {
				t.Fatal("a refused envelope moved the window")
			}
		})
	}
	// The untouched first envelope still opens: out of order, inside the window.
	if got, err := r.Open(first, "telemetry"); err != nil || string(got) != "a" {
		t.Fatalf("out-of-order open: %q %v", got, err)
	}
	if _, err := r.Open(first, "telemetry"); !errors.Is(err, ErrReplay) {
		t.Fatalf("second open of the same envelope: %v", err)
	}
}

func TestWindow(t *testing.T) {
	t.Parallel()
	s, r := pair(t)
	var envs [][]byte
	for i := 0; i < 1100; i++ {
		envs = append(envs, seal(t, s, "t", nil))
	}
	if _, err := r.Open(envs[1099], "t"); err != nil {
		t.Fatal(err)
	}
	// seq ≤ S − 1024 is too old; S − 1023 is still inside.
	if _, err := r.Open(envs[1099-1024], "t"); !errors.Is(err, ErrTooOld) {
		t.Fatalf("seq S-1024: %v", err)
	}
	if _, err := r.Open(envs[1099-1023], "t"); err != nil {
		t.Fatalf("seq S-1023: %v", err)
	}
	if _, err := r.Open(envs[1099-1023], "t"); !errors.Is(err, ErrReplay) {
		t.Fatalf("replay inside the window: %v", err)
	}
}

func TestGenerations(t *testing.T) {
	t.Parallel()
	s, r := pair(t)
	last := seal(t, s, "t", []byte("g0"))
	if err := s.Jump(); err != nil {
		t.Fatal(err)
	}
	if s.Seq() != 1<<16 {
		t.Fatalf("seq after a jump: %d", s.Seq())
	}
	g1 := seal(t, s, "t", []byte("g1"))
	// The receiver derives forward, and still opens the older generation.
	if got, err := r.Open(g1, "t"); err != nil || string(got) != "g1" {
		t.Fatalf("generation 1: %q %v", got, err)
	}
	if _, err := r.Open(last, "t"); !errors.Is(err, ErrTooOld) {
		// seq 0 is more than 1024 below S = 65536: outside the window.
		t.Fatalf("generation 0 after 1: %v", err)
	}
	// Four generations ahead is accepted, five is too far.
	r2 := NewReceiver(testMS, testKID, D2G, "sensor-1")
	s3 := NewSender(testMS, testKID, D2G, "sensor-1", 0)
	e0 := seal(t, s3, "t", nil)
	if _, err := r2.Open(e0, "t"); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 5; i++ {
		_ = s3.Jump()
	}
	if _, err := s3.Seal("t", nil); !errors.Is(err, ErrNeedEpoch) {
		t.Fatalf("sender jumping 5 generations past its last envelope: %v", err)
	}
	// A sender refuses to start more than 4 generations up; one that sent
	// at generation 4 may step to 5, which this receiver must refuse.
	if _, err := NewSender(testMS, testKID, D2G, "sensor-1", 5<<16).Seal("t", nil); !errors.Is(err, ErrNeedEpoch) {
		t.Fatalf("a first envelope 5 generations up: %v", err)
	}
	far := NewSender(testMS, testKID, D2G, "sensor-1", 4<<16)
	seal(t, far, "t", nil)
	if err := far.Jump(); err != nil {
		t.Fatal(err)
	}
	if _, err := r2.Open(seal(t, far, "t", nil), "t"); !errors.Is(err, ErrTooFarAhead) {
		t.Fatalf("5 generations ahead: %v", err)
	}
	near := NewSender(testMS, testKID, D2G, "sensor-1", 4<<16)
	if _, err := r2.Open(seal(t, near, "t", nil), "t"); err != nil {
		t.Fatalf("4 generations ahead: %v", err)
	}
}

func TestDirectionsAndDevicesDiffer(t *testing.T) {
	t.Parallel()
	env := seal(t, NewSender(testMS, testKID, D2G, "sensor-1", 0), "t", []byte("x"))
	if _, err := NewReceiver(testMS, testKID, G2D, "sensor-1").Open(env, "t"); !errors.Is(err, ErrAuth) {
		t.Fatalf("d2g envelope opened as g2d: %v", err)
	}
	if _, err := NewReceiver(testMS, testKID, D2G, "sensor-2").Open(env, "t"); !errors.Is(err, ErrAuth) {
		t.Fatalf("envelope of sensor-1 opened for sensor-2: %v", err)
	}
}

func FuzzOpen(f *testing.F) {
	s := NewSender(testMS, testKID, D2G, "sensor-1", 0)
	for i := 0; i < 3; i++ {
		env, _ := s.Seal("t", []byte("seed"))
		f.Add(env)
	}
	f.Add([]byte{1, 1, 2, 3, 4, 0x80, 0x00})
	f.Fuzz(func(t *testing.T, env []byte) {
		r := NewReceiver(testMS, testKID, D2G, "sensor-1")
		before := r.Highest()
		pt, err := r.Open(env, "t")
		if err != nil {
			if r.Highest() != before {
				t.Fatal("a refused envelope moved the window")
			}
			return
		}
		if pt == nil && len(env) > 22 {
			t.Fatal("opened without plaintext")
		}
	})
}
