package sessionkey

import (
	"crypto/ecdh"
	"crypto/mlkem"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
)

// Key exchange (FKX1.md, Suites):
//
//	suite 1: share = X25519 public key (32 B) both ways; IKM = X25519 output
//	suite 2: share_D = ML-KEM-768 encapsulation key (1184 B) ‖ X25519 public (32 B)
//	         share_G = ML-KEM-768 ciphertext (1088 B) ‖ X25519 public (32 B)
//	         IKM = ML-KEM shared secret (32 B) ‖ X25519 output (32 B)
//
// Each side refuses an all-zero X25519 output (crypto/ecdh does), and an
// encapsulation key that fails ML-KEM's validation is refused.

// ErrKeyShare is wrapped by every refused key share.
var ErrKeyShare = errors.New("fkx1: bad key share")

// DeviceKeyShare is the device's ephemeral key exchange state, kept from
// msg1 until msg2 is processed.
type DeviceKeyShare struct {
	suite Suite
	x     *ecdh.PrivateKey
	kem   *mlkem.DecapsulationKey768
}

// NewDeviceKeyShare makes fresh ephemeral keys for suite from rnd
// (crypto/rand if nil) and returns them with share_D.
func NewDeviceKeyShare(suite Suite, rnd io.Reader) (*DeviceKeyShare, []byte, error) {
	if rnd == nil {
		rnd = rand.Reader
	}
	x, err := newX25519(rnd)
	if err != nil {
		return nil, nil, err
	}
	ks := &DeviceKeyShare{suite: suite, x: x}
	switch suite {
	case Suite1:
		return ks, x.PublicKey().Bytes(), nil
	case Suite2:
		seed := make([]byte, mlkem.SeedSize)
		if _, err := io.ReadFull(rnd, seed); err != nil {
			return nil, nil, err
		}
		defer wipe(seed)
		if ks.kem, err = mlkem.NewDecapsulationKey768(seed); err != nil {
			return nil, nil, err
		}
		return ks, append(ks.kem.EncapsulationKey().Bytes(), x.PublicKey().Bytes()...), nil
	}
	return nil, nil, fmt.Errorf("%w: unknown suite %d", ErrKeyShare, suite)
}

func newX25519(rnd io.Reader) (*ecdh.PrivateKey, error) {
	b := make([]byte, 32)
	if _, err := io.ReadFull(rnd, b); err != nil {
		return nil, err
	}
	defer wipe(b)
	return ecdh.X25519().NewPrivateKey(b)
}

// Finish computes the IKM from the gateway's share_G.
func (ks *DeviceKeyShare) Finish(shareG []byte) ([]byte, error) {
	_, g, _ := shareSizes(ks.suite)
	if len(shareG) != g {
		return nil, fmt.Errorf("%w: share of %d bytes", ErrKeyShare, len(shareG))
	}
	xShare := shareG[len(shareG)-32:]
	xOut, err := x25519(ks.x, xShare)
	if err != nil {
		return nil, err
	}
	if ks.suite == Suite1 {
		return xOut, nil
	}
	ss, err := ks.kem.Decapsulate(shareG[:mlkem.CiphertextSize768])
	if err != nil {
		wipe(xOut)
		return nil, fmt.Errorf("%w: %v", ErrKeyShare, err)
	}
	ikm := append(ss, xOut...)
	wipe(xOut)
	return ikm, nil
}

// GatewayKeyShare answers a device's share_D: it returns share_G and the
// IKM. rnd supplies the X25519 key (crypto/rand if nil).
func GatewayKeyShare(suite Suite, shareD []byte, rnd io.Reader) (shareG, ikm []byte, err error) {
	if rnd == nil {
		rnd = rand.Reader
	}
	d, _, ok := shareSizes(suite)
	if !ok || len(shareD) != d {
		return nil, nil, fmt.Errorf("%w: share of %d bytes for suite %d", ErrKeyShare, len(shareD), suite)
	}
	x, err := newX25519(rnd)
	if err != nil {
		return nil, nil, err
	}
	xOut, err := x25519(x, shareD[len(shareD)-32:])
	if err != nil {
		return nil, nil, err
	}
	if suite == Suite1 {
		return x.PublicKey().Bytes(), xOut, nil
	}
	ek, err := mlkem.NewEncapsulationKey768(shareD[:mlkem.EncapsulationKeySize768])
	if err != nil {
		wipe(xOut)
		return nil, nil, fmt.Errorf("%w: ML-KEM encapsulation key: %v", ErrKeyShare, err)
	}
	ss, ct := ek.Encapsulate()
	ikm = append(ss, xOut...)
	wipe(xOut)
	return append(ct, x.PublicKey().Bytes()...), ikm, nil
}

func x25519(priv *ecdh.PrivateKey, peer []byte) ([]byte, error) {
	pub, err := ecdh.X25519().NewPublicKey(peer)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrKeyShare, err)
	}
	out, err := priv.ECDH(pub) // refuses an all-zero output (a low-order point)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrKeyShare, err)
	}
	return out, nil
}
