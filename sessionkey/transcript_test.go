package sessionkey

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"testing"
)

// TestTranscriptFlow runs the derivation of FKX1.md end to end over fixed
// message bytes, as both sides would, and checks that the sides agree,
// that every input matters, and that the traffic keys work.
func TestTranscriptFlow(t *testing.T) {
	t.Parallel()
	gw, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	dev, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	ikm := bytes.Repeat([]byte{7}, 32)
	msg1, msg2s, msg3s := []byte("msg1"), []byte("msg2*"), []byte("msg3*")

	th1 := TH1("sensor-1", msg1)
	th2 := TH2(th1, msg2s)
	hs, err := deriveHandshake(th2, ikm)
	if err != nil {
		t.Fatal(err)
	}
	sigG, err := Sign(gw, nil, ContextGateway, th2)
	if err != nil {
		t.Fatal(err)
	}
	finG := finish(hs.fkG, th2, sigG)
	// The device checks fin_G, then sig_G.
	if !checkFinish(hs.fkG, th2, sigG, finG) || Verify(gw.Public(), ContextGateway, th2, sigG) != nil {
		t.Fatal("device refuses a good msg2")
	}
	if checkFinish(hs.fkD, th2, sigG, finG) {
		t.Fatal("fin_G verifies under the device's finish key")
	}
	th3 := TH3(th2, sigG, finG, msg3s)
	sigD, _ := Sign(dev, nil, ContextDevice, th3)
	finD := finish(hs.fkD, th3, sigD)
	if !checkFinish(hs.fkD, th3, sigD, finD) || Verify(dev.Public(), ContextDevice, th3, sigD) != nil {
		t.Fatal("gateway refuses a good msg3")
	}
	th4 := TH4(th3, sigD, finD)
	ms, kid := masterSecret(hs.prk, th4)
	hs.wipe()
	if len(ms) != 32 || kid == (KID{}) {
		t.Fatalf("master secret %x, kid %x", ms, kid)
	}
	// Every input changes the transcript.
	for name, other := range map[string][]byte{
		"device id": TH1("sensor-2", msg1),
		"msg1":      TH1("sensor-1", []byte("msg1'")),
	} {
		if bytes.Equal(other, th1) {
			t.Fatalf("TH1 ignores the %s", name)
		}
	}
	// lp keeps "ab"+"c" and "a"+"bc" apart.
	if bytes.Equal(TH1("ab", []byte("c")), TH1("a", []byte("bc"))) {
		t.Fatal("TH1 is ambiguous")
	}
	// The traffic keys of this epoch work.
	env, err := NewSender(ms, kid, D2G, "sensor-1", 0).Seal("telemetry", []byte("21.5"))
	if err != nil {
		t.Fatal(err)
	}
	if pt, err := NewReceiver(ms, kid, D2G, "sensor-1").Open(env, "telemetry"); err != nil || string(pt) != "21.5" {
		t.Fatalf("envelope under the derived keys: %q %v", pt, err)
	}
}
