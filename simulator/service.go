package simulator

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"sync"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"fleetkey.dev/certs/trust"
	"fleetkey.dev/device-agent/agent"
)

// receiver is the service side of a run, a real MQTT client (paho) with a
// service certificate: it subscribes to the records the broker delivers
// (end-to-end latency, duplicates, leaks) and sends commands.
type receiver struct {
	cfg *RunConfig
	m   *meter
	c   paho.Client

	mu      sync.Mutex
	seen    map[uint32]seqSet // device index -> sequences received
	dups    int64
	foreign int64
	leaks   map[uint32]int64 // by attack marker: attackers' records that reached a service
	stopCh  chan struct{}
	wg      sync.WaitGroup
}

// maxSeq bounds the sequences the receiver tracks per device (a bitset
// of 2 MB at most): a run of a record a second lasts 194 days.
const maxSeq = 1 << 24

// attackerIndex marks the bodies attackers send: any that reaches the
// receiver is a leak.
const attackerIndex = 0xffffffff

func startReceiver(ctx context.Context, cfg *RunConfig, m *meter) (*receiver, error) {
	r := &receiver{cfg: cfg, m: m, seen: map[uint32]seqSet{}, leaks: map[uint32]int64{}, stopCh: make(chan struct{})}
	host, _, err := net.SplitHostPort(cfg.Gateway)
	if err != nil {
		return nil, err
	}
	clientID := "sim-receiver"
	if leaf, err := x509.ParseCertificate(cfg.Service.Certificate[0]); err == nil {
		if id, err := trust.Identity([]*x509.Certificate{leaf}); err == nil {
			clientID = id.Name + "/simulator"
		}
	}
	opts := paho.NewClientOptions().AddBroker("tls://" + cfg.Gateway).SetClientID(clientID).
		SetTLSConfig(&tls.Config{MinVersion: tls.VersionTLS12, ServerName: host, RootCAs: cfg.RootCAs, Certificates: []tls.Certificate{*cfg.Service}}).
		SetProtocolVersion(4).SetCleanSession(true).SetAutoReconnect(true).SetConnectRetry(true).SetConnectRetryInterval(time.Second).
		SetConnectTimeout(10 * time.Second).SetKeepAlive(30 * time.Second).SetOrderMatters(false).SetMaxResumePubInFlight(1024)
	ch := cfg.channels[0]
	if len(cfg.channels) > 1 {
		ch = "+"
	}
	topic := "fleet/telemetry/+/" + ch
	if cfg.Target == TargetMQTT {
		topic = "devices/+/up/" + ch
	}
	if cfg.ServiceTopic != "" {
		topic = cfg.ServiceTopic
	}
	// A clean session: the subscription is made again on every connection
	// (a gateway restart ends the session).
	subscribed := make(chan error, 1)
	opts.SetOnConnectHandler(func(c paho.Client) {
		st := c.Subscribe(topic, 1, func(_ paho.Client, msg paho.Message) { r.record(msg.Payload()) })
		go func() {
			var err error
			if !st.WaitTimeout(15 * time.Second) {
				err = errors.New("no SUBACK in 15 s")
			} else {
				err = st.Error()
			}
			select {
			case subscribed <- err:
			default:
			}
		}()
	})
	r.c = paho.NewClient(opts)
	tok := r.c.Connect()
	if !tok.WaitTimeout(15*time.Second) || tok.Error() != nil {
		r.c.Disconnect(0) // stops paho's connect retries
		return nil, fmt.Errorf("the service client could not connect to %s: %v", cfg.Gateway, tok.Error())
	}
	if err := <-subscribed; err != nil {
		r.c.Disconnect(0)
		return nil, fmt.Errorf("the service client could not subscribe to %s: %v", topic, err)
	}
	if cfg.CommandRate > 0 && cfg.Target == TargetFleetkey {
		r.wg.Go(func() { r.commands(ctx) })
	}
	return r, nil
}

// record takes one delivered record: its latency from its intended send
// time, and whether it was seen before.
func (r *receiver) record(b []byte) {
	if len(b) < bodyHeader {
		return
	}
	at := int64(binary.BigEndian.Uint64(b))
	idx, seq := binary.BigEndian.Uint32(b[8:]), binary.BigEndian.Uint32(b[12:])
	r.mu.Lock()
	defer r.mu.Unlock()
	forged := idx >= attackerIndex-256
	genuine := idx >= attackerIndex-256-genuineOffset && idx < attackerIndex-genuineOffset
	if forged {
		r.leaks[idx]++
		return
	}
	if !genuine && (int(idx) >= r.cfg.Devices || seq > maxSeq) {
		r.foreign++ // not this run's: another publisher, or garbled
		return
	}
	set := r.seen[idx]
	isNew := set.add(seq)
	r.seen[idx] = set
	if !isNew {
		if genuine {
			r.leaks[idx+genuineOffset]++ // a replay delivered again
		} else {
			r.dups++
		}
		return
	}
	if genuine {
		return
	}
	r.m.received.Add(1)
	r.m.record(PhaseE2E, time.Since(time.Unix(0, at)))
}

func (r *receiver) duplicates() int64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.dups
}

func (r *receiver) foreignCount() int64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.foreign
}

func (r *receiver) leakedBy(marker uint32) int64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.leaks[marker]
}

// commands sends CommandRate commands a second, each to a random device,
// on the intended schedule (a late send counts in its latency).
func (r *receiver) commands(ctx context.Context) {
	every := time.Duration(float64(time.Second) / r.cfg.CommandRate)
	next := time.Now().Add(every)
	t := time.NewTimer(every)
	defer t.Stop()
	body := make([]byte, bodyHeader+16)
	for {
		select {
		case <-ctx.Done():
			return
		case <-r.stopCh:
			return
		case <-t.C:
		}
		idx := rand.IntN(r.cfg.Devices)
		binary.BigEndian.PutUint64(body, uint64(next.UnixNano()))
		binary.BigEndian.PutUint32(body[8:], uint32(idx))
		r.c.Publish("fleet/commands/"+deviceID(idx)+"/cmd", 1, false, append([]byte(nil), body...))
		next = next.Add(every)
		t.Reset(max(time.Until(next), 0))
	}
}

func (r *receiver) stop() {
	close(r.stopCh)
	r.wg.Wait()
	r.c.Disconnect(250)
}

// onCommand is the virtual device's OnCommand: a command's trip from the
// service's intended send time.
func (v *vdev) onCommand(c agent.Command) {
	if len(c.Body) < bodyHeader {
		v.f.m.fail("command: short body")
		return
	}
	v.f.m.commands.Add(1)
	v.f.m.record(PhaseCommand, time.Since(time.Unix(0, int64(binary.BigEndian.Uint64(c.Body)))))
}
