package sessionkey

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// The envelope (FKX1.md, Envelope):
//
//	envelope = 0x01 ‖ kid(4) ‖ uvarint(seq) ‖ ciphertext ‖ tag(16)
//	g        = seq >> 16
//	nonce    = iv[x,g] XOR (0x00000000 ‖ u64(seq))
//	AAD      = 0x01 ‖ kid ‖ uvarint(seq) ‖ lp(device_id) ‖ lp(channel)

const (
	envelopeVersion = 0x01
	tagSize         = 16
	// maxSeq: no envelope is sent or accepted at seq ≥ 2^32.
	maxSeq = 1 << 32
	// maxAhead: a receiver refuses an envelope more than 4 generations
	// above its highest accepted one; a sender starts a new epoch instead.
	maxAhead = 4
	// windowSize is the replay window, in sequence numbers.
	windowSize = 1024
)

// Errors of Open. A refused envelope changes nothing in the receiver.
var (
	ErrMalformed   = errors.New("fkx1: malformed envelope")
	ErrUnknownKID  = errors.New("fkx1: envelope under another key id")
	ErrTooFarAhead = errors.New("fkx1: envelope more than 4 generations ahead; rekey")
	ErrTooOld      = errors.New("fkx1: envelope older than the replay window")
	ErrReplay      = errors.New("fkx1: envelope already received")
	ErrAuth        = errors.New("fkx1: envelope does not authenticate")
	// ErrNeedEpoch: the sender must run a new handshake first (seq space
	// or generation jump exhausted).
	ErrNeedEpoch = errors.New("fkx1: sender needs a new epoch")
)

// KID is the 4-byte key id of an epoch.
type KID [4]byte

func appendAAD(dst []byte, kid KID, seq uint64, deviceID, channel string) []byte {
	dst = append(dst, envelopeVersion)
	dst = append(dst, kid[:]...)
	dst = binary.AppendUvarint(dst, seq)
	dst = binary.BigEndian.AppendUint16(dst, uint16(len(deviceID)))
	dst = append(dst, deviceID...)
	dst = binary.BigEndian.AppendUint16(dst, uint16(len(channel)))
	return append(dst, channel...)
}

func nonceFor(iv [12]byte, seq uint64) []byte {
	n := iv
	var s [8]byte
	binary.BigEndian.PutUint64(s[:], seq)
	for i := 0; i < 8; i++ {
		n[4+i] ^= s[i]
	}
	return n[:]
}

// Sender seals one direction's envelopes under one key id. It is not safe
// for concurrent use.
type Sender struct {
	kid      KID
	deviceID string
	ts       []byte // TS[x, cur.g], kept to step to the next generation
	cur      generation
	next     uint64 // next seq
	lastSent int64  // generation of the last envelope sent; -1 before any
}

// NewSender starts direction x of an epoch from its master secret, at
// sequence number first (0 for d2g; for g2d, 0 is msg4 and data starts at 1).
func NewSender(ms []byte, kid KID, x Direction, deviceID string, first uint64) *Sender {
	ts := trafficSecret0(ms, x)
	return &Sender{kid: kid, deviceID: deviceID, ts: ts, cur: keysOf(ts, 0), next: first, lastSent: -1}
}

// Seq is the sequence number the next envelope will carry.
func (s *Sender) Seq() uint64 { return s.next }

// Jump moves to the next generation (the time-based ratchet): the next seq
// becomes ((seq >> 16) + 1) << 16 and the old generation is wiped.
func (s *Sender) Jump() error {
	next := ((s.next >> 16) + 1) << 16
	if next >= maxSeq {
		return ErrNeedEpoch
	}
	s.next = next
	return s.advanceTo(uint32(next >> 16))
}

func (s *Sender) advanceTo(g uint32) error {
	for s.cur.g < g {
		nts := nextSecret(s.ts)
		wipe(s.ts)
		s.cur.wipe()
		s.ts, s.cur = nts, keysOf(nts, s.cur.g+1)
	}
	return nil
}

// Seal encrypts plaintext for channel and returns the envelope.
func (s *Sender) Seal(channel string, plaintext []byte) ([]byte, error) {
	seq := s.next
	if seq >= maxSeq {
		return nil, ErrNeedEpoch
	}
	g := uint32(seq >> 16)
	if int64(g) > max(s.lastSent, 0)+maxAhead { // before the first envelope, the last counts as generation 0, as on the receiver
		return nil, ErrNeedEpoch
	}
	if err := s.advanceTo(g); err != nil {
		return nil, err
	}
	aead := s.cur.aead
	if aead == nil {
		return nil, ErrNeedEpoch // wiped
	}
	hdr := appendAAD(make([]byte, 0, 16+len(s.deviceID)+len(channel)), s.kid, seq, s.deviceID, channel)
	headerLen := 1 + 4 + uvarintLen(seq)
	out := make([]byte, headerLen, headerLen+len(plaintext)+tagSize)
	copy(out, hdr[:headerLen])
	out = aead.Seal(out, nonceFor(s.cur.iv, seq), plaintext, hdr)
	s.next = seq + 1
	s.lastSent = int64(g)
	return out, nil
}

// Wipe zeroes the sender's keys; it seals nothing afterwards.
func (s *Sender) Wipe() {
	wipe(s.ts)
	s.cur.wipe()
	s.next = maxSeq
}

// NeedsEpoch reports whether the next Seal would fail with ErrNeedEpoch:
// the seq space is spent, or the time ratchet has moved more than 4
// generations past the last envelope sent.
func (s *Sender) NeedsEpoch() bool {
	return s.next >= maxSeq || int64(s.next>>16) > max(s.lastSent, 0)+maxAhead
}

// KID is the key id the sender seals under.
func (s *Sender) KID() KID { return s.kid }

func uvarintLen(v uint64) int {
	var b [binary.MaxVarintLen64]byte
	return binary.PutUvarint(b[:], v)
}

// ParseHeader reads an envelope's key id and sequence number. It refuses a
// wrong version, a non-minimal uvarint, a seq ≥ 2^32 and an envelope too
// short to hold its tag.
func ParseHeader(env []byte) (KID, uint64, int, error) {
	var kid KID
	if len(env) < 1+4+1+tagSize || env[0] != envelopeVersion {
		return kid, 0, 0, ErrMalformed
	}
	copy(kid[:], env[1:5])
	seq, n := binary.Uvarint(env[5:])
	if n <= 0 || seq >= maxSeq || n != uvarintLen(seq) {
		return kid, 0, 0, fmt.Errorf("%w: bad sequence number", ErrMalformed)
	}
	hl := 5 + n
	if len(env) < hl+tagSize {
		return kid, 0, 0, ErrMalformed
	}
	return kid, seq, hl, nil
}

// Receiver opens one direction's envelopes under one key id, with the
// 1024-message replay window. It is not safe for concurrent use.
type Receiver struct {
	kid      KID
	deviceID string
	s        int64 // highest accepted seq; -1 before any
	window   [windowSize / 64]uint64
	cur      generation // keys of g(S)
	prev     *generation
	nextTS   []byte // TS[g(S)+1]
	wiped    bool
}

// NewReceiver starts direction x of an epoch from its master secret.
func NewReceiver(ms []byte, kid KID, x Direction, deviceID string) *Receiver {
	ts0 := trafficSecret0(ms, x)
	r := &Receiver{kid: kid, deviceID: deviceID, s: -1, cur: keysOf(ts0, 0), nextTS: nextSecret(ts0)}
	wipe(ts0)
	return r
}

// Highest is the highest accepted seq (-1 before any).
func (r *Receiver) Highest() int64 { return r.s }

func (r *Receiver) marked(seq uint64) bool {
	d := uint64(r.s) - seq
	return r.window[d/64]&(1<<(d%64)) != 0
}

// Open checks and decrypts an envelope on channel. It commits (moves the
// window and the keys) only when the tag verifies.
func (r *Receiver) Open(env []byte, channel string) ([]byte, error) {
	pt, seq, err := r.OpenPending(env, channel)
	if err != nil {
		return nil, err
	}
	r.Mark(seq)
	return pt, nil
}

// OpenPending is Open without marking the window: the gateway marks a seq
// with Mark only once its record is durable, so an envelope whose record
// could not be stored is not later refused as a replay. Until then, the
// same envelope opens again. The keys still move forward when the tag
// verifies.
func (r *Receiver) OpenPending(env []byte, channel string) ([]byte, uint64, error) {
	kid, seq, hl, err := ParseHeader(env)
	if err != nil {
		return nil, 0, err
	}
	if kid != r.kid || r.wiped {
		return nil, 0, ErrUnknownKID
	}
	pt, err := r.open(env, channel, seq, hl)
	return pt, seq, err
}

func (r *Receiver) open(env []byte, channel string, seq uint64, hl int) ([]byte, error) {
	g := uint32(seq >> 16)
	gS := r.cur.g
	switch {
	case int64(seq) > r.s && g > gS+maxAhead:
		return nil, ErrTooFarAhead
	case r.s >= 0 && int64(seq) <= r.s-windowSize:
		return nil, ErrTooOld
	case int64(seq) <= r.s && r.marked(seq):
		return nil, ErrReplay
	}
	// The keys of g: the current or previous generation, or derived
	// forward into temporary state (at most 5 steps).
	var use generation
	var fwd []generation
	var fwdTS []byte
	switch {
	case g == gS:
		use = r.cur
	case r.prev != nil && g == r.prev.g:
		use = *r.prev
	case g > gS:
		ts := append([]byte(nil), r.nextTS...)
		for k := gS + 1; k <= g; k++ {
			fwd = append(fwd, keysOf(ts, k))
			nts := nextSecret(ts)
			wipe(ts)
			ts = nts
		}
		fwdTS = ts
		use = fwd[len(fwd)-1]
	default:
		return nil, ErrTooOld
	}
	aead := use.aead
	if aead == nil {
		return nil, ErrUnknownKID // wiped
	}
	aad := appendAAD(make([]byte, 0, 16+len(r.deviceID)+len(channel)), r.kid, seq, r.deviceID, channel)
	pt, err := aead.Open(nil, nonceFor(use.iv, seq), env[hl:], aad)
	if err != nil {
		for i := range fwd {
			fwd[i].wipe()
		}
		wipe(fwdTS)
		return nil, ErrAuth
	}
	// Commit: keep g and g-1, TS[g+1]; wipe the rest; mark and move S.
	if g > gS {
		newPrev := r.cur
		if len(fwd) >= 2 {
			newPrev = fwd[len(fwd)-2]
			r.cur.wipe()
		}
		if r.prev != nil {
			r.prev.wipe()
		}
		for i := 0; i < len(fwd)-2; i++ {
			fwd[i].wipe()
		}
		wipe(r.nextTS)
		r.prev, r.cur, r.nextTS = &newPrev, fwd[len(fwd)-1], fwdTS
	}
	return pt, nil
}

// Mark records seq (from OpenPending) in the window and moves S. A seq
// the window has already left behind is ignored.
func (r *Receiver) Mark(seq uint64) {
	if r.s >= 0 && int64(seq) <= r.s-windowSize {
		return
	}
	if int64(seq) > r.s {
		shift := uint64(windowSize)
		if r.s >= 0 {
			shift = min(seq-uint64(r.s), windowSize)
		}
		r.shift(shift)
		r.s = int64(seq)
	}
	d := uint64(r.s) - seq
	r.window[d/64] |= 1 << (d % 64)
}

// Wipe zeroes the receiver's keys; it opens nothing afterwards.
func (r *Receiver) Wipe() {
	r.cur.wipe()
	if r.prev != nil {
		r.prev.wipe()
		r.prev = nil
	}
	wipe(r.nextTS)
	r.kid = KID{}
	r.wiped = true
}

// shift moves the window by n positions toward older (bit d = seq S-d).
func (r *Receiver) shift(n uint64) {
	if n >= windowSize {
		r.window = [windowSize / 64]uint64{}
		return
	}
	words, bits := n/64, n%64
	for i := len(r.window) - 1; i >= 0; i-- {
		var v uint64
		if src := i - int(words); src >= 0 {
			v = r.window[src] << bits
			if bits > 0 && src-1 >= 0 {
				v |= r.window[src-1] >> (64 - bits)
			}
		}
		r.window[i] = v
	}
}
