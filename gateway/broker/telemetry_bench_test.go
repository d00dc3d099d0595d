package broker

import (
	"bufio"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"fleetkey.dev/certs/authority"
	"fleetkey.dev/certs/identity"
	"fleetkey.dev/certs/pkidir"
	"fleetkey.dev/gateway/sink"
	"fleetkey.dev/sessionkey"
)

// serveFKX is benchServe's "fleetkey-fkx": the gateway with fkx1 on, its
// sink a real file (fsync'd) in a temporary directory.
func serveFKX(ctx context.Context, opts Options) (*Broker, func(), error) {
	dir, err := os.MkdirTemp("", "fleetkey-bench-sink")
	if err != nil {
		return nil, nil, err
	}
	snk, err := sink.Open(filepath.Join(dir, "telemetry.jsonl"), sink.Options{})
	if err != nil {
		return nil, nil, err
	}
	opts.Sessions = &Sessions{Identity: sessionkey.Identity{Signer: opts.Certificate.PrivateKey.(crypto.Signer), Chain: opts.Certificate.Certificate}, Sink: snk}
	b, err := New(opts)
	if err != nil {
		return nil, nil, err
	}
	return b, func() {
		snk.Close()
		os.RemoveAll(dir)
	}, nil
}

// benchDevice is a paho device that runs fkx1 with sessionkey directly.
type benchDevice struct {
	id   string
	c    paho.Client
	resp chan []byte
	ring *sessionkey.Keyring
	rec  uint64
}

func connectBenchDevice(b *testing.B, addr string, fleet *benchFleet, i int) *benchDevice {
	d := &benchDevice{id: fmt.Sprintf("load-%05d", i), resp: make(chan []byte, 4), ring: sessionkey.NewKeyring(false, sessionkey.Rotation{}, nil)}
	cfg := &tls.Config{RootCAs: fleet.roots, ServerName: "localhost", Certificates: []tls.Certificate{fleet.certs[i]}, CurvePreferences: []tls.CurveID{tls.X25519}}
	d.c = paho.NewClient(paho.NewClientOptions().AddBroker("tls://" + addr).SetClientID(d.id).SetTLSConfig(cfg).
		SetAutoReconnect(false).SetProtocolVersion(4).SetCleanSession(true).SetWriteTimeout(30 * time.Second))
	if tok := d.c.Connect(); !tok.WaitTimeout(30*time.Second) || tok.Error() != nil {
		b.Fatalf("connect %s: %v", d.id, tok.Error())
	}
	if tok := d.c.Subscribe("devices/"+d.id+"/kex/resp", 1, func(_ paho.Client, m paho.Message) { d.resp <- m.Payload() }); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		b.Fatalf("subscribe: %v", tok.Error())
	}
	return d
}

func (d *benchDevice) handshake(b *testing.B, cert tls.Certificate) {
	init, err := sessionkey.NewInitiator(sessionkey.InitiatorConfig{DeviceID: d.id, Suite: sessionkey.Suite1,
		Identity:      sessionkey.Identity{Signer: cert.PrivateKey.(crypto.Signer), Chain: cert.Certificate},
		VerifyGateway: func([]*x509.Certificate) error { return nil }})
	if err != nil {
		b.Fatal(err)
	}
	next := func() []byte {
		select {
		case m := <-d.resp:
			return m
		case <-time.After(30 * time.Second):
			b.Fatalf("%s: no answer to the handshake", d.id)
		}
		return nil
	}
	m1, _ := init.Start()
	d.c.Publish("devices/"+d.id+"/kex/req", 1, false, m1)
	m3, err := init.HandleMsg2(next(), nil)
	if err != nil {
		b.Fatal(err)
	}
	d.c.Publish("devices/"+d.id+"/kex/req", 1, false, m3)
	ep, err := init.HandleMsg4(next(), nil)
	if err != nil {
		b.Fatal(err)
	}
	d.ring.Add(ep)
}

// stream publishes n QoS 1 messages with up to window in flight; payload
// makes the i-th message's bytes.
func (d *benchDevice) stream(b *testing.B, topic string, n, window int, payload func() []byte) {
	var pending []paho.Token
	for i := 0; i < n; i++ {
		if len(pending) == window {
			if !pending[0].WaitTimeout(60*time.Second) || pending[0].Error() != nil {
				b.Errorf("%s: PUBACK: %v", d.id, pending[0].Error())
				return
			}
			pending = pending[1:]
		}
		pending = append(pending, d.c.Publish(topic, 1, false, payload()))
	}
	for _, t := range pending {
		if !t.WaitTimeout(60*time.Second) || t.Error() != nil {
			b.Errorf("%s: PUBACK: %v", d.id, t.Error())
			return
		}
	}
}

// BenchmarkTelemetry: encrypted end-to-end telemetry through the gateway
// (seal on the device; open, dedupe, fsync'd sink, PUBACK and QoS 1
// delivery to a service at the gateway) against the same gateway relaying
// the same records in plaintext (devices/{id}/up/ to fleet/telemetry/,
// PUBACK and QoS 1 delivery, no crypto, no sink), from the same 100
// devices, in the same run. The rate that counts is records through the
// gateway: received by the service per second, from the first publish to
// the last delivery. Also reported: records acknowledged to the devices
// per second, and the share acknowledged but never delivered (lost).
func BenchmarkTelemetry(b *testing.B) {
	const devices, per, window, size, consumers = 100, 500, 32, 256, 4
	fleet := newBenchFleet(b, devices)
	svcCerts := make([]tls.Certificate, consumers)
	for i := range svcCerts {
		key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		c, err := fleet.iss.Issue(&authority.Request{Role: identity.RoleService, Name: fmt.Sprintf("ingest-%d", i), PublicKey: key.Public()})
		if err != nil {
			b.Fatal(err)
		}
		svcCerts[i] = tls.Certificate{Certificate: [][]byte{c.Raw}, PrivateKey: key}
	}
	bundle, _ := pkidir.LoadBundle(fleet.pki)
	body := make([]byte, size)
	measure := func(kind string) (acked, through, lost float64) {
		srv := startServer(b, kind, fleet.pki)
		defer srv.stop()
		var delivered, lastAt atomic.Int64
		all := make(chan struct{})
		// The service reads through a shared subscription on several
		// connections, as a service that needs the throughput would: one
		// connection's writer caps what a single subscriber can receive.
		for i := 0; i < consumers; i++ {
			svc, err := mqttConnect(srv.addr, &tls.Config{RootCAs: bundle.RootPool(), ServerName: "localhost", Certificates: []tls.Certificate{svcCerts[i]}}, fmt.Sprintf("ingest-%d", i))
			if err != nil {
				b.Fatalf("service: %v", err)
			}
			defer svc.Close()
			subscribed := make(chan struct{})
			go consume(svc, "$share/ingest/fleet/telemetry/#", subscribed, func() {
				lastAt.Store(time.Now().UnixNano())
				if delivered.Add(1) == devices*per {
					close(all)
				}
			})
			<-subscribed
		}
		devs := make([]*benchDevice, devices)
		for i := range devs {
			devs[i] = connectBenchDevice(b, srv.addr, fleet, i)
			defer devs[i].c.Disconnect(0)
			if kind == "fleetkey-fkx" {
				devs[i].handshake(b, fleet.certs[i])
			}
		}
		var wg sync.WaitGroup
		start := time.Now()
		for _, d := range devs {
			wg.Add(1)
			go func() {
				defer wg.Done()
				d.stream(b, "devices/"+d.id+"/up/telemetry", per, window, func() []byte {
					d.rec++
					pt := binary.BigEndian.AppendUint64(make([]byte, 0, 16+size), d.rec)
					pt = binary.BigEndian.AppendUint64(pt, uint64(time.Now().UnixMilli()))
					pt = append(pt, body...)
					if kind != "fleetkey-fkx" {
						return pt
					}
					env, _, err := d.ring.Seal("telemetry", pt)
					if err != nil {
						b.Error(err)
					}
					return env
				})
			}()
		}
		wg.Wait()
		// The rate is of acknowledged records; the plaintext relay (mochi's
		// own path) acknowledges and then drops what a subscriber cannot
		// take, so deliveries are waited for, briefly, and the shortfall
		// reported as lost.
		acked = devices * per / time.Since(start).Seconds()
		select {
		case <-all:
		case <-time.After(5 * time.Second):
		}
		got := delivered.Load()
		through = float64(got) / time.Unix(0, lastAt.Load()).Sub(start).Seconds()
		return acked, through, 100 * float64(devices*per-int(got)) / (devices * per)
	}
	for b.Loop() {
		plainAcked, plain, plainLost := measure("fleetkey-plain")
		encAcked, enc, encLost := measure("fleetkey-fkx")
		b.ReportMetric(plain, "plain_msg/s")
		b.ReportMetric(plainAcked, "plain_acked/s")
		b.ReportMetric(plainLost, "plain_lost_%")
		b.ReportMetric(enc, "fkx1_msg/s")
		b.ReportMetric(encAcked, "fkx1_acked/s")
		b.ReportMetric(encLost, "fkx1_lost_%")
		b.ReportMetric(enc/plain, "fkx1/plain")
	}
}

// consume is a lean QoS 1 subscriber (a service that keeps up, unlike
// paho's one-at-a-time handler): it subscribes to filter, acknowledges
// each message in batches, and calls got for each.
func consume(c *tls.Conn, filter string, subscribed chan<- struct{}, got func()) {
	w := bufio.NewWriter(c)
	body := binary.BigEndian.AppendUint16([]byte{0, 1}, uint16(len(filter)))
	body = append(append(body, filter...), 1)
	w.Write(append([]byte{0x82, byte(len(body))}, body...))
	w.Flush()
	r := bufio.NewReaderSize(c, 64<<10)
	for {
		h, err := r.ReadByte()
		if err != nil {
			return
		}
		n, mult := 0, 1
		for {
			d, err := r.ReadByte()
			if err != nil {
				return
			}
			n += int(d&0x7f) * mult
			mult *= 128
			if d&0x80 == 0 {
				break
			}
		}
		pkt := make([]byte, n)
		if _, err := io.ReadFull(r, pkt); err != nil {
			return
		}
		switch h >> 4 {
		case 9: // SUBACK
			close(subscribed)
		case 3: // PUBLISH
			if (h>>1)&3 == 1 {
				tl := int(binary.BigEndian.Uint16(pkt))
				w.Write([]byte{0x40, 2, pkt[2+tl], pkt[3+tl]})
			}
			got()
		}
		if r.Buffered() == 0 {
			w.Flush()
		}
	}
}
