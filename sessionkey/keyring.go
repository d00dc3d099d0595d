package sessionkey

import (
	"errors"
	"sync"
	"time"
)

// ErrNoSendKey: no epoch may seal yet (the gateway has no epoch the device
// has confirmed with a d2g envelope, or the device has no epoch at all).
var ErrNoSendKey = errors.New("fkx1: no key to send under yet")

// Rotation is the rotation policy (FKX1.md, Rotation); zero fields take
// the spec's defaults.
type Rotation struct {
	// GenerationEvery is the time-based ratchet: a sender jumps to a new
	// generation this often even when idle. Default 10 min.
	GenerationEvery time.Duration
	// EpochEvery is the age at which a new handshake is due. Default 1 h.
	EpochEvery time.Duration
	// EpochAtSeq is the seq at which a new handshake is due. Default 2^24.
	EpochAtSeq uint64
	// RetireAfter is how long older kids stay live after a new epoch's
	// msg4. Default 60 s.
	RetireAfter time.Duration
}

func (r Rotation) withDefaults() Rotation {
	if r.GenerationEvery == 0 {
		r.GenerationEvery = 10 * time.Minute
	}
	if r.EpochEvery == 0 {
		r.EpochEvery = time.Hour
	}
	if r.EpochAtSeq == 0 {
		r.EpochAtSeq = 1 << 24
	}
	if r.RetireAfter == 0 {
		r.RetireAfter = 60 * time.Second
	}
	return r
}

// maxLive is the number of live kids per device; a fourth evicts the
// oldest.
const maxLive = 3

// Keyring holds one device's live epochs on one side, at most 3, and
// applies the cut-over and retirement rules. It is safe for concurrent
// use.
type Keyring struct {
	mu      sync.Mutex
	gateway bool
	rot     Rotation
	now     func() time.Time
	epochs  []*liveEpoch // oldest first
	lastJmp time.Time
}

type liveEpoch struct {
	*Epoch
	retireAt  time.Time // zero: no retirement scheduled
	confirmed bool      // gateway: a d2g envelope under it was accepted
}

// NewKeyring returns an empty keyring for the gateway's side (gateway)
// or the device's.
func NewKeyring(gateway bool, rot Rotation, now func() time.Time) *Keyring {
	if now == nil {
		now = time.Now
	}
	return &Keyring{gateway: gateway, rot: rot.withDefaults(), now: now, lastJmp: now()}
}

// expire drops retired epochs, wiping them. Caller holds mu.
func (k *Keyring) expire(now time.Time) {
	keep := k.epochs[:0]
	for _, e := range k.epochs {
		if !e.retireAt.IsZero() && !now.Before(e.retireAt) {
			e.Wipe()
			continue
		}
		keep = append(keep, e)
	}
	clear(k.epochs[len(keep):])
	k.epochs = keep
}

// Add makes ep the newest epoch (after msg4: the device on receiving it,
// the gateway on sending it). The older ones retire after RetireAfter; a
// fourth live epoch evicts the oldest at once.
func (k *Keyring) Add(ep *Epoch) {
	k.mu.Lock()
	defer k.mu.Unlock()
	now := k.now()
	k.expire(now)
	for _, e := range k.epochs {
		if e.retireAt.IsZero() {
			e.retireAt = now.Add(k.rot.RetireAfter)
		}
	}
	if len(k.epochs) == maxLive {
		k.epochs[0].Wipe()
		k.epochs = append(k.epochs[:0], k.epochs[1:]...)
	}
	k.epochs = append(k.epochs, &liveEpoch{Epoch: ep})
}

// Unconfirm makes the gateway wait for a new d2g envelope before it seals
// again: the device has a new connection, and may have restarted and lost
// every older kid.
func (k *Keyring) Unconfirm() {
	k.mu.Lock()
	defer k.mu.Unlock()
	for _, e := range k.epochs {
		e.confirmed = false
	}
}

// Live reports whether kid is a live key id here.
func (k *Keyring) Live(kid KID) bool {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.expire(k.now())
	return k.find(kid) != nil
}

// KIDs lists the live key ids, oldest first.
func (k *Keyring) KIDs() []KID {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.expire(k.now())
	out := make([]KID, len(k.epochs))
	for i, e := range k.epochs {
		out[i] = e.KID
	}
	return out
}

func (k *Keyring) find(kid KID) *liveEpoch {
	for _, e := range k.epochs {
		if e.KID == kid {
			return e
		}
	}
	return nil
}

// sender picks the epoch to seal under: the device's newest; the
// gateway's newest that the device has confirmed with a d2g envelope
// (FKX1.md, Cut-over). Caller holds mu.
func (k *Keyring) sender() *liveEpoch {
	for i := len(k.epochs) - 1; i >= 0; i-- {
		if e := k.epochs[i]; !k.gateway || e.confirmed {
			return e
		}
	}
	return nil
}

// Seal seals plaintext for channel under the sending epoch and returns
// the envelope and its kid. ErrNeedEpoch means a handshake must come
// first.
func (k *Keyring) Seal(channel string, plaintext []byte) ([]byte, KID, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.expire(k.now())
	e := k.sender()
	if e == nil {
		return nil, KID{}, ErrNoSendKey
	}
	env, err := e.Send.Seal(channel, plaintext)
	return env, e.KID, err
}

// Open opens an envelope under whichever live kid it names and marks it
// in that kid's window.
func (k *Keyring) Open(env []byte, channel string) ([]byte, KID, error) {
	pt, kid, seq, err := k.OpenPending(env, channel)
	if err == nil {
		k.Mark(kid, seq)
	}
	return pt, kid, err
}

// OpenPending opens an envelope without marking its seq; see
// Receiver.OpenPending. On the gateway, a verified d2g envelope confirms
// its epoch for sending.
func (k *Keyring) OpenPending(env []byte, channel string) ([]byte, KID, uint64, error) {
	kid, _, _, err := ParseHeader(env)
	if err != nil {
		return nil, kid, 0, err
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	k.expire(k.now())
	e := k.find(kid)
	if e == nil {
		return nil, kid, 0, ErrUnknownKID
	}
	pt, seq, err := e.Recv.OpenPending(env, channel)
	if err == nil && k.gateway {
		e.confirmed = true
	}
	return pt, kid, seq, err
}

// Mark marks seq in kid's window (a no-op if kid is no longer live).
func (k *Keyring) Mark(kid KID, seq uint64) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if e := k.find(kid); e != nil {
		e.Recv.Mark(seq)
	}
}

// Tick applies the clock: it retires epochs past their time and, every
// GenerationEvery, moves every live sender to its next generation (the
// time-based ratchet). It reports whether a new epoch is due: the newest
// is older than EpochEvery, or its sender has reached EpochAtSeq or can
// seal no more (NeedsEpoch), or there is none.
func (k *Keyring) Tick() (epochDue bool) {
	k.mu.Lock()
	defer k.mu.Unlock()
	now := k.now()
	k.expire(now)
	if now.Sub(k.lastJmp) >= k.rot.GenerationEvery {
		k.lastJmp = now
		for _, e := range k.epochs {
			if e.Send.Jump() != nil {
				epochDue = true
			}
		}
	}
	if len(k.epochs) == 0 {
		return true
	}
	newest := k.epochs[len(k.epochs)-1]
	return epochDue || now.Sub(newest.Started) >= k.rot.EpochEvery || newest.Send.Seq() >= k.rot.EpochAtSeq || newest.Send.NeedsEpoch()
}

// Newest returns the newest epoch's kid and when it started.
func (k *Keyring) Newest() (KID, time.Time, bool) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.expire(k.now())
	if len(k.epochs) == 0 {
		return KID{}, time.Time{}, false
	}
	e := k.epochs[len(k.epochs)-1]
	return e.KID, e.Started, true
}

// Wipe zeroes and drops every epoch.
func (k *Keyring) Wipe() {
	k.mu.Lock()
	defer k.mu.Unlock()
	for _, e := range k.epochs {
		e.Wipe()
	}
	k.epochs = nil
}
