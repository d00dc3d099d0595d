package sessionkey

import (
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
)

// Credentials (FKX1.md, Credentials):
//
//	cred = 0x01 ‖ u16(count) ‖ lp(DER₁) ‖ … ‖ lp(DER_count)   the chain, leaf first, no root
//	cred = 0x00 ‖ H(leaf DER)                                  the mTLS leaf, by reference

// Credential types.
const (
	CredRef   = 0x00
	CredChain = 0x01
)

// Credential limits: 1 to 4 certificates, 8,192 bytes in all with headers.
const (
	maxCredCerts = 4
	maxCredBytes = 8192
)

// ErrCredential is wrapped by every credential refusal.
var ErrCredential = errors.New("fkx1: bad credential")

// Credential is a parsed credential: either a chain (DER certificates,
// leaf first) or the SHA-256 of a leaf the receiver already holds.
type Credential struct {
	Chain   [][]byte
	LeafRef [32]byte
	IsRef   bool
	// Raw is exactly the bytes parsed: what enters the transcript.
	Raw []byte
}

// AppendChain encodes a chain credential (leaf first, without the root).
func AppendChain(dst []byte, chain [][]byte) ([]byte, error) {
	if len(chain) < 1 || len(chain) > maxCredCerts {
		return nil, fmt.Errorf("%w: %d certificates; want 1 to %d", ErrCredential, len(chain), maxCredCerts)
	}
	start := len(dst)
	dst = append(dst, CredChain)
	dst = binary.BigEndian.AppendUint16(dst, uint16(len(chain)))
	for _, der := range chain {
		if len(der) == 0 || len(der) > 0xffff {
			return nil, fmt.Errorf("%w: certificate of %d bytes", ErrCredential, len(der))
		}
		dst = binary.BigEndian.AppendUint16(dst, uint16(len(der)))
		dst = append(dst, der...)
	}
	if len(dst)-start > maxCredBytes {
		return nil, fmt.Errorf("%w: chain of %d bytes; the limit is %d", ErrCredential, len(dst)-start, maxCredBytes)
	}
	return dst, nil
}

// AppendRef encodes a reference credential to leafDER.
func AppendRef(dst, leafDER []byte) []byte {
	h := sha256.Sum256(leafDER)
	return append(append(dst, CredRef), h[:]...)
}

// ParseCredential reads one credential from the front of b and returns it
// and the rest of b. The chain's limits are checked while its length
// prefixes are walked, so a hostile count or length costs nothing.
func ParseCredential(b []byte) (*Credential, []byte, error) {
	if len(b) < 1 {
		return nil, nil, fmt.Errorf("%w: empty", ErrCredential)
	}
	switch b[0] {
	case CredRef:
		if len(b) < 1+32 {
			return nil, nil, fmt.Errorf("%w: short reference", ErrCredential)
		}
		c := &Credential{IsRef: true, Raw: b[:33]}
		copy(c.LeafRef[:], b[1:33])
		return c, b[33:], nil
	case CredChain:
	default:
		return nil, nil, fmt.Errorf("%w: unknown type 0x%02x", ErrCredential, b[0])
	}
	if len(b) < 3 {
		return nil, nil, fmt.Errorf("%w: short chain header", ErrCredential)
	}
	count := int(binary.BigEndian.Uint16(b[1:3]))
	if count < 1 || count > maxCredCerts {
		return nil, nil, fmt.Errorf("%w: %d certificates; want 1 to %d", ErrCredential, count, maxCredCerts)
	}
	off := 3
	c := &Credential{}
	for i := 0; i < count; i++ {
		if off+2 > len(b) || off+2 > maxCredBytes {
			return nil, nil, fmt.Errorf("%w: truncated chain", ErrCredential)
		}
		n := int(binary.BigEndian.Uint16(b[off : off+2]))
		off += 2
		if n == 0 {
			return nil, nil, fmt.Errorf("%w: empty certificate", ErrCredential)
		}
		if off+n > maxCredBytes {
			return nil, nil, fmt.Errorf("%w: chain longer than %d bytes", ErrCredential, maxCredBytes)
		}
		if off+n > len(b) {
			return nil, nil, fmt.Errorf("%w: truncated certificate", ErrCredential)
		}
		c.Chain = append(c.Chain, b[off:off+n])
		off += n
	}
	c.Raw = b[:off]
	return c, b[off:], nil
}
