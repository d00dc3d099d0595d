package agent

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"time"
)

// FullPolicy is what the outbox does with a new record when it is full.
type FullPolicy string

// The policies. Block is the default: the source waits (a stdin pipe
// stops being read, a command's output backs up), so nothing is lost.
const (
	Block      FullPolicy = "block"       // wait for room
	DropOldest FullPolicy = "drop-oldest" // evict the oldest unsent record
	Refuse     FullPolicy = "refuse"      // refuse the new record (ErrOutboxFull)
)

// ErrOutboxFull is returned by Add under the Refuse policy.
var ErrOutboxFull = errors.New("outbox full: the gateway is not acknowledging as fast as records arrive")

// Record is one telemetry record waiting for its PUBACK.
type Record struct {
	ID      uint64
	UnixMS  uint64
	Channel string
	Body    []byte
}

// OutboxOptions configure the outbox.
type OutboxOptions struct {
	// Max records held (sent or not) until acknowledged. Default 10,000.
	Max    int
	Policy FullPolicy
	// Disk keeps the records in outbox.log in the state directory, so an
	// agent restart resends what was not acknowledged. Writes reach the
	// file at once and are fsync'd every SyncEvery (default 100 ms).
	Disk      bool
	SyncEvery time.Duration
}

// Outbox holds records from Add until Ack, in record-id order. Records
// are handed out once per connection (Next); Rewind makes every
// unacknowledged one due again after a reconnect, to be sealed under the
// new key.
type Outbox struct {
	mu      sync.Mutex
	opts    OutboxOptions
	recs    []Record // unacknowledged, oldest first
	sent    int      // recs[:sent] were handed out on this connection
	next    uint64   // next record id
	reserve func(uint64) (uint64, error)
	limit   uint64 // ids below limit are reserved
	changed chan struct{}
	dropped int64
	log     *diskLog
	// full is told each time a record meets a full outbox (the agent logs
	// it, at most once a minute).
	full func(FullPolicy)
}

// newOutbox starts with record ids from first; reserve persists a new
// upper bound for ids and returns it.
func newOutbox(opts OutboxOptions, first uint64, reserve func(uint64) (uint64, error), disk *diskLog, pending []Record) *Outbox {
	if opts.Max <= 0 {
		opts.Max = 10_000
	}
	if opts.Policy == "" {
		opts.Policy = Block
	}
	o := &Outbox{opts: opts, next: first, limit: first, reserve: reserve, changed: make(chan struct{}), log: disk, recs: pending}
	for _, r := range pending {
		if r.ID >= o.next {
			o.next = r.ID + 1
		}
	}
	return o
}

// notify wakes whoever waits on Changed. Caller holds mu.
func (o *Outbox) notify() {
	close(o.changed)
	o.changed = make(chan struct{})
}

// Changed is closed at the next change (a record added or acknowledged).
func (o *Outbox) Changed() <-chan struct{} {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.changed
}

// Add queues a record for channel and returns its id.
func (o *Outbox) Add(ctx context.Context, channel string, body []byte, now time.Time) (uint64, error) {
	o.mu.Lock()
	for len(o.recs) >= o.opts.Max {
		if o.full != nil {
			o.full(o.opts.Policy)
		}
		switch o.opts.Policy {
		case Refuse:
			o.mu.Unlock()
			return 0, ErrOutboxFull
		case DropOldest:
			if o.sent < len(o.recs) {
				i := o.sent // the oldest not yet in flight
				o.recs = append(o.recs[:i], o.recs[i+1:]...)
				o.dropped++
				continue
			}
		}
		ch := o.changed
		o.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			return 0, ctx.Err()
		}
		o.mu.Lock()
	}
	defer o.mu.Unlock()
	if o.next >= o.limit {
		lim, err := o.reserve(o.next)
		if err != nil {
			return 0, fmt.Errorf("reserving record ids: %w", err)
		}
		o.limit = lim
	}
	r := Record{ID: o.next, UnixMS: uint64(now.UnixMilli()), Channel: channel, Body: append([]byte(nil), body...)}
	if o.log != nil {
		if err := o.log.append(r); err != nil {
			return 0, err
		}
	}
	o.next++
	o.recs = append(o.recs, r)
	o.notify()
	return r.ID, nil
}

// Next hands out the next record not yet sent on this connection.
func (o *Outbox) Next() (Record, bool) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.sent >= len(o.recs) {
		return Record{}, false
	}
	r := o.recs[o.sent]
	o.sent++
	return r, true
}

// Unnext gives back the record Next handed out last, unsent.
func (o *Outbox) Unnext() {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.sent > 0 {
		o.sent--
	}
}

// Ack drops record id (and, ids rising, any older one still held).
func (o *Outbox) Ack(id uint64) {
	o.mu.Lock()
	defer o.mu.Unlock()
	n := 0
	for n < len(o.recs) && o.recs[n].ID <= id {
		n++
	}
	if n == 0 {
		return
	}
	o.recs = append(o.recs[:0], o.recs[n:]...)
	o.sent = max(o.sent-n, 0)
	if o.log != nil {
		o.log.acked(id, len(o.recs))
	}
	o.notify()
}

// Rewind makes every unacknowledged record due again (a new connection).
func (o *Outbox) Rewind() {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.sent = 0
	o.notify()
}

// Len is the number of records not yet acknowledged.
func (o *Outbox) Len() int {
	o.mu.Lock()
	defer o.mu.Unlock()
	return len(o.recs)
}

// Dropped counts records evicted under DropOldest.
func (o *Outbox) Dropped() int64 {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.dropped
}

// ---------------------------------------------------------------------------
// The on-disk outbox: an append-only log of records, and acknowledgements
// as markers in the same log. On open, the records after the last marker
// for them are pending again; the file is rewritten when everything in it
// is acknowledged.
//
//	record: 'R' ‖ u64 id ‖ u64 unix_ms ‖ u16 len(channel) ‖ channel ‖ u32 len(body) ‖ body
//	ack:    'A' ‖ u64 id

const maxDiskBody = 1 << 20

type diskLog struct {
	mu      sync.Mutex
	f       *os.File
	w       *bufio.Writer
	dirty   bool
	stop    chan struct{}
	stopped chan struct{}
	syncErr error
}

func openDiskLog(path string, every time.Duration) (*diskLog, []Record, error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, nil, err
	}
	pending, good, err := readDiskLog(f)
	if err != nil {
		f.Close()
		return nil, nil, fmt.Errorf("%s: %w", path, err)
	}
	if err := f.Truncate(good); err != nil {
		f.Close()
		return nil, nil, err
	}
	if _, err := f.Seek(good, io.SeekStart); err != nil {
		f.Close()
		return nil, nil, err
	}
	if every == 0 {
		every = 100 * time.Millisecond
	}
	d := &diskLog{f: f, w: bufio.NewWriter(f), stop: make(chan struct{}), stopped: make(chan struct{})}
	go d.syncLoop(every)
	return d, pending, nil
}

func readDiskLog(f *os.File) ([]Record, int64, error) {
	r := bufio.NewReader(f)
	var pending []Record
	var good int64
	for {
		kind, err := r.ReadByte()
		if err != nil {
			return pending, good, nil // end, or a torn tail
		}
		if kind != 'A' && kind != 'R' {
			return nil, 0, fmt.Errorf("unknown entry 0x%02x at byte %d; the file is damaged (move it aside to start an empty outbox)", kind, good)
		}
		var hdr [8]byte
		if _, err := io.ReadFull(r, hdr[:]); err != nil {
			return pending, good, nil
		}
		id := binary.BigEndian.Uint64(hdr[:])
		switch kind {
		case 'A':
			n := 0
			for n < len(pending) && pending[n].ID <= id {
				n++
			}
			pending = pending[n:]
			good += 9
		case 'R':
			var b [10]byte
			if _, err := io.ReadFull(r, b[:]); err != nil {
				return pending, good, nil
			}
			rec := Record{ID: id, UnixMS: binary.BigEndian.Uint64(b[:8])}
			ch := make([]byte, binary.BigEndian.Uint16(b[8:]))
			if _, err := io.ReadFull(r, ch); err != nil {
				return pending, good, nil
			}
			var l [4]byte
			if _, err := io.ReadFull(r, l[:]); err != nil {
				return pending, good, nil
			}
			n := binary.BigEndian.Uint32(l[:])
			if n > maxDiskBody {
				return nil, 0, fmt.Errorf("a record of %d bytes; the file is damaged", n)
			}
			rec.Body = make([]byte, n)
			if _, err := io.ReadFull(r, rec.Body); err != nil {
				return pending, good, nil
			}
			rec.Channel = string(ch)
			pending = append(pending, rec)
			good += int64(1 + 8 + 10 + len(ch) + 4 + int(n))
		}
	}
}

func (d *diskLog) append(r Record) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.syncErr != nil {
		return d.syncErr
	}
	if len(r.Body) > maxDiskBody {
		return fmt.Errorf("record of %d bytes; the outbox keeps at most %d", len(r.Body), maxDiskBody)
	}
	var b [19]byte
	b[0] = 'R'
	binary.BigEndian.PutUint64(b[1:], r.ID)
	binary.BigEndian.PutUint64(b[9:], r.UnixMS)
	binary.BigEndian.PutUint16(b[17:], uint16(len(r.Channel)))
	d.w.Write(b[:])
	d.w.WriteString(r.Channel)
	var l [4]byte
	binary.BigEndian.PutUint32(l[:], uint32(len(r.Body)))
	d.w.Write(l[:])
	d.w.Write(r.Body)
	d.dirty = true
	return d.w.Flush()
}

// acked records an acknowledgement; with nothing left pending, the file
// starts over.
func (d *diskLog) acked(id uint64, remaining int) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if remaining == 0 {
		if d.w.Flush() == nil && d.f.Truncate(0) == nil {
			_, _ = d.f.Seek(0, io.SeekStart)
			d.w.Reset(d.f)
			d.dirty = true
			return
		}
	}
	var b [9]byte
	b[0] = 'A'
	binary.BigEndian.PutUint64(b[1:], id)
	d.w.Write(b[:])
	d.dirty = true
}

func (d *diskLog) syncLoop(every time.Duration) {
	defer close(d.stopped)
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-d.stop:
			d.flush()
			return
		case <-t.C:
			d.flush()
		}
	}
}

func (d *diskLog) flush() {
	d.mu.Lock()
	defer d.mu.Unlock()
	if !d.dirty {
		return
	}
	d.dirty = false
	if err := d.w.Flush(); err != nil {
		d.syncErr = err
		return
	}
	if err := d.f.Sync(); err != nil {
		d.syncErr = err
	}
}

func (d *diskLog) close() error {
	close(d.stop)
	<-d.stopped
	return d.f.Close()
}
