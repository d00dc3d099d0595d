package sink

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"
)

func submitAll(t *testing.T, s *Sink, recs []Record) []Result {
	t.Helper()
	res := make([]Result, len(recs))
	var wg sync.WaitGroup
	wg.Add(len(recs))
	for i, r := range recs {
		if err := s.Submit(context.Background(), r, func(x Result) { res[i] = x; wg.Done() }); err != nil {
			t.Fatal(err)
		}
	}
	waitGroup(t, &wg)
	return res
}

func waitGroup(t *testing.T, wg *sync.WaitGroup) {
	t.Helper()
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("callbacks did not all run")
	}
}

type line struct {
	Device   string `json:"device"`
	Channel  string `json:"channel"`
	RecordID uint64 `json:"record_id"`
	UnixMS   uint64 `json:"unix_ms"`
	Body     string `json:"body"`
	BodyB64  []byte `json:"body_b64"`
}

func readLines(t *testing.T, path string) []line {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var out []line
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		var l line
		if err := json.Unmarshal(sc.Bytes(), &l); err != nil {
			t.Fatalf("line %q: %v", sc.Text(), err)
		}
		out = append(out, l)
	}
	return out
}

func TestWriteDedupeAndRecover(t *testing.T) {
	path := filepath.Join(t.TempDir(), "telemetry.jsonl")
	s, err := Open(path, Options{})
	if err != nil {
		t.Fatal(err)
	}
	res := submitAll(t, s, []Record{
		{Device: "d1", Channel: "telemetry", RecordID: 1, UnixMS: 10, Body: []byte(`{"t":21.5}`)},
		{Device: "d1", Channel: "telemetry", RecordID: 2, Body: []byte{0xff, 0}},
		{Device: "d1", Channel: "telemetry", RecordID: 2, Body: []byte("again")}, // a retransmission
		{Device: "d2", Channel: "telemetry", RecordID: 1, Body: []byte("x\n\"y")},
	})
	if res[0].Err != nil || res[0].Duplicate || !res[2].Duplicate || res[3].Duplicate {
		t.Fatalf("results: %+v", res)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	lines := readLines(t, path)
	if len(lines) != 3 || lines[0].Body != `{"t":21.5}` || string(lines[1].BodyB64) != "\xff\x00" || lines[2].Body != "x\n\"y" {
		t.Fatalf("file: %+v", lines)
	}

	// A crash in the middle of a write leaves a torn line: it is cut off,
	// and the ids written before survive for deduplication.
	f, _ := os.OpenFile(path, os.O_APPEND|os.O_WRONLY, 0)
	f.WriteString(`{"device":"d1","channel":"telemetry","record_id":3,"unix`)
	f.Close()
	s, err = Open(path, Options{})
	if err != nil {
		t.Fatal(err)
	}
	res = submitAll(t, s, []Record{
		{Device: "d1", Channel: "telemetry", RecordID: 2},
		{Device: "d1", Channel: "telemetry", RecordID: 3, Body: []byte("three")},
		{Device: "d2", Channel: "telemetry", RecordID: 1},
	})
	if !res[0].Duplicate || res[1].Duplicate || !res[2].Duplicate {
		t.Fatalf("after restart: %+v", res)
	}
	s.Close()
	lines = readLines(t, path)
	if len(lines) != 4 || lines[3].RecordID != 3 || lines[3].Body != "three" {
		t.Fatalf("file after recovery: %+v", lines)
	}
}

func TestRefusesAForeignFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "notes.txt")
	os.WriteFile(path, []byte("hello\nworld\n"), 0o600)
	if _, err := Open(path, Options{}); err == nil {
		t.Fatal("opened a file that is not a telemetry sink")
	}
}

// failingFile fails its writes or syncs on demand.
type failingFile struct {
	*os.File
	mu       sync.Mutex
	failSync bool
	block    chan struct{}
}

func (f *failingFile) Sync() error {
	if f.block != nil {
		<-f.block
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.failSync {
		return errors.New("disk full")
	}
	return f.File.Sync()
}

func TestFailedWriteIsNotDurable(t *testing.T) {
	path := filepath.Join(t.TempDir(), "telemetry.jsonl")
	osf, _ := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	ff := &failingFile{File: osf}
	s, err := New(ff, Options{})
	if err != nil {
		t.Fatal(err)
	}
	submitAll(t, s, []Record{{Device: "d", Channel: "c", RecordID: 1}})
	ff.mu.Lock()
	ff.failSync = true
	ff.mu.Unlock()
	res := submitAll(t, s, []Record{{Device: "d", Channel: "c", RecordID: 2}})
	if res[0].Err == nil {
		t.Fatal("a failed fsync reported success")
	}
	ff.mu.Lock()
	ff.failSync = false
	ff.mu.Unlock()
	// The same record again is not a duplicate: it was never stored.
	res = submitAll(t, s, []Record{{Device: "d", Channel: "c", RecordID: 2}})
	if res[0].Err != nil || res[0].Duplicate {
		t.Fatalf("retry after a failure: %+v", res[0])
	}
	s.Close()
	if lines := readLines(t, path); len(lines) != 2 {
		t.Fatalf("%d lines; want 2 (the failed write cut back)", len(lines))
	}
}

func TestSlowFileBlocksSubmit(t *testing.T) {
	path := filepath.Join(t.TempDir(), "telemetry.jsonl")
	osf, _ := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	ff := &failingFile{File: osf, block: make(chan struct{})}
	s, err := New(ff, Options{QueueSize: 4, MaxBatch: 2})
	if err != nil {
		t.Fatal(err)
	}
	var acked sync.WaitGroup
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	// The writer holds one batch in Sync; the queue takes 4 more; then
	// Submit must block rather than drop.
	n := 0
	blocked := make(chan int)
	go func() {
		for i := 1; ; i++ {
			acked.Add(1)
			short, c := context.WithTimeout(ctx, 200*time.Millisecond)
			err := s.Submit(short, Record{Device: "d", Channel: "c", RecordID: uint64(i)}, func(Result) { acked.Done() })
			c()
			if err != nil {
				acked.Done()
				blocked <- i - 1
				return
			}
		}
	}()
	n = <-blocked
	if n > 2+4+2 {
		t.Fatalf("Submit accepted %d records while the file was stuck", n)
	}
	close(ff.block)
	waitGroup(t, &acked)
	s.Close()
	if lines := readLines(t, path); len(lines) != n {
		t.Fatalf("%d lines for %d accepted records", len(lines), n)
	}
}
