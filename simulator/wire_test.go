package simulator

import (
	"bufio"
	"bytes"
	"strings"
	"testing"
)

// TestWire: packets written and read back, and what a broker may not send.
func TestWire(t *testing.T) {
	read := func(b []byte) (packet, error) { return readPacket(bufio.NewReader(bytes.NewReader(b))) }
	p, err := read(publishPacket("devices/d/down/x", []byte("body"), 1, 7))
	if err != nil {
		t.Fatal(err)
	}
	topic, qos, pid, payload, err := p.publish()
	if err != nil || topic != "devices/d/down/x" || qos != 1 || pid != 7 || string(payload) != "body" {
		t.Fatalf("%q %d %d %q %v", topic, qos, pid, payload, err)
	}
	// A body across several reads comes back whole.
	big := bytes.Repeat([]byte{'x'}, 10_000)
	if p, err := read(publishPacket("t", big, 0, 0)); err != nil || !bytes.HasSuffix(p.body, big) {
		t.Fatalf("a 10 KB publish: %v", err)
	}
	if p, err := read([]byte{pktConnack << 4, 2, 0, 5}); err != nil {
		t.Fatal(err)
	} else if code, err := p.connackCode(); err != nil || code != 5 || !strings.Contains(connackReason(code), "not authorized") {
		t.Fatalf("connack: %d %v", code, err)
	}
	for name, c := range map[string]struct {
		in   []byte
		want string
	}{
		"length-5-bytes": {[]byte{pktPublish << 4, 0xff, 0xff, 0xff, 0xff, 0x01}, "malformed remaining length"},
		"too-large":      {append([]byte{pktPublish << 4}, appendVarint(nil, maxPacket+1)...), "limit"},
		"truncated":      {[]byte{pktPublish << 4, 10, 0, 1}, "EOF"},
	} {
		if _, err := read(c.in); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v; want %q", name, err, c.want)
		}
	}
	for name, body := range map[string][]byte{"empty": {}, "topic-cut": {0, 9, 'a'}, "no-packet-id": {0, 1, 'a'}} {
		if _, _, _, _, err := (packet{typ: pktPublish, flags: 2, body: body}).publish(); err == nil {
			t.Errorf("%s: a malformed PUBLISH was accepted", name)
		}
	}
	if _, err := (packet{typ: pktSuback, body: []byte{0, 1}}).connackCode(); err == nil {
		t.Error("a SUBACK was taken for a CONNACK")
	}
}
