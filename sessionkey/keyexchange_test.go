package sessionkey

import (
	"bytes"
	"crypto/mlkem"
	"errors"
	"testing"
)

func TestKeyExchange(t *testing.T) {
	t.Parallel()
	for _, suite := range []Suite{Suite1, Suite2} {
		dev, shareD, err := NewDeviceKeyShare(suite, nil)
		if err != nil {
			t.Fatal(err)
		}
		d, g, _ := shareSizes(suite)
		if len(shareD) != d {
			t.Fatalf("suite %d: share_D of %d bytes", suite, len(shareD))
		}
		shareG, ikmG, err := GatewayKeyShare(suite, shareD, nil)
		if err != nil || len(shareG) != g {
			t.Fatalf("suite %d: share_G of %d bytes, %v", suite, len(shareG), err)
		}
		ikmD, err := dev.Finish(shareG)
		if err != nil || !bytes.Equal(ikmD, ikmG) {
			t.Fatalf("suite %d: the sides disagree: %v", suite, err)
		}
		wantIKM := 32
		if suite == Suite2 {
			wantIKM = 64
		}
		if len(ikmD) != wantIKM {
			t.Fatalf("suite %d: IKM of %d bytes", suite, len(ikmD))
		}
		// A low-order X25519 point (all zeros) is refused by both sides.
		zeroG := append(append([]byte(nil), shareG[:len(shareG)-32]...), make([]byte, 32)...)
		if _, err := dev.Finish(zeroG); !errors.Is(err, ErrKeyShare) {
			t.Fatalf("suite %d: zero X25519 share from the gateway: %v", suite, err)
		}
		zeroD := append(append([]byte(nil), shareD[:len(shareD)-32]...), make([]byte, 32)...)
		if _, _, err := GatewayKeyShare(suite, zeroD, nil); !errors.Is(err, ErrKeyShare) {
			t.Fatalf("suite %d: zero X25519 share from the device: %v", suite, err)
		}
		if _, _, err := GatewayKeyShare(suite, shareD[1:], nil); !errors.Is(err, ErrKeyShare) {
			t.Fatalf("suite %d: short share accepted", suite)
		}
	}
	// An ML-KEM encapsulation key that fails validation (a coefficient out
	// of range) is refused.
	_, shareD, _ := NewDeviceKeyShare(Suite2, nil)
	bad := append([]byte(nil), shareD...)
	for i := 0; i < mlkem.EncapsulationKeySize768-32; i++ {
		bad[i] = 0xff
	}
	if _, _, err := GatewayKeyShare(Suite2, bad, nil); !errors.Is(err, ErrKeyShare) {
		t.Fatalf("invalid encapsulation key: %v", err)
	}
}
