// Package sink is the gateway's durable record of decrypted telemetry: a
// JSON-lines file, appended with group commit (one write and one fsync per
// burst), that deduplicates on each device's record id.
//
// A record is durable once its batch's fsync returns; only then is its
// callback run, and the gateway sends the device's PUBACK from there. The
// callbacks run in submission order on one goroutine of their own, so the
// next batch is written while the last one is being delivered. When the
// file or the callbacks are slow, Submit blocks: that is the backpressure
// that slows publishers down instead of dropping what they sent.
//
// Record ids rise strictly per device (FKX1.md, Records), and the gateway
// hands records to the sink in the order each device sent them, so a
// record whose id is not above the highest one stored for its device is a
// duplicate (a retransmission after a lost PUBACK or a reconnect): it is
// not written again, and its callback reports it as such once everything
// before it is durable. The highest ids are rebuilt from the file at Open,
// so this holds across a crash. A torn last line (a crash in the middle of
// a write) is cut off at Open: its record was never acknowledged, and the
// device sends it again.
package sink

import (
	"bufio"
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"
)

// Record is one decrypted telemetry record.
type Record struct {
	Device   string
	Channel  string
	RecordID uint64
	UnixMS   uint64 // the device's timestamp
	Body     []byte
}

// Result is what became of a submitted record.
type Result struct {
	// Duplicate: an earlier copy is already durable; nothing was written.
	Duplicate bool
	// Err: the record could not be made durable; it must not be
	// acknowledged.
	Err error
}

// File is what the sink writes to; *os.File is one.
type File interface {
	io.Writer
	Sync() error
	Truncate(size int64) error
	Seek(offset int64, whence int) (int64, error)
	Close() error
}

// Options tune the sink; zero values are the defaults.
type Options struct {
	// MaxBatch bounds the records in one write and fsync. Default 1024.
	MaxBatch int
	// QueueSize bounds the records waiting to be written; Submit blocks
	// beyond it. Default 4096.
	QueueSize int
	// Now stamps each line's received_ms. Default time.Now.
	Now func() time.Time
}

// Stats counts what the sink did.
type Stats struct {
	Written, Duplicates, Failed, Batches atomic.Int64
}

type item struct {
	rec  Record
	done func(Result)
	res  Result
}

// Sink is a JSON-lines sink. Submit is safe for concurrent use.
type Sink struct {
	f       File
	opts    Options
	size    int64
	highest map[string]uint64 // writer goroutine only (after Open)
	queue   chan item
	batches chan []item
	// free returns delivered batches to the writer: a batch slice is
	// reused, not grown anew for every group commit.
	free   chan []item
	stats  Stats
	mu     sync.RWMutex // guards closed against Submit
	closed bool
	wg     sync.WaitGroup
}

// MaxLine bounds one line of the file when it is read back (a 64 KiB body
// in base64 and its fields fit well inside).
const MaxLine = 1 << 20

// Open opens (or creates) the sink file at path, cuts off a torn last
// line, and rebuilds each device's highest record id from it.
func Open(path string, opts Options) (*Sink, error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o640)
	if err != nil {
		return nil, fmt.Errorf("opening the telemetry sink: %w", err)
	}
	s, err := New(f, opts)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("telemetry sink %s: %w", path, err)
	}
	return s, nil
}

// New starts a sink over f, which holds what earlier runs wrote.
func New(f File, opts Options) (*Sink, error) {
	if opts.MaxBatch <= 0 {
		opts.MaxBatch = 1024
	}
	if opts.QueueSize <= 0 {
		opts.QueueSize = 4096
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	s := &Sink{f: f, opts: opts, highest: map[string]uint64{}, queue: make(chan item, opts.QueueSize), batches: make(chan []item, 2), free: make(chan []item, 4)}
	if err := s.recover(); err != nil {
		return nil, err
	}
	s.wg.Add(2)
	go s.writer()
	go s.deliverer()
	return s, nil
}

// recover reads the file back: the highest record id per device, and the
// length of the last complete line, where a torn tail is cut off.
func (s *Sink) recover() error {
	if _, err := s.f.Seek(0, io.SeekStart); err != nil {
		return err
	}
	r := bufio.NewReaderSize(readerOf(s.f), 64<<10)
	var good int64
	var line struct {
		Device   string `json:"device"`
		RecordID uint64 `json:"record_id"`
	}
	for n := 1; ; n++ {
		b, err := r.ReadSlice('\n')
		if errors.Is(err, bufio.ErrBufferFull) {
			b, err = readLongLine(r, b)
		}
		if errors.Is(err, io.EOF) {
			break // b, if any, is a torn tail
		}
		if err != nil {
			return err
		}
		line.Device, line.RecordID = "", 0
		if err := json.Unmarshal(b, &line); err != nil || line.Device == "" {
			return fmt.Errorf("line %d is not a telemetry record (%v); move the file aside to start a new one", n, err)
		}
		if line.RecordID > s.highest[line.Device] {
			s.highest[line.Device] = line.RecordID
		}
		good += int64(len(b))
	}
	if err := s.f.Truncate(good); err != nil {
		return err
	}
	if _, err := s.f.Seek(good, io.SeekStart); err != nil {
		return err
	}
	s.size = good
	return nil
}

func readLongLine(r *bufio.Reader, first []byte) ([]byte, error) {
	buf := append([]byte(nil), first...)
	for {
		b, err := r.ReadSlice('\n')
		buf = append(buf, b...)
		if len(buf) > MaxLine {
			return nil, fmt.Errorf("a line longer than %d bytes", MaxLine)
		}
		if !errors.Is(err, bufio.ErrBufferFull) {
			return buf, err
		}
	}
}

func readerOf(f File) io.Reader {
	if r, ok := f.(io.Reader); ok {
		return r
	}
	return bytes.NewReader(nil)
}

// ErrClosed is returned by Submit after Close.
var ErrClosed = errors.New("telemetry sink closed")

// Submit queues rec; done is called once with its result, after
// everything submitted before it. It blocks while the queue is full, until
// ctx ends.
func (s *Sink) Submit(ctx context.Context, rec Record, done func(Result)) error {
	s.mu.RLock()
	defer s.mu.RUnlock()
	if s.closed {
		return ErrClosed
	}
	select {
	case s.queue <- item{rec: rec, done: done}:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Stats returns the counters.
func (s *Sink) Stats() *Stats { return &s.stats }

// Close writes what is queued, runs every callback and closes the file.
func (s *Sink) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	close(s.queue)
	s.mu.Unlock()
	s.wg.Wait()
	return s.f.Close()
}

func (s *Sink) writer() {
	defer s.wg.Done()
	defer close(s.batches)
	var buf []byte
	for first := range s.queue {
		var batch []item
		select {
		case batch = <-s.free:
		default:
		}
		batch = append(batch[:0], first)
	fill:
		for len(batch) < s.opts.MaxBatch {
			select {
			case it, ok := <-s.queue:
				if !ok {
					break fill
				}
				batch = append(batch, it)
			default:
				break fill
			}
		}
		buf = s.writeBatch(batch, buf[:0])
		s.batches <- batch
	}
}

// writeBatch appends the batch's new records with one write and one
// fsync. On failure the file is cut back to where it was, and every record
// of the batch fails.
func (s *Sink) writeBatch(batch []item, buf []byte) []byte {
	now := s.opts.Now().UnixMilli()
	var raised map[string]uint64
	for i := range batch {
		it := &batch[i]
		if it.rec.RecordID <= s.highest[it.rec.Device] || it.rec.RecordID <= raised[it.rec.Device] {
			it.res.Duplicate = true
			continue
		}
		if raised == nil {
			raised = map[string]uint64{}
		}
		raised[it.rec.Device] = it.rec.RecordID
		buf = appendLine(buf, &it.rec, now)
	}
	if len(buf) > 0 {
		_, err := s.f.Write(buf)
		if err == nil {
			err = s.f.Sync()
		}
		if err != nil {
			err = fmt.Errorf("telemetry sink: %w", err)
			_ = s.f.Truncate(s.size)
			_, _ = s.f.Seek(s.size, io.SeekStart)
			for i := range batch {
				if !batch[i].res.Duplicate {
					batch[i].res.Err = err
				}
			}
			return buf
		}
		s.size += int64(len(buf))
		for d, id := range raised {
			s.highest[d] = id
		}
		s.stats.Batches.Add(1)
	}
	return buf
}

func (s *Sink) deliverer() {
	defer s.wg.Done()
	for batch := range s.batches {
		for _, it := range batch {
			switch {
			case it.res.Err != nil:
				s.stats.Failed.Add(1)
			case it.res.Duplicate:
				s.stats.Duplicates.Add(1)
			default:
				s.stats.Written.Add(1)
			}
			if it.done != nil {
				it.done(it.res)
			}
		}
		clear(batch) // drop the records and callbacks it holds
		select {
		case s.free <- batch[:0]:
		default:
		}
	}
}

// appendLine encodes one record as a JSON line. The body is a JSON string
// when it is valid UTF-8, and base64 (body_b64) otherwise.
func appendLine(dst []byte, r *Record, receivedMS int64) []byte {
	dst = append(dst, `{"device":`...)
	dst = appendString(dst, r.Device)
	dst = append(dst, `,"channel":`...)
	dst = appendString(dst, r.Channel)
	dst = append(dst, `,"record_id":`...)
	dst = strconv.AppendUint(dst, r.RecordID, 10)
	dst = append(dst, `,"unix_ms":`...)
	dst = strconv.AppendUint(dst, r.UnixMS, 10)
	dst = append(dst, `,"received_ms":`...)
	dst = strconv.AppendInt(dst, receivedMS, 10)
	if utf8.Valid(r.Body) {
		dst = appendString(append(dst, `,"body":`...), string(r.Body))
	} else {
		dst = append(dst, `,"body_b64":"`...)
		dst = base64.StdEncoding.AppendEncode(dst, r.Body)
		dst = append(dst, '"')
	}
	return append(dst, "}\n"...)
}

// appendString appends s as a JSON string: as it is when it needs no
// escaping (ids, channels, most telemetry), else through encoding/json.
func appendString(dst []byte, s string) []byte {
	for i := 0; i < len(s); i++ {
		if c := s[i]; c < 0x20 || c >= 0x7f || c == '"' || c == '\\' || c == '<' || c == '>' || c == '&' {
			b, _ := json.Marshal(s) // a string always encodes
			return append(dst, b...)
		}
	}
	dst = append(dst, '"')
	dst = append(dst, s...)
	return append(dst, '"')
}
