package broker

import (
	"crypto/tls"
	"io"
	"net"
	"testing"
	"time"

	"fleetkey.dev/certs/identity"
)

// FuzzConnection feeds arbitrary bytes, after a good CONNECT over a real
// TLS session, through the gateway's own connection handling (handshake,
// deadlines, recover) into mochi's decoder. A panic that escaped would
// kill the fuzzing process; the gateway must also still serve afterwards.
// The first input byte picks MQTT 3.1.1 (even) or 5 (odd).
func FuzzConnection(f *testing.F) {
	for _, seed := range [][]byte{
		{1, 0x82, 0x06, 0x00, 0x17, 0x00, 0x00, 0x01, 0x61}, // the SUBSCRIBE that crashes bare mochi v2.7.9
		{1, 0x82, 0x03, 0x00, 0x01, 0x05},
		{0, 0x82, 0x02, 0x00, 0x01},
		{0, 0x30, 0x02, 0x00, 0x09},
		{1, 0x30, 0x05, 0x00, 0x01, 'a', 0x09, 0x26},
		{0, 0xc0, 0x00}, // PINGREQ
		{0, 0xe0, 0x00}, // DISCONNECT
	} {
		f.Add(seed)
	}
	e := startFuzz(f)
	cert := e.leaf(e.issuer, identity.RoleDevice, "dev-f")
	l := &listener{b: e.b, id: "fuzz"}
	if err := l.Init(nil); err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		if len(in) == 0 {
			return
		}
		client, server := net.Pipe()
		done := make(chan struct{})
		go func() {
			defer close(done)
			l.handle(server, e.b.mqtt.EstablishConnection)
		}()
		tc := tls.Client(client, e.tlsConfig(&cert))
		// Close the pipe, not the TLS session: close_notify would block on a
		// net.Pipe nobody reads.
		defer client.Close()
		_ = tc.SetDeadline(time.Now().Add(5 * time.Second))
		if err := tc.Handshake(); err != nil {
			t.Fatalf("handshake: %v", err)
		}
		level, props := byte(4), []byte{}
		if in[0]&1 == 1 {
			level, props = 5, []byte{0}
		}
		body := append([]byte{0, 4, 'M', 'Q', 'T', 'T', level, 0x02, 0, 30}, props...)
		body = append(body, 0, 5, 'd', 'e', 'v', '-', 'f')
		if _, err := tc.Write(append([]byte{0x10, byte(len(body))}, body...)); err != nil {
			t.Fatal(err)
		}
		ack := make([]byte, 4)
		if _, err := io.ReadFull(tc, ack); err != nil {
			t.Fatalf("CONNACK: %v", err)
		}
		_, _ = tc.Write(in[1:])
		client.Close()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Fatal("the connection's goroutine did not end")
		}
	})
}
