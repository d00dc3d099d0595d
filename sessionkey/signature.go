package sessionkey

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/sha512"
	"encoding/asn1"
	"errors"
	"fmt"
	"io"
	"math/big"
)

// Signatures (FKX1.md, Signatures) follow the signer's certificate key:
//
//	ECDSA P-256   SHA-256 of m   r ‖ s, 32 B each, big-endian, left-padded
//	ECDSA P-384   SHA-384 of m   r ‖ s, 48 B each
//	Ed25519       m itself       64 B
//
// m is the context string ‖ 0x00 ‖ the transcript hash.

// ErrSignature is wrapped by every signature refusal.
var ErrSignature = errors.New("fkx1: bad signature")

// signedMessage is m = context ‖ 0x00 ‖ th.
func signedMessage(context string, th []byte) []byte {
	m := make([]byte, 0, len(context)+1+len(th))
	m = append(append(append(m, context...), 0), th...)
	return m
}

// Sign signs context ‖ 0x00 ‖ th with signer (a software key, or a TPM
// through crypto.Signer) in the fixed-size encoding of its key type.
func Sign(signer crypto.Signer, rnd io.Reader, context string, th []byte) ([]byte, error) {
	if rnd == nil {
		rnd = rand.Reader
	}
	m := signedMessage(context, th)
	switch pub := signer.Public().(type) {
	case *ecdsa.PublicKey:
		size, digest, opts := ecdsaParams(pub.Curve, m)
		if size == 0 {
			return nil, fmt.Errorf("fkx1: unsupported curve %s", pub.Curve.Params().Name)
		}
		der, err := signer.Sign(rnd, digest, opts)
		if err != nil {
			return nil, fmt.Errorf("fkx1: signing: %w", err)
		}
		var rs struct{ R, S *big.Int }
		if rest, err := asn1.Unmarshal(der, &rs); err != nil || len(rest) > 0 {
			return nil, fmt.Errorf("fkx1: signer returned a malformed ECDSA signature")
		}
		out := make([]byte, 2*size)
		rs.R.FillBytes(out[:size])
		rs.S.FillBytes(out[size:])
		return out, nil
	case ed25519.PublicKey:
		sig, err := signer.Sign(rnd, m, crypto.Hash(0))
		if err != nil {
			return nil, fmt.Errorf("fkx1: signing: %w", err)
		}
		return sig, nil
	}
	return nil, fmt.Errorf("fkx1: unsupported signing key %T", signer.Public())
}

// Verify checks a signature made by Sign.
func Verify(pub crypto.PublicKey, context string, th, sig []byte) error {
	m := signedMessage(context, th)
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		size, digest, _ := ecdsaParams(k.Curve, m)
		if size == 0 || len(sig) != 2*size {
			return fmt.Errorf("%w: %d bytes for %s", ErrSignature, len(sig), k.Curve.Params().Name)
		}
		r, s := new(big.Int).SetBytes(sig[:size]), new(big.Int).SetBytes(sig[size:])
		if !ecdsa.Verify(k, digest, r, s) {
			return ErrSignature
		}
		return nil
	case ed25519.PublicKey:
		if len(sig) != ed25519.SignatureSize || !ed25519.Verify(k, m, sig) {
			return ErrSignature
		}
		return nil
	}
	return fmt.Errorf("%w: unsupported key %T", ErrSignature, pub)
}

func ecdsaParams(c elliptic.Curve, m []byte) (int, []byte, crypto.SignerOpts) {
	switch c {
	case elliptic.P256():
		d := sha256.Sum256(m)
		return 32, d[:], crypto.SHA256
	case elliptic.P384():
		d := sha512.Sum384(m)
		return 48, d[:], crypto.SHA384
	}
	return 0, nil, nil
}
