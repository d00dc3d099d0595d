package sessionkey

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// Handshake messages (FKX1.md, Handshake):
//
//	msg1 = 0x01 ‖ 0x01 ‖ suite ‖ sid_D(8) ‖ share_D
//	msg2 = 0x01 ‖ 0x02 ‖ suite ‖ sid_D(8) ‖ sid_G(8) ‖ share_G ‖ cred_G ‖ lp(sig_G) ‖ fin_G(16)
//	msg3 = 0x01 ‖ 0x03 ‖ suite ‖ sid_D(8) ‖ sid_G(8) ‖ cred_D ‖ lp(sig_D) ‖ fin_D(16)
//	hint = 0x01 ‖ 0x10 ‖ kid(4)
//
// Every size follows from the suite and the credential, so trailing bytes
// are refused; a message over 16 KiB is refused before it is parsed.

// Suite is an fkx1 cipher suite.
type Suite byte

// The suites.
const (
	Suite1 Suite = 0x01 // X25519, ChaCha20-Poly1305
	Suite2 Suite = 0x02 // X25519MLKEM768 hybrid, ChaCha20-Poly1305
)

// Message types.
const (
	typeMsg1 = 0x01
	typeMsg2 = 0x02
	typeMsg3 = 0x03
	typeHint = 0x10
)

const (
	protocolVersion = 0x01
	// MaxKexMessage bounds a kex message before it is parsed.
	MaxKexMessage = 16 << 10
	sidSize       = 8
	// maxSigSize is the largest signature of the table (ECDSA P-384).
	maxSigSize = 96
)

// ErrMessage is wrapped by every refusal of a malformed kex message.
var ErrMessage = errors.New("fkx1: malformed handshake message")

// shareSizes returns the sizes of share_D and share_G for a suite.
func shareSizes(s Suite) (d, g int, ok bool) {
	switch s {
	case Suite1:
		return 32, 32, true
	case Suite2:
		return 1184 + 32, 1088 + 32, true
	}
	return 0, 0, false
}

// SID is a handshake's 8-byte session id.
type SID [sidSize]byte

// Msg1 opens a handshake (device to gateway).
type Msg1 struct {
	Suite Suite
	SidD  SID
	Share []byte
}

// Msg2 answers it (gateway to device).
type Msg2 struct {
	Suite      Suite
	SidD, SidG SID
	Share      []byte
	Cred       *Credential
	Sig, Fin   []byte
	// Star is msg2 up to and including cred_G (msg2* of the transcript).
	Star []byte
}

// Msg3 completes it (device to gateway).
type Msg3 struct {
	Suite      Suite
	SidD, SidG SID
	Cred       *Credential
	Sig, Fin   []byte
	Star       []byte // msg3*
}

// Marshal encodes msg1.
func (m *Msg1) Marshal() ([]byte, error) {
	d, _, ok := shareSizes(m.Suite)
	if !ok || len(m.Share) != d {
		return nil, fmt.Errorf("%w: suite %d with a %d-byte share", ErrMessage, m.Suite, len(m.Share))
	}
	out := append([]byte{protocolVersion, typeMsg1, byte(m.Suite)}, m.SidD[:]...)
	return append(out, m.Share...), nil
}

// header checks version, type and suite and returns the suite.
func header(b []byte, typ byte) (Suite, error) {
	if len(b) > MaxKexMessage {
		return 0, fmt.Errorf("%w: %d bytes; the limit is %d", ErrMessage, len(b), MaxKexMessage)
	}
	if len(b) < 3 || b[0] != protocolVersion || b[1] != typ {
		return 0, fmt.Errorf("%w: wrong version or type", ErrMessage)
	}
	s := Suite(b[2])
	if _, _, ok := shareSizes(s); !ok {
		return 0, fmt.Errorf("%w: unknown suite %d", ErrMessage, s)
	}
	return s, nil
}

// ParseMsg1 reads msg1.
func ParseMsg1(b []byte) (*Msg1, error) {
	s, err := header(b, typeMsg1)
	if err != nil {
		return nil, err
	}
	d, _, _ := shareSizes(s)
	if len(b) != 3+sidSize+d {
		return nil, fmt.Errorf("%w: msg1 of %d bytes for suite %d", ErrMessage, len(b), s)
	}
	m := &Msg1{Suite: s, Share: b[3+sidSize:]}
	copy(m.SidD[:], b[3:3+sidSize])
	return m, nil
}

// marshalTail appends cred, lp(sig) and fin, and returns the message and
// the length of its starred prefix.
func marshalTail(out []byte, cred, sig, fin []byte) ([]byte, int, error) {
	if len(sig) == 0 || len(sig) > maxSigSize || len(fin) != finSize {
		return nil, 0, fmt.Errorf("%w: signature of %d or finish of %d bytes", ErrMessage, len(sig), len(fin))
	}
	out = append(out, cred...)
	star := len(out)
	out = lp(out, sig)
	out = append(out, fin...)
	if len(out) > MaxKexMessage {
		return nil, 0, fmt.Errorf("%w: %d bytes", ErrMessage, len(out))
	}
	return out, star, nil
}

// parseTail reads cred, lp(sig) and fin, refusing trailing bytes, and
// returns them with the length of the starred prefix.
func parseTail(b []byte, off int) (*Credential, []byte, []byte, int, error) {
	cred, rest, err := ParseCredential(b[off:])
	if err != nil {
		return nil, nil, nil, 0, err
	}
	star := len(b) - len(rest)
	if len(rest) < 2 {
		return nil, nil, nil, 0, fmt.Errorf("%w: no signature", ErrMessage)
	}
	n := int(binary.BigEndian.Uint16(rest))
	if n == 0 || n > maxSigSize || len(rest) != 2+n+finSize {
		return nil, nil, nil, 0, fmt.Errorf("%w: bad signature or finish length, or trailing bytes", ErrMessage)
	}
	return cred, rest[2 : 2+n], rest[2+n:], star, nil
}

// Marshal encodes msg2; cred is the encoded credential.
func (m *Msg2) Marshal(cred []byte) ([]byte, error) {
	_, g, ok := shareSizes(m.Suite)
	if !ok || len(m.Share) != g {
		return nil, fmt.Errorf("%w: suite %d with a %d-byte share", ErrMessage, m.Suite, len(m.Share))
	}
	out := append([]byte{protocolVersion, typeMsg2, byte(m.Suite)}, m.SidD[:]...)
	out = append(append(out, m.SidG[:]...), m.Share...)
	out, star, err := marshalTail(out, cred, m.Sig, m.Fin)
	if err != nil {
		return nil, err
	}
	m.Star = out[:star]
	return out, nil
}

// ParseMsg2 reads msg2.
func ParseMsg2(b []byte) (*Msg2, error) {
	s, err := header(b, typeMsg2)
	if err != nil {
		return nil, err
	}
	_, g, _ := shareSizes(s)
	off := 3 + 2*sidSize + g
	if len(b) < off {
		return nil, fmt.Errorf("%w: short msg2", ErrMessage)
	}
	m := &Msg2{Suite: s, Share: b[3+2*sidSize : off]}
	copy(m.SidD[:], b[3:])
	copy(m.SidG[:], b[3+sidSize:])
	var star int
	if m.Cred, m.Sig, m.Fin, star, err = parseTail(b, off); err != nil {
		return nil, err
	}
	m.Star = b[:star]
	return m, nil
}

// Marshal encodes msg3; cred is the encoded credential.
func (m *Msg3) Marshal(cred []byte) ([]byte, error) {
	if _, _, ok := shareSizes(m.Suite); !ok {
		return nil, fmt.Errorf("%w: unknown suite %d", ErrMessage, m.Suite)
	}
	out := append([]byte{protocolVersion, typeMsg3, byte(m.Suite)}, m.SidD[:]...)
	out = append(out, m.SidG[:]...)
	out, star, err := marshalTail(out, cred, m.Sig, m.Fin)
	if err != nil {
		return nil, err
	}
	m.Star = out[:star]
	return out, nil
}

// ParseMsg3 reads msg3.
func ParseMsg3(b []byte) (*Msg3, error) {
	s, err := header(b, typeMsg3)
	if err != nil {
		return nil, err
	}
	off := 3 + 2*sidSize
	if len(b) < off {
		return nil, fmt.Errorf("%w: short msg3", ErrMessage)
	}
	m := &Msg3{Suite: s}
	copy(m.SidD[:], b[3:])
	copy(m.SidG[:], b[3+sidSize:])
	var star int
	if m.Cred, m.Sig, m.Fin, star, err = parseTail(b, off); err != nil {
		return nil, err
	}
	m.Star = b[:star]
	return m, nil
}

// MarshalHint encodes a hint: the gateway wants kid replaced.
func MarshalHint(kid KID) []byte { return append([]byte{protocolVersion, typeHint}, kid[:]...) }

// ParseHint reads a hint.
func ParseHint(b []byte) (KID, error) {
	var kid KID
	if len(b) != 6 || b[0] != protocolVersion || b[1] != typeHint {
		return kid, fmt.Errorf("%w: not a hint", ErrMessage)
	}
	copy(kid[:], b[2:])
	return kid, nil
}
