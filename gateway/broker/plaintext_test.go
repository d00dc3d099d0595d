package broker

import (
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"fleetkey.dev/certs/identity"
)

// TestPlaintextTelemetry: with fkx1 off, a device's records go as they
// are to fleet/telemetry/, in order and all of them, to a single service
// subscriber that reads slowly (the relay waits for its room instead of
// dropping what the gateway acknowledged); a command goes as it is to the
// device; and the kex topic is refused.
func TestPlaintextTelemetry(t *testing.T) {
	e := startWith(t, nil, func(o *Options) { o.PlaintextTelemetry = true })
	svc := e.mustConnect(e.leaf(e.issuer, identity.RoleService, "ingest"), "ingest")
	dev := e.mustConnect(e.leaf(e.issuer, identity.RoleDevice, "dev-1"), "dev-1")

	const n = 2000
	var mu sync.Mutex
	var got []string
	done := make(chan struct{})
	tok := svc.Subscribe("fleet/telemetry/#", 1, func(_ paho.Client, m paho.Message) {
		time.Sleep(100 * time.Microsecond) // a slow consumer, not a wait: each message costs it time
		mu.Lock()
		defer mu.Unlock()
		got = append(got, m.Topic()+" "+string(m.Payload()))
		if len(got) == n {
			close(done)
		}
	})
	if !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		t.Fatal(tok.Error())
	}
	var last paho.Token
	for i := range n {
		last = dev.Publish("devices/dev-1/up/temp", 1, false, fmt.Sprint(i))
	}
	if !last.WaitTimeout(30 * time.Second) {
		t.Fatal("the last record was not acknowledged")
	}
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		mu.Lock()
		t.Fatalf("the service received %d of %d records", len(got), n)
	}
	mu.Lock()
	for i, g := range got {
		if want := fmt.Sprintf("fleet/telemetry/dev-1/temp %d", i); g != want {
			mu.Unlock()
			t.Fatalf("record %d: %q, want %q", i, g, want)
		}
	}
	mu.Unlock()

	cmds := make(chan string, 1)
	if tok := dev.Subscribe("devices/dev-1/down/+", 1, func(_ paho.Client, m paho.Message) { cmds <- string(m.Payload()) }); !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		t.Fatal(tok.Error())
	}
	svc.Publish("fleet/commands/dev-1/reboot", 1, false, "now").WaitTimeout(5 * time.Second)
	select {
	case c := <-cmds:
		if c != "now" {
			t.Fatalf("command %q", c)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the command did not reach the device")
	}

	// fkx1 is off: a handshake message is refused (3.1.1: the connection
	// is closed) and counted.
	dev.Publish("devices/dev-1/kex/req", 1, false, []byte{1, 1})
	waitFor(t, "the kex refusal", func() bool { return e.b.Stats().Refusals()[[2]string{"fkx1", "plaintext-mode"}] == 1 })
}

// TestPlaintextExcludesSessions: plaintext telemetry and fkx1 sessions are
// one or the other.
func TestPlaintextExcludesSessions(t *testing.T) {
	_, _, opts := gatewayOptions(t)
	opts.PlaintextTelemetry, opts.Sessions = true, &Sessions{}
	_, err := New(opts)
	if err == nil || !strings.Contains(err.Error(), "exclude each other") {
		t.Fatalf("both at once: %v", err)
	}
}
