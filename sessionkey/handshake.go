package sessionkey

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"time"
)

// The handshake state machines (FKX1.md, Handshake: order of checks,
// state). The initiator is the device, the responder the gateway. Neither
// does any I/O: each takes the bytes that arrived and returns the bytes to
// publish, so the caller decides topics, QoS and threads.

// Refusals of handshake messages. Every one of them is dropped and
// counted by the caller, and nothing is ever sent back for it.
var (
	// ErrUnexpected: a message that does not fit the state (no pending
	// handshake, or sids that do not match it). It does not touch the
	// pending handshake.
	ErrUnexpected = errors.New("fkx1: message does not match a pending handshake")
	// ErrSuite: a suite this side does not allow, or a suite that differs
	// from msg1's.
	ErrSuite = errors.New("fkx1: suite not allowed")
	// ErrRateLimited: more msg1 from one device than the responder answers.
	ErrRateLimited = errors.New("fkx1: too many handshakes from this device")
	// ErrReplayedMsg1: a msg1 the responder already answered.
	ErrReplayedMsg1 = errors.New("fkx1: replayed msg1")
	// ErrPeer: the peer's credential does not verify (chain, role, name,
	// revocation, key type).
	ErrPeer = errors.New("fkx1: peer credential refused")
	// ErrFinish: a finish value that does not verify.
	ErrFinish = errors.New("fkx1: finish value does not verify")
	// ErrKIDCollision: the new kid equals a live one; start again.
	ErrKIDCollision = errors.New("fkx1: new key id equals a live one")
	// ErrAborted: the pending handshake ended after too many failures.
	ErrAborted = errors.New("fkx1: handshake ended after repeated failures")
	// ErrMsg4: a msg4 that is not seq 0 with an empty plaintext, or not 22
	// bytes.
	ErrMsg4 = errors.New("fkx1: bad msg4")
)

// Reason names a handshake or envelope refusal for metrics and logs; it
// is "" for nil and "other" for an error of no known kind.
func Reason(err error) string {
	for _, r := range []struct {
		err  error
		name string
	}{
		{ErrUnexpected, "unexpected"}, {ErrSuite, "suite"}, {ErrRateLimited, "rate-limited"},
		{ErrReplayedMsg1, "replayed-msg1"}, {ErrPeer, "peer-credential"}, {ErrFinish, "finish"},
		{ErrSignature, "signature"}, {ErrKIDCollision, "kid-collision"}, {ErrAborted, "aborted"},
		{ErrMsg4, "msg4"}, {ErrMessage, "malformed"}, {ErrCredential, "credential"}, {ErrKeyShare, "key-share"},
		{ErrMalformed, "malformed"}, {ErrUnknownKID, "unknown-kid"}, {ErrTooFarAhead, "too-far-ahead"},
		{ErrTooOld, "too-old"}, {ErrReplay, "replay"}, {ErrAuth, "auth"}, {ErrNeedEpoch, "need-epoch"},
	} {
		if errors.Is(err, r.err) {
			return r.name
		}
	}
	if err == nil {
		return ""
	}
	return "other"
}

// PeerVerifier checks a peer's certificate chain (leaf first, as the
// credential carried it or as the mTLS handshake presented it) against the
// fleet's trust at the current time: chain, validity, revocation, role,
// trust domain and name. The handshake has already checked that the leaf is
// not a CA, has exactly one URI SAN and a key type of the signature table.
type PeerVerifier func(chain []*x509.Certificate) error

// Identity is a side's own signing identity.
type Identity struct {
	// Signer signs with the key of the side's fleet certificate (software
	// or TPM).
	Signer crypto.Signer
	// Chain is the side's certificate chain (DER), leaf first, without the
	// root.
	Chain [][]byte
	// SendRef sends a 0x00 reference to the mTLS leaf instead of the chain.
	// Leave it off behind a TLS-terminating proxy.
	SendRef bool
}

func (id *Identity) credential() ([]byte, error) {
	if id == nil || id.Signer == nil || len(id.Chain) == 0 {
		return nil, errors.New("fkx1: no signing identity")
	}
	if id.SendRef {
		return AppendRef(nil, id.Chain[0]), nil
	}
	return AppendChain(nil, id.Chain)
}

// resolvePeer turns a credential into the peer's verified leaf public key.
// mtlsLeaf is the DER leaf of the same connection, if the receiver holds
// one; a 0x00 reference needs it.
func resolvePeer(c *Credential, mtlsLeaf []byte, verify PeerVerifier) (crypto.PublicKey, error) {
	ders := c.Chain
	if c.IsRef {
		if len(mtlsLeaf) == 0 {
			return nil, fmt.Errorf("%w: a reference credential, but no mTLS leaf to resolve it", ErrPeer)
		}
		h := sha256.Sum256(mtlsLeaf)
		if subtle.ConstantTimeCompare(h[:], c.LeafRef[:]) != 1 {
			return nil, fmt.Errorf("%w: the reference does not match the mTLS leaf", ErrPeer)
		}
		ders = [][]byte{mtlsLeaf}
	}
	chain := make([]*x509.Certificate, 0, len(ders))
	for i, der := range ders {
		cert, err := x509.ParseCertificate(der)
		if err != nil {
			return nil, fmt.Errorf("%w: certificate %d: %v", ErrPeer, i, err)
		}
		chain = append(chain, cert)
	}
	leaf := chain[0]
	if leaf.IsCA {
		return nil, fmt.Errorf("%w: the leaf is a CA", ErrPeer)
	}
	if len(leaf.URIs) != 1 {
		return nil, fmt.Errorf("%w: the leaf has %d URI names; want exactly one", ErrPeer, len(leaf.URIs))
	}
	switch k := leaf.PublicKey.(type) {
	case *ecdsa.PublicKey:
		if k.Curve != elliptic.P256() && k.Curve != elliptic.P384() {
			return nil, fmt.Errorf("%w: key on curve %s", ErrPeer, k.Curve.Params().Name)
		}
	case ed25519.PublicKey:
	default:
		return nil, fmt.Errorf("%w: key type %T", ErrPeer, leaf.PublicKey)
	}
	if verify == nil {
		return nil, fmt.Errorf("%w: no verifier configured", ErrPeer)
	}
	if err := verify(chain); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrPeer, err)
	}
	return leaf.PublicKey, nil
}

// Epoch is a completed handshake: its key id and this side's two
// directions (Send seals, Recv opens). Its secrets are wiped by Wipe.
type Epoch struct {
	KID     KID
	Send    *Sender
	Recv    *Receiver
	Started time.Time
}

// Wipe zeroes the epoch's remaining secrets.
func (e *Epoch) Wipe() {
	if e == nil {
		return
	}
	if e.Send != nil {
		e.Send.Wipe()
	}
	if e.Recv != nil {
		e.Recv.Wipe()
	}
}

// newEpoch derives both directions from MS and wipes MS. The gateway's
// g2d sender starts at seq 0, which msg4 takes.
func newEpoch(ms []byte, kid KID, deviceID string, gateway bool, now time.Time) *Epoch {
	defer wipe(ms)
	if gateway {
		return &Epoch{KID: kid, Send: NewSender(ms, kid, G2D, deviceID, 0), Recv: NewReceiver(ms, kid, D2G, deviceID), Started: now}
	}
	return &Epoch{KID: kid, Send: NewSender(ms, kid, D2G, deviceID, 0), Recv: NewReceiver(ms, kid, G2D, deviceID), Started: now}
}

// msg4Size is the size of msg4: an envelope at seq 0 with no plaintext.
const msg4Size = 1 + 4 + 1 + tagSize

// ---------------------------------------------------------------------------
// Initiator (device)

// InitiatorConfig configures a device's handshakes.
type InitiatorConfig struct {
	DeviceID string
	Suite    Suite
	Identity Identity
	// VerifyGateway checks the gateway's chain: role gateway, own trust
	// domain, valid and trusted now.
	VerifyGateway PeerVerifier
	Rand          io.Reader        // crypto/rand if nil
	Now           func() time.Time // time.Now if nil
}

type initiatorState int

const (
	idle initiatorState = iota
	waitMsg2
	waitMsg4
)

// Initiator runs the device's side of one handshake at a time. It is not
// safe for concurrent use.
type Initiator struct {
	cfg   InitiatorConfig
	state initiatorState
	sidD  SID
	ks    *DeviceKeyShare
	th1   []byte
	// after msg2
	sidG    SID
	pending *Epoch
	msg3    []byte
}

// NewInitiator checks cfg and returns an idle initiator.
func NewInitiator(cfg InitiatorConfig) (*Initiator, error) {
	if _, _, ok := shareSizes(cfg.Suite); !ok {
		return nil, fmt.Errorf("%w: %d", ErrSuite, cfg.Suite)
	}
	if _, err := cfg.Identity.credential(); err != nil {
		return nil, err
	}
	if cfg.DeviceID == "" || cfg.VerifyGateway == nil {
		return nil, errors.New("fkx1: initiator needs a device id and a gateway verifier")
	}
	if cfg.Rand == nil {
		cfg.Rand = rand.Reader
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	return &Initiator{cfg: cfg}, nil
}

// Start begins a new handshake (new sid, new key share), abandoning any
// pending one, and returns msg1.
func (in *Initiator) Start() ([]byte, error) {
	in.Reset()
	if _, err := io.ReadFull(in.cfg.Rand, in.sidD[:]); err != nil {
		return nil, err
	}
	ks, share, err := NewDeviceKeyShare(in.cfg.Suite, in.cfg.Rand)
	if err != nil {
		return nil, err
	}
	m1, err := (&Msg1{Suite: in.cfg.Suite, SidD: in.sidD, Share: share}).Marshal()
	if err != nil {
		return nil, err
	}
	in.ks, in.th1, in.state = ks, TH1(in.cfg.DeviceID, m1), waitMsg2
	return m1, nil
}

// Reset abandons the pending handshake and wipes its secrets.
func (in *Initiator) Reset() {
	in.pending.Wipe()
	*in = Initiator{cfg: in.cfg}
}

// Waiting reports whether a handshake is pending (msg1 or msg3 sent).
func (in *Initiator) Waiting() bool { return in.state != idle }

// PendingKID is the kid the pending handshake will have once msg4
// arrives (after msg3 has been sent).
func (in *Initiator) PendingKID() (KID, bool) {
	if in.state != waitMsg4 {
		return KID{}, false
	}
	return in.pending.KID, true
}

// HandleMsg2 processes a payload from kex/resp while waiting for msg2 and
// returns msg3. mtlsLeaf is the gateway's mTLS leaf (DER), needed only to
// resolve a reference credential. A refused msg2 leaves the pending
// handshake as it was: the first msg2 that passes every check wins.
func (in *Initiator) HandleMsg2(b, mtlsLeaf []byte) ([]byte, error) {
	if in.state != waitMsg2 {
		return nil, ErrUnexpected
	}
	m, err := ParseMsg2(b)
	if err != nil {
		return nil, err
	}
	if m.SidD != in.sidD {
		return nil, ErrUnexpected
	}
	if m.Suite != in.cfg.Suite {
		return nil, fmt.Errorf("%w: msg2 of suite %d for a msg1 of suite %d", ErrSuite, m.Suite, in.cfg.Suite)
	}
	ikm, err := in.ks.Finish(m.Share)
	if err != nil {
		return nil, err
	}
	th2 := TH2(in.th1, m.Star)
	hs, err := deriveHandshake(th2, ikm)
	wipe(ikm)
	if err != nil {
		return nil, err
	}
	defer hs.wipe()
	pub, err := resolvePeer(m.Cred, mtlsLeaf, in.cfg.VerifyGateway)
	if err != nil {
		return nil, err
	}
	if !checkFinish(hs.fkG, th2, m.Sig, m.Fin) {
		return nil, ErrFinish
	}
	if err := Verify(pub, ContextGateway, th2, m.Sig); err != nil {
		return nil, err
	}
	// msg2 is good: build msg3.
	cred, err := in.cfg.Identity.credential()
	if err != nil {
		return nil, err
	}
	m3 := &Msg3{Suite: in.cfg.Suite, SidD: in.sidD, SidG: m.SidG}
	star := signedStar(typeMsg3, in.cfg.Suite, in.sidD, m.SidG, nil, cred)
	th3 := TH3(th2, m.Sig, m.Fin, star)
	sig, err := Sign(in.cfg.Identity.Signer, in.cfg.Rand, ContextDevice, th3)
	if err != nil {
		return nil, err
	}
	m3.Sig, m3.Fin = sig, finish(hs.fkD, th3, sig)
	out, err := m3.Marshal(cred)
	if err != nil {
		return nil, err
	}
	ms, kid := masterSecret(hs.prk, TH4(th3, m3.Sig, m3.Fin))
	in.ks, in.sidG, in.msg3, in.state = nil, m.SidG, out, waitMsg4
	in.pending = newEpoch(ms, kid, in.cfg.DeviceID, false, in.cfg.Now())
	return out, nil
}

// Msg3 is the msg3 already sent for the pending handshake, to republish
// as is.
func (in *Initiator) Msg3() []byte { return in.msg3 }

// HandleMsg4 processes a payload from kex/resp while waiting for msg4. It
// returns the new epoch; isLive reports the device's live kids, and a msg4
// under one of them is refused with ErrKIDCollision (start again).
func (in *Initiator) HandleMsg4(b []byte, isLive func(KID) bool) (*Epoch, error) {
	if in.state != waitMsg4 {
		return nil, ErrUnexpected
	}
	if len(b) != msg4Size {
		return nil, fmt.Errorf("%w: %d bytes", ErrMsg4, len(b))
	}
	kid, seq, _, err := ParseHeader(b)
	if err != nil {
		return nil, err
	}
	if kid != in.pending.KID {
		return nil, ErrUnexpected
	}
	if seq != 0 {
		return nil, fmt.Errorf("%w: seq %d", ErrMsg4, seq)
	}
	pt, err := in.pending.Recv.Open(b, KexChannel)
	if err != nil {
		return nil, err
	}
	if len(pt) != 0 {
		return nil, fmt.Errorf("%w: non-empty plaintext", ErrMsg4)
	}
	if isLive != nil && isLive(kid) {
		in.Reset()
		return nil, ErrKIDCollision
	}
	ep := in.pending
	in.pending = nil
	in.Reset()
	return ep, nil
}

// KexChannel is the channel reserved for msg4.
const KexChannel = "kex"

// ---------------------------------------------------------------------------
// Responder (gateway)

// ResponderConfig configures the gateway's side; one config serves every
// device.
type ResponderConfig struct {
	// Suites the gateway answers; default both.
	Suites   []Suite
	Identity Identity
	// VerifyDevice checks a device's chain for deviceID: role device, own
	// trust domain, name equal to deviceID, not revoked, valid now.
	VerifyDevice func(deviceID string, chain []*x509.Certificate) error
	Rand         io.Reader        // crypto/rand if nil
	Now          func() time.Time // time.Now if nil

	// Limits of FKX1.md (State); zero means the spec's value.
	PendingTTL    time.Duration // 30 s
	Msg1Memory    time.Duration // 10 min
	Msg1MemoryMax int           // 64 per device
	Msg1PerMinute int           // 10
	Msg3Replay    time.Duration // 30 s
	MaxFailures   int           // 3
}

func (c *ResponderConfig) defaults() error {
	if len(c.Suites) == 0 {
		c.Suites = []Suite{Suite1, Suite2}
	}
	if _, err := c.Identity.credential(); err != nil {
		return err
	}
	if c.VerifyDevice == nil {
		return errors.New("fkx1: responder needs a device verifier")
	}
	if c.Rand == nil {
		c.Rand = rand.Reader
	}
	if c.Now == nil {
		c.Now = time.Now
	}
	def := func(d *time.Duration, v time.Duration) {
		if *d == 0 {
			*d = v
		}
	}
	def(&c.PendingTTL, 30*time.Second)
	def(&c.Msg1Memory, 10*time.Minute)
	def(&c.Msg3Replay, 30*time.Second)
	if c.Msg1MemoryMax == 0 {
		c.Msg1MemoryMax = 64
	}
	if c.Msg1PerMinute == 0 {
		c.Msg1PerMinute = 10
	}
	if c.MaxFailures == 0 {
		c.MaxFailures = 3
	}
	return nil
}

// Responder is the gateway's handshake state for one device. It is not
// safe for concurrent use; the gateway serialises each device's messages.
type Responder struct {
	cfg      *ResponderConfig
	deviceID string
	pending  *pendingHandshake
	answered []stamped // H(msg1) of answered msg1s
	msg1At   []time.Time
	done     *completed
}

type stamped struct {
	h  [32]byte
	at time.Time
}

type pendingHandshake struct {
	msg1, msg2 []byte
	sidD, sidG SID
	suite      Suite
	th2        []byte
	sigG, finG []byte
	hs         *handshakeSecrets
	expires    time.Time
	failures   int
}

func (p *pendingHandshake) wipe() {
	if p != nil && p.hs != nil {
		p.hs.wipe()
	}
}

type completed struct {
	msg3, msg4 []byte
	until      time.Time
}

// NewResponderConfig checks cfg and fills in the defaults.
func NewResponderConfig(cfg ResponderConfig) (*ResponderConfig, error) {
	if err := cfg.defaults(); err != nil {
		return nil, err
	}
	return &cfg, nil
}

// NewResponder returns the handshake state of one device.
func NewResponder(cfg *ResponderConfig, deviceID string) *Responder {
	return &Responder{cfg: cfg, deviceID: deviceID}
}

func (r *Responder) allowed(s Suite) bool {
	for _, a := range r.cfg.Suites {
		if a == s {
			return true
		}
	}
	return false
}

// expire drops a pending handshake past its deadline and forgets old
// msg1 hashes and rate samples.
func (r *Responder) expire(now time.Time) {
	if r.pending != nil && !now.Before(r.pending.expires) {
		r.pending.wipe()
		r.pending = nil
	}
	keep := r.answered[:0]
	for _, a := range r.answered {
		if now.Sub(a.at) < r.cfg.Msg1Memory {
			keep = append(keep, a)
		}
	}
	r.answered = keep
	recent := r.msg1At[:0]
	for _, t := range r.msg1At {
		if now.Sub(t) < time.Minute {
			recent = append(recent, t)
		}
	}
	r.msg1At = recent
	if r.done != nil && !now.Before(r.done.until) {
		r.done = nil
	}
}

// Idle reports whether the responder holds nothing that a later message
// could need, so the gateway may drop it.
func (r *Responder) Idle() bool {
	r.expire(r.cfg.Now())
	return r.pending == nil && len(r.answered) == 0 && len(r.msg1At) == 0 && r.done == nil
}

// HandleMsg1 answers a msg1 with msg2. A byte-identical repeat of the
// pending msg1 returns the msg2 already sent, changing nothing.
func (r *Responder) HandleMsg1(b []byte) ([]byte, error) {
	now := r.cfg.Now()
	r.expire(now)
	m, err := ParseMsg1(b)
	if err != nil {
		return nil, err
	}
	if !r.allowed(m.Suite) {
		return nil, fmt.Errorf("%w: %d", ErrSuite, m.Suite)
	}
	if r.pending != nil && bytes.Equal(r.pending.msg1, b) {
		return r.pending.msg2, nil
	}
	h := sha256.Sum256(b)
	for _, a := range r.answered {
		if a.h == h {
			return nil, ErrReplayedMsg1
		}
	}
	if len(r.msg1At) >= r.cfg.Msg1PerMinute {
		return nil, ErrRateLimited
	}
	p := &pendingHandshake{msg1: bytes.Clone(b), sidD: m.SidD, suite: m.Suite, expires: now.Add(r.cfg.PendingTTL)}
	if _, err := io.ReadFull(r.cfg.Rand, p.sidG[:]); err != nil {
		return nil, err
	}
	shareG, ikm, err := GatewayKeyShare(m.Suite, m.Share, r.cfg.Rand)
	if err != nil {
		return nil, err
	}
	cred, err := r.cfg.Identity.credential()
	if err != nil {
		wipe(ikm)
		return nil, err
	}
	th1 := TH1(r.deviceID, b)
	star := signedStar(typeMsg2, m.Suite, m.SidD, p.sidG, shareG, cred)
	p.th2 = TH2(th1, star)
	p.hs, err = deriveHandshake(p.th2, ikm)
	wipe(ikm)
	if err != nil {
		return nil, err
	}
	if p.sigG, err = Sign(r.cfg.Identity.Signer, r.cfg.Rand, ContextGateway, p.th2); err != nil {
		p.wipe()
		return nil, err
	}
	p.finG = finish(p.hs.fkG, p.th2, p.sigG)
	m2 := &Msg2{Suite: m.Suite, SidD: m.SidD, SidG: p.sidG, Share: shareG, Signed: Signed{Sig: p.sigG, Fin: p.finG}}
	if p.msg2, err = m2.Marshal(cred); err != nil {
		p.wipe()
		return nil, err
	}
	r.pending.wipe()
	r.pending = p
	r.msg1At = append(r.msg1At, now)
	r.answered = append(r.answered, stamped{h: h, at: now})
	if len(r.answered) > r.cfg.Msg1MemoryMax {
		r.answered = r.answered[len(r.answered)-r.cfg.Msg1MemoryMax:]
	}
	return p.msg2, nil
}

// HandleMsg3 completes the pending handshake. It returns msg4 and the new
// epoch. A byte-identical repeat of the msg3 that completed the last
// handshake, within 30 s, returns the same msg4 and a nil epoch. mtlsLeaf
// is the device's mTLS leaf (DER) for a reference credential; isLive
// reports the device's live kids.
func (r *Responder) HandleMsg3(b, mtlsLeaf []byte, isLive func(KID) bool) ([]byte, *Epoch, error) {
	now := r.cfg.Now()
	r.expire(now)
	if r.done != nil && bytes.Equal(r.done.msg3, b) {
		return r.done.msg4, nil, nil
	}
	m, err := ParseMsg3(b)
	if err != nil {
		return nil, nil, err
	}
	p := r.pending
	if p == nil || m.SidD != p.sidD || m.SidG != p.sidG {
		return nil, nil, ErrUnexpected
	}
	ep, msg4, err := r.finishMsg3(p, m, mtlsLeaf, isLive, now)
	if err != nil {
		p.failures++
		if p.failures >= r.cfg.MaxFailures || errors.Is(err, ErrKIDCollision) {
			p.wipe()
			r.pending = nil
			if !errors.Is(err, ErrKIDCollision) {
				err = fmt.Errorf("%w (last: %w)", ErrAborted, err)
			}
		}
		return nil, nil, err
	}
	p.wipe()
	r.pending = nil
	r.done = &completed{msg3: bytes.Clone(b), msg4: msg4, until: now.Add(r.cfg.Msg3Replay)}
	return msg4, ep, nil
}

func (r *Responder) finishMsg3(p *pendingHandshake, m *Msg3, mtlsLeaf []byte, isLive func(KID) bool, now time.Time) (*Epoch, []byte, error) {
	if m.Suite != p.suite {
		return nil, nil, fmt.Errorf("%w: msg3 of suite %d for a msg1 of suite %d", ErrSuite, m.Suite, p.suite)
	}
	pub, err := resolvePeer(m.Cred, mtlsLeaf, func(chain []*x509.Certificate) error { return r.cfg.VerifyDevice(r.deviceID, chain) })
	if err != nil {
		return nil, nil, err
	}
	th3 := TH3(p.th2, p.sigG, p.finG, m.Star)
	if !checkFinish(p.hs.fkD, th3, m.Sig, m.Fin) {
		return nil, nil, ErrFinish
	}
	if err := Verify(pub, ContextDevice, th3, m.Sig); err != nil {
		return nil, nil, err
	}
	ms, kid := masterSecret(p.hs.prk, TH4(th3, m.Sig, m.Fin))
	if isLive != nil && isLive(kid) {
		wipe(ms)
		return nil, nil, ErrKIDCollision
	}
	ep := newEpoch(ms, kid, r.deviceID, true, now)
	msg4, err := ep.Send.Seal(KexChannel, nil)
	if err != nil {
		ep.Wipe()
		return nil, nil, err
	}
	return ep, msg4, nil
}
