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

// Signed is what msg2 and msg3 end with: the sender's credential, its
// signature and its finish value. Star is the message up to and including
// the credential (msg2* or msg3* of the transcript).
type Signed struct {
	Cred     *Credential
	Sig, Fin []byte
	Star     []byte
}

// Msg2 answers it (gateway to device).
type Msg2 struct {
	Suite      Suite
	SidD, SidG SID
	Share      []byte
	Signed
}

// Msg3 completes it (device to gateway).
type Msg3 struct {
	Suite      Suite
	SidD, SidG SID
	Signed
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

// signedStar is msg2* or msg3*: the message up to and including the
// credential, which the transcript hashes before the signature exists.
func signedStar(typ byte, suite Suite, sidD, sidG SID, share, cred []byte) []byte {
	out := make([]byte, 0, 3+2*sidSize+len(share)+len(cred)+2+maxSigSize+finSize)
	out = append(append(out, protocolVersion, typ, byte(suite)), sidD[:]...)
	return append(append(append(out, sidG[:]...), share...), cred...)
}

// marshalSigned appends sid_D ‖ sid_G ‖ share ‖ cred ‖ lp(sig) ‖ fin to
// the header of type typ, and sets sg.Star.
func marshalSigned(typ byte, suite Suite, sidD, sidG SID, share, cred []byte, sg *Signed) ([]byte, error) {
	if len(sg.Sig) == 0 || len(sg.Sig) > maxSigSize || len(sg.Fin) != finSize {
		return nil, fmt.Errorf("%w: signature of %d or finish of %d bytes", ErrMessage, len(sg.Sig), len(sg.Fin))
	}
	out := signedStar(typ, suite, sidD, sidG, share, cred)
	star := len(out)
	out = lp(out, sg.Sig)
	out = append(out, sg.Fin...)
	if len(out) > MaxKexMessage {
		return nil, fmt.Errorf("%w: %d bytes", ErrMessage, len(out))
	}
	sg.Star = out[:star]
	return out, nil
}

// parseSigned reads sid_D ‖ sid_G ‖ share(shareLen) ‖ cred ‖ lp(sig) ‖ fin
// after the header, refusing trailing bytes.
func parseSigned(b []byte, shareLen int) (sidD, sidG SID, share []byte, sg Signed, err error) {
	off := 3 + 2*sidSize + shareLen
	if len(b) < off {
		return sidD, sidG, nil, sg, fmt.Errorf("%w: short message", ErrMessage)
	}
	copy(sidD[:], b[3:])
	copy(sidG[:], b[3+sidSize:])
	share = b[3+2*sidSize : off]
	cred, rest, err := ParseCredential(b[off:])
	if err != nil {
		return sidD, sidG, nil, sg, err
	}
	if len(rest) < 2 {
		return sidD, sidG, nil, sg, fmt.Errorf("%w: no signature", ErrMessage)
	}
	n := int(binary.BigEndian.Uint16(rest))
	if n == 0 || n > maxSigSize || len(rest) != 2+n+finSize {
		return sidD, sidG, nil, sg, fmt.Errorf("%w: bad signature or finish length, or trailing bytes", ErrMessage)
	}
	sg = Signed{Cred: cred, Sig: rest[2 : 2+n], Fin: rest[2+n:], Star: b[:len(b)-len(rest)]}
	return sidD, sidG, share, sg, nil
}

// Marshal encodes msg2; cred is the encoded credential.
func (m *Msg2) Marshal(cred []byte) ([]byte, error) {
	_, g, ok := shareSizes(m.Suite)
	if !ok || len(m.Share) != g {
		return nil, fmt.Errorf("%w: suite %d with a %d-byte share", ErrMessage, m.Suite, len(m.Share))
	}
	return marshalSigned(typeMsg2, m.Suite, m.SidD, m.SidG, m.Share, cred, &m.Signed)
}

// ParseMsg2 reads msg2.
func ParseMsg2(b []byte) (*Msg2, error) {
	s, err := header(b, typeMsg2)
	if err != nil {
		return nil, err
	}
	_, g, _ := shareSizes(s)
	m := &Msg2{Suite: s}
	if m.SidD, m.SidG, m.Share, m.Signed, err = parseSigned(b, g); err != nil {
		return nil, err
	}
	return m, nil
}

// Marshal encodes msg3; cred is the encoded credential.
func (m *Msg3) Marshal(cred []byte) ([]byte, error) {
	if _, _, ok := shareSizes(m.Suite); !ok {
		return nil, fmt.Errorf("%w: unknown suite %d", ErrMessage, m.Suite)
	}
	return marshalSigned(typeMsg3, m.Suite, m.SidD, m.SidG, nil, cred, &m.Signed)
}

// ParseMsg3 reads msg3.
func ParseMsg3(b []byte) (*Msg3, error) {
	s, err := header(b, typeMsg3)
	if err != nil {
		return nil, err
	}
	m := &Msg3{Suite: s}
	if m.SidD, m.SidG, _, m.Signed, err = parseSigned(b, 0); err != nil {
		return nil, err
	}
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
