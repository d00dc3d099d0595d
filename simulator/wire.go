package simulator

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"slices"
)

// The few MQTT 3.1.1 packets a virtual device speaks. A real client
// (paho) costs about 200 KB per connection in goroutines and buffers; a
// fleet of 10,000 on one small box needs each device to cost a tenth of
// that, so the simulator writes its packets itself.
const (
	pktConnect   = 1
	pktConnack   = 2
	pktPublish   = 3
	pktPuback    = 4
	pktSubscribe = 8
	pktSuback    = 9
	pktPingreq   = 12
	pktPingresp  = 13
)

// maxPacket bounds what a virtual device accepts from a broker.
const maxPacket = 64 << 10

func appendVarint(b []byte, n int) []byte {
	for {
		c := byte(n % 128)
		n /= 128
		if n > 0 {
			c |= 0x80
		}
		b = append(b, c)
		if n == 0 {
			return b
		}
	}
}

func appendString(b []byte, s string) []byte {
	b = binary.BigEndian.AppendUint16(b, uint16(len(s)))
	return append(b, s...)
}

// connectPacket is CONNECT with a clean session and no credentials: the
// client certificate is the credential.
func connectPacket(clientID string, keepAlive uint16) []byte {
	rem := 10 + 2 + len(clientID)
	b := appendVarint([]byte{pktConnect << 4}, rem)
	b = appendString(b, "MQTT")
	b = append(b, 4, 0x02) // protocol level 3.1.1, clean session
	b = binary.BigEndian.AppendUint16(b, keepAlive)
	return appendString(b, clientID)
}

func subscribePacket(pid uint16, filters []string, qos byte) []byte {
	rem := 2
	for _, f := range filters {
		rem += 2 + len(f) + 1
	}
	b := appendVarint([]byte{pktSubscribe<<4 | 0x02}, rem)
	b = binary.BigEndian.AppendUint16(b, pid)
	for _, f := range filters {
		b = append(appendString(b, f), qos)
	}
	return b
}

func publishPacket(topic string, payload []byte, qos byte, pid uint16) []byte {
	rem := 2 + len(topic) + len(payload)
	if qos > 0 {
		rem += 2
	}
	b := make([]byte, 0, 5+rem)
	b = appendVarint(append(b, pktPublish<<4|qos<<1), rem)
	b = appendString(b, topic)
	if qos > 0 {
		b = binary.BigEndian.AppendUint16(b, pid)
	}
	return append(b, payload...)
}

func pubackPacket(pid uint16) []byte {
	return []byte{pktPuback << 4, 2, byte(pid >> 8), byte(pid)}
}

var pingreqPacket = []byte{pktPingreq << 4, 0}

// packet is one packet read from the broker.
type packet struct {
	typ, flags byte
	body       []byte
}

// readPacket reads one packet of at most maxPacket bytes.
func readPacket(r *bufio.Reader) (packet, error) {
	h, err := r.ReadByte()
	if err != nil {
		return packet{}, err
	}
	n, shift := 0, 0
	for i := 0; ; i++ {
		c, err := r.ReadByte()
		if err != nil {
			return packet{}, err
		}
		n |= int(c&0x7f) << shift
		if c&0x80 == 0 {
			break
		}
		if shift += 7; i == 3 {
			return packet{}, errors.New("mqtt: malformed remaining length")
		}
	}
	if n > maxPacket {
		return packet{}, fmt.Errorf("mqtt: a packet of %d bytes from the broker (limit %d)", n, maxPacket)
	}
	p := packet{typ: h >> 4, flags: h & 0x0f}
	// Read in pieces: a broker that announces 64 KB and stalls holds what
	// it sent, not 64 KB per device.
	p.body = make([]byte, 0, min(n, 4096))
	for len(p.body) < n {
		k := min(n-len(p.body), max(len(p.body), 4096))
		p.body = slices.Grow(p.body, k)
		if _, err = io.ReadFull(r, p.body[len(p.body):len(p.body)+k]); err != nil {
			return p, err
		}
		p.body = p.body[:len(p.body)+k]
	}
	return p, nil
}

// publish parses a PUBLISH: its topic, packet id (QoS > 0) and payload.
func (p packet) publish() (topic string, qos byte, pid uint16, payload []byte, err error) {
	b := p.body
	if len(b) < 2 {
		return "", 0, 0, nil, errors.New("mqtt: short PUBLISH")
	}
	tl := int(binary.BigEndian.Uint16(b))
	if len(b) < 2+tl {
		return "", 0, 0, nil, errors.New("mqtt: short PUBLISH topic")
	}
	topic, b = string(b[2:2+tl]), b[2+tl:]
	qos = (p.flags >> 1) & 3
	if qos > 0 {
		if len(b) < 2 {
			return "", 0, 0, nil, errors.New("mqtt: PUBLISH without its packet id")
		}
		pid, b = binary.BigEndian.Uint16(b), b[2:]
	}
	return topic, qos, pid, b, nil
}

// connackCode returns CONNACK's return code.
func (p packet) connackCode() (byte, error) {
	if p.typ != pktConnack || len(p.body) != 2 {
		return 0, fmt.Errorf("mqtt: expected CONNACK, got packet type %d", p.typ)
	}
	return p.body[1], nil
}

// connackReason names a CONNACK refusal (3.1.1 codes).
func connackReason(code byte) string {
	switch code {
	case 1:
		return "connack: unacceptable protocol version"
	case 2:
		return "connack: identifier rejected"
	case 3:
		return "connack: server unavailable"
	case 4:
		return "connack: bad user name or password"
	case 5:
		return "connack: not authorized"
	}
	return fmt.Sprintf("connack: code %d", code)
}
