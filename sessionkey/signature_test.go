package sessionkey

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"errors"
	"testing"
)

func TestSignatures(t *testing.T) {
	t.Parallel()
	p256, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	p384, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	_, ed, _ := ed25519.GenerateKey(rand.Reader)
	th := make([]byte, 32)
	for _, c := range []struct {
		name string
		key  crypto.Signer
		size int
	}{{"ok/p256", p256, 64}, {"ok/p384", p384, 96}, {"ok/ed25519", ed, 64}} {
		t.Run(c.name, func(t *testing.T) {
			sig, err := Sign(c.key, nil, "fkx1 device sig", th)
			if err != nil || len(sig) != c.size {
				t.Fatalf("Sign: %d bytes, %v", len(sig), err)
			}
			if err := Verify(c.key.Public(), "fkx1 device sig", th, sig); err != nil {
				t.Fatal(err)
			}
			// Another context, another transcript, a flipped bit, a short
			// signature: all refused.
			if err := Verify(c.key.Public(), "fkx1 gateway sig", th, sig); !errors.Is(err, ErrSignature) {
				t.Fatalf("other context: %v", err)
			}
			other := append([]byte{1}, th[1:]...)
			if err := Verify(c.key.Public(), "fkx1 device sig", other, sig); !errors.Is(err, ErrSignature) {
				t.Fatalf("other transcript: %v", err)
			}
			bad := append([]byte(nil), sig...)
			bad[0] ^= 1
			if err := Verify(c.key.Public(), "fkx1 device sig", th, bad); !errors.Is(err, ErrSignature) {
				t.Fatalf("flipped bit: %v", err)
			}
			if err := Verify(c.key.Public(), "fkx1 device sig", th, sig[:len(sig)-1]); !errors.Is(err, ErrSignature) {
				t.Fatalf("short signature: %v", err)
			}
		})
	}
	p521, _ := ecdsa.GenerateKey(elliptic.P521(), rand.Reader)
	if _, err := Sign(p521, nil, "x", th); err == nil {
		t.Fatal("signed with P-521")
	}
}
