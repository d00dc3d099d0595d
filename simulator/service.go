package simulator

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"fleetkey.dev/certs/trust"
	"fleetkey.dev/device-agent/agent"
	"fleetkey.dev/simulator/peers"
)

// receiver is the service side of a run, a real MQTT client (paho) with a
// service certificate: it subscribes to the records the broker delivers
// (end-to-end latency, duplicates, leaks) and sends commands.
type receiver struct {
	cfg     *RunConfig
	m       *meter
	c       paho.Client // nil when the service runs in a process of its own
	ext     *exec.Cmd
	extDone chan struct{} // closed when ext's output has been read to its end

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
	if cfg.ServiceCmd != nil {
		if cfg.CommandRate > 0 {
			return nil, errors.New("commands need the service in this process (no ServiceCmd)")
		}
		return r, r.startExternal(ctx)
	}
	c, err := connectService(cfg, serviceTopic(cfg), r.record)
	if err != nil {
		return nil, err
	}
	r.c = c
	if cfg.CommandRate > 0 && cfg.Target == TargetFleetkey {
		r.wg.Go(func() { r.commands(ctx) })
	}
	return r, nil
}

// serviceTopic is what the service subscribes to (RunConfig.ServiceTopic).
func serviceTopic(cfg *RunConfig) string {
	if cfg.ServiceTopic != "" {
		return cfg.ServiceTopic
	}
	ch := cfg.channels[0]
	if len(cfg.channels) > 1 {
		ch = "+"
	}
	if cfg.Target == TargetMQTT {
		return "devices/+/up/" + ch
	}
	return "fleet/telemetry/+/" + ch
}

// connectService connects a paho client with cfg.Service to cfg.Gateway
// and subscribes to topic at QoS 1 on every connection, handing each
// message's payload to onRecord (from paho's goroutines, at once).
func connectService(cfg *RunConfig, topic string, onRecord func([]byte)) (paho.Client, error) {
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
	// A clean session: the subscription is made again on every connection
	// (a gateway restart ends the session).
	subscribed := make(chan error, 1)
	opts.SetOnConnectHandler(func(c paho.Client) {
		st := c.Subscribe(topic, 1, func(_ paho.Client, msg paho.Message) { onRecord(msg.Payload()) })
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
	c := paho.NewClient(opts)
	tok := c.Connect()
	if !tok.WaitTimeout(15*time.Second) || tok.Error() != nil {
		c.Disconnect(0) // stops paho's connect retries
		return nil, fmt.Errorf("the service client could not connect to %s: %v", cfg.Gateway, tok.Error())
	}
	if err := <-subscribed; err != nil {
		c.Disconnect(0)
		return nil, fmt.Errorf("the service client could not subscribe to %s: %v", topic, err)
	}
	return c, nil
}

// serviceFrame is what `simulator peer-service` writes to its standard
// output for each record it receives: the record's first bodyHeader bytes
// and the time it arrived (u64, Unix nanoseconds). Its first frame, all
// zeros, says it has subscribed.
const serviceFrame = bodyHeader + 8

// startExternal runs the service client in a process of its own
// (RunConfig.ServiceCmd) and takes the records it streams back.
func (r *receiver) startExternal(ctx context.Context) error {
	cmd := r.cfg.ServiceCmd("--gateway", r.cfg.Gateway, "--topic", serviceTopic(r.cfg))
	out, err := cmd.StdoutPipe()
	if err != nil {
		return err
	}
	stderr := peers.NewTail(4 << 10)
	cmd.Stderr = stderr
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = peers.ChildAttr()
	}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("starting the service process: %w", err)
	}
	r.ext, r.extDone = cmd, make(chan struct{})
	ready := make(chan bool, 1)
	go func() {
		defer close(r.extDone)
		br := bufio.NewReaderSize(out, 64<<10)
		var f [serviceFrame]byte
		for first := true; ; first = false {
			if _, err := io.ReadFull(br, f[:]); err != nil {
				if first {
					ready <- false
				}
				return
			}
			if first {
				ready <- true
				continue
			}
			r.recordAt(f[:bodyHeader], time.Unix(0, int64(binary.BigEndian.Uint64(f[bodyHeader:]))))
		}
	}()
	fail := func(why string) error {
		_ = cmd.Process.Kill()
		<-r.extDone
		_ = cmd.Wait()
		return fmt.Errorf("the service process %s: %s", why, strings.TrimSpace(stderr.String()))
	}
	select {
	case ok := <-ready:
		if !ok {
			return fail("ended before it subscribed")
		}
		return nil
	case <-time.After(30 * time.Second):
		return fail("did not subscribe within 30 s")
	case <-ctx.Done():
		return fail("was stopped before it subscribed")
	}
}

// record takes one delivered record as it arrives.
func (r *receiver) record(b []byte) { r.recordAt(b, time.Now()) }

// recordAt takes one delivered record that arrived at t: its latency from
// its intended send time, and whether it was seen before.
func (r *receiver) recordAt(b []byte, t time.Time) {
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
	r.m.record(PhaseE2E, t.Sub(time.Unix(0, at)))
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
	if r.ext == nil {
		r.c.Disconnect(250)
		return
	}
	// SIGTERM: the service disconnects, writes what it has and exits.
	_ = r.ext.Process.Signal(syscall.SIGTERM)
	select {
	case <-r.extDone:
	case <-time.After(10 * time.Second):
		_ = r.ext.Process.Kill()
		<-r.extDone
	}
	_ = r.ext.Wait()
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

// PeerServiceMain is the body of a hidden subcommand (`simulator
// peer-service`): the service's MQTT client in a process of its own
// (RunConfig.ServiceCmd). It connects with the fleet's service
// certificate, subscribes at QoS 1, and writes a serviceFrame to its
// standard output for each record until ctx ends. Flags:
//
//	--pki DIR        the fleet PKI (bundle.pem, service.crt, service.key)
//	--gateway ADDR   the broker
//	--topic FILTER   what to subscribe to
func PeerServiceMain(ctx context.Context, args []string, stdout io.Writer) error {
	fs := flag.NewFlagSet("peer-service", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	pki := fs.String("pki", "", "the fleet PKI `dir`")
	gateway := fs.String("gateway", "", "the broker's `address`")
	topic := fs.String("topic", "", "the topic `filter`")
	if err := fs.Parse(args); err != nil {
		return fmt.Errorf("peer-service: %w", err)
	}
	if fs.NArg() > 0 || *pki == "" || *gateway == "" || *topic == "" {
		return errors.New("peer-service: --pki, --gateway and --topic are required, and nothing else")
	}
	fleet, err := OpenFleet(*pki)
	if err != nil {
		return fmt.Errorf("peer-service: %w", err)
	}
	cert, err := tls.LoadX509KeyPair(filepath.Join(*pki, "service.crt"), filepath.Join(*pki, "service.key"))
	if err != nil {
		return fmt.Errorf("peer-service: %w", err)
	}
	roots := x509.NewCertPool()
	for _, c := range fleet.Bundle().Issuing() {
		roots.AddCert(c)
	}
	var mu sync.Mutex
	w := bufio.NewWriterSize(stdout, 64<<10)
	var werr error
	marked := false
	// mark writes the first frame, all zeros, which says the subscription
	// is in, ahead of any record's: a record can arrive before
	// connectService returns.
	mark := func() {
		if !marked && werr == nil {
			_, werr = w.Write(make([]byte, serviceFrame))
			marked = true
		}
	}
	emit := func(b []byte, at time.Time) {
		var f [serviceFrame]byte
		copy(f[:], b)
		binary.BigEndian.PutUint64(f[bodyHeader:], uint64(at.UnixNano()))
		mu.Lock()
		mark()
		if werr == nil {
			_, werr = w.Write(f[:])
		}
		mu.Unlock()
	}
	flush := func() error {
		mu.Lock()
		defer mu.Unlock()
		if werr == nil {
			werr = w.Flush()
		}
		return werr
	}
	c, err := connectService(&RunConfig{Gateway: *gateway, RootCAs: roots, Service: &cert}, *topic, func(b []byte) {
		if len(b) >= bodyHeader {
			emit(b, time.Now())
		}
	})
	if err != nil {
		return fmt.Errorf("peer-service: %w", err)
	}
	// What the frames hold is flushed every 10 ms.
	mu.Lock()
	mark()
	mu.Unlock()
	t := time.NewTicker(10 * time.Millisecond)
	defer t.Stop()
	for {
		if err := flush(); err != nil {
			c.Disconnect(0)
			return fmt.Errorf("peer-service: writing: %w", err)
		}
		select {
		case <-ctx.Done():
			c.Disconnect(250)
			return flush()
		case <-t.C:
		}
	}
}
