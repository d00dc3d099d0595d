package agent

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"
)

func memOutbox(opts OutboxOptions) *Outbox {
	return newOutbox(opts, 1, func(n uint64) (uint64, error) { return n + 100, nil }, nil, nil)
}

func TestOutboxOrderAckRewind(t *testing.T) {
	o := memOutbox(OutboxOptions{Max: 10})
	ctx := context.Background()
	for i := 0; i < 3; i++ {
		if _, err := o.Add(ctx, "telemetry", []byte{byte(i)}, time.Now()); err != nil {
			t.Fatal(err)
		}
	}
	r1, _ := o.Next()
	r2, _ := o.Next()
	if r1.ID != 1 || r2.ID != 2 {
		t.Fatalf("ids %d %d", r1.ID, r2.ID)
	}
	o.Ack(1)
	// A reconnect: what is not acknowledged is due again, in order.
	o.Rewind()
	if r, _ := o.Next(); r.ID != 2 {
		t.Fatalf("after rewind: %d", r.ID)
	}
	if r, _ := o.Next(); r.ID != 3 {
		t.Fatalf("after rewind: %d", r.ID)
	}
	if _, ok := o.Next(); ok {
		t.Fatal("handed out a record twice on one connection")
	}
	o.Ack(3) // ids rise: 2 went with it
	if o.Len() != 0 {
		t.Fatalf("%d left", o.Len())
	}
}

func TestOutboxFullPolicies(t *testing.T) {
	ctx := context.Background()
	// refuse
	o := memOutbox(OutboxOptions{Max: 2, Policy: Refuse})
	var told int
	o.full = func(FullPolicy) { told++ }
	o.Add(ctx, "t", nil, time.Now())
	o.Add(ctx, "t", nil, time.Now())
	if _, err := o.Add(ctx, "t", nil, time.Now()); !errors.Is(err, ErrOutboxFull) || told != 1 {
		t.Fatalf("refuse: %v, told %d", err, told)
	}
	// drop-oldest: the oldest not in flight goes
	o = memOutbox(OutboxOptions{Max: 2, Policy: DropOldest})
	o.Add(ctx, "t", []byte("a"), time.Now())
	o.Add(ctx, "t", []byte("b"), time.Now())
	o.Next() // "a" is in flight
	if _, err := o.Add(ctx, "t", []byte("c"), time.Now()); err != nil {
		t.Fatal(err)
	}
	if o.Dropped() != 1 {
		t.Fatalf("dropped %d", o.Dropped())
	}
	if r, _ := o.Next(); string(r.Body) != "c" {
		t.Fatalf("next after a drop: %q", r.Body)
	}
	// block: Add waits for room, and gives up with its context
	o = memOutbox(OutboxOptions{Max: 1})
	o.Add(ctx, "t", nil, time.Now())
	short, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
	defer cancel()
	if _, err := o.Add(short, "t", nil, time.Now()); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("block: %v", err)
	}
	done := make(chan error, 1)
	go func() { _, err := o.Add(ctx, "t", nil, time.Now()); done <- err }()
	r, _ := o.Next()
	o.Ack(r.ID)
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Add did not resume once there was room")
	}
}

func TestDiskOutboxSurvivesRestart(t *testing.T) {
	path := filepath.Join(t.TempDir(), OutboxFile)
	d, pending, err := openDiskLog(path, time.Millisecond)
	if err != nil || len(pending) != 0 {
		t.Fatal(err, pending)
	}
	o := newOutbox(OutboxOptions{Max: 10, Disk: true}, 1, func(n uint64) (uint64, error) { return n + 100, nil }, d, nil)
	ctx := context.Background()
	for _, b := range []string{"one", "two", "three"} {
		o.Add(ctx, "telemetry", []byte(b), time.Now())
	}
	o.Ack(1)
	d.close()
	// A torn tail from a crash mid-write is ignored.
	f, _ := os.OpenFile(path, os.O_APPEND|os.O_WRONLY, 0)
	f.Write([]byte{'R', 0, 0, 0})
	f.Close()
	d, pending, err = openDiskLog(path, time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	defer d.close()
	if len(pending) != 2 || string(pending[0].Body) != "two" || pending[1].ID != 3 || pending[1].Channel != "telemetry" {
		t.Fatalf("pending after restart: %+v", pending)
	}
	o = newOutbox(OutboxOptions{Max: 10, Disk: true}, 1, func(n uint64) (uint64, error) { return n + 100, nil }, d, pending)
	if id, _ := o.Add(ctx, "telemetry", []byte("four"), time.Now()); id != 4 {
		t.Fatalf("next id after restart: %d", id)
	}
	// Everything acknowledged: the file starts over.
	o.Ack(4)
	d.flush()
	if fi, _ := os.Stat(path); fi.Size() != 0 {
		t.Fatalf("file of %d bytes with nothing pending", fi.Size())
	}
	// A damaged file is refused with a clear error.
	bad := filepath.Join(t.TempDir(), OutboxFile)
	os.WriteFile(bad, []byte("Zgarbage"), 0o600)
	if _, _, err := openDiskLog(bad, 0); err == nil {
		t.Fatal("opened a damaged outbox")
	}
}
