package sessionkey

import (
	"crypto/cipher"
	"crypto/hkdf"
	"crypto/sha256"
	"encoding/binary"
	"fmt"

	"golang.org/x/crypto/chacha20poly1305"
)

// labelPrefix starts every HKDF label (FKX1.md, Notation).
const labelPrefix = "fkx1 "

// expandLabel is L(secret, label, context, n) of FKX1.md: HKDF-Expand with
// the HkdfLabel of TLS 1.3 under the prefix "fkx1 ":
//
//	info = u16(n) ‖ u8(len(l)) ‖ l ‖ u8(len(context)) ‖ context,  l = "fkx1 " ‖ label
func expandLabel(secret []byte, label string, context []byte, n int) []byte {
	l := labelPrefix + label
	if len(l) > 255 || len(context) > 255 || n > 0xffff {
		panic(fmt.Sprintf("fkx1: label %q or context too long", label)) // fixed inputs only
	}
	info := make([]byte, 0, 4+len(l)+len(context))
	info = binary.BigEndian.AppendUint16(info, uint16(n))
	info = append(info, byte(len(l)))
	info = append(info, l...)
	info = append(info, byte(len(context)))
	info = append(info, context...)
	out, err := hkdf.Expand(sha256.New, secret, string(info), n)
	if err != nil {
		panic("fkx1: " + err.Error()) // n is at most 32 here; HKDF allows 8160
	}
	return out
}

// Direction names a traffic direction: device to gateway, or back.
type Direction string

// The two directions of traffic keys.
const (
	D2G Direction = "d2g"
	G2D Direction = "g2d"
)

// generation is one generation g of a direction's keys.
type generation struct {
	g    uint32
	key  []byte // 32 bytes, ChaCha20-Poly1305
	iv   [12]byte
	aead cipher.AEAD // made once per generation; holds its own copy of key
}

// trafficSecret0 is TS[x,0] = L(MS, x, "", 32).
func trafficSecret0(ms []byte, x Direction) []byte {
	return expandLabel(ms, string(x), nil, 32)
}

// nextSecret is TS[x,g+1] = L(TS[x,g], "upd", "", 32).
func nextSecret(ts []byte) []byte { return expandLabel(ts, "upd", nil, 32) }

// keysOf derives key[x,g] and iv[x,g] from TS[x,g].
func keysOf(ts []byte, g uint32) generation {
	gen := generation{g: g, key: expandLabel(ts, "key", nil, 32)}
	copy(gen.iv[:], expandLabel(ts, "iv", nil, 12))
	gen.aead, _ = chacha20poly1305.New(gen.key) // a 32-byte key never fails
	return gen
}

// wipe zeroes secret bytes once they have served.
func wipe(b ...[]byte) {
	for _, x := range b {
		clear(x)
	}
}

// wipe zeroes the key and iv and drops the AEAD. x/crypto's AEAD keeps a
// copy of the key that cannot be zeroed from outside; dropping it leaves
// that copy to the garbage collector, one per generation.
func (g *generation) wipe() {
	clear(g.key)
	clear(g.iv[:])
	g.aead = nil
}
