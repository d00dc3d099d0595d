package broker

import (
	"context"
	"crypto/tls"
	"errors"
	"log/slog"
	"net"
	"os"
	"runtime/debug"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/listeners"

	"fleetkey.dev/certs/trust"
)

// listener is fleetkey's mochi listener: TLS with deadlines, an accept
// loop that outlives temporary errors, and a recover() per connection.
type listener struct {
	b     *Broker
	rates *addrRates
	ln    net.Listener
	id    string
	once  sync.Once
	done  chan struct{}
	wg    sync.WaitGroup

	// conns are the connections being served. mochi's Close disconnects
	// the clients it has registered; a connection between its TLS
	// handshake and its CONNECT is not one yet, and would outlive the
	// broker (found by the fleet simulator restarting a gateway while
	// devices connected). Close closes every one.
	mu      sync.Mutex
	conns   map[net.Conn]struct{}
	closing bool
}

var _ listeners.Listener = (*listener)(nil)

func (l *listener) ID() string       { return l.id }
func (l *listener) Address() string  { return l.ln.Addr().String() }
func (l *listener) Protocol() string { return "mqtts" }

func (l *listener) Init(*slog.Logger) error {
	l.done = make(chan struct{})
	l.rates = &addrRates{perSec: float64(l.b.limits.ConnPerSecondPerAddr), now: l.b.opts.Now, buckets: map[string]*bucket{}}
	return nil
}

// Serve accepts until Close. A temporary Accept error (EMFILE, ENFILE,
// ECONNABORTED) is logged and retried after a growing pause, up to 1 s;
// mochi's own loop returns on the first error and leaves the port dead.
func (l *listener) Serve(establish listeners.EstablishFn) {
	var backoff time.Duration
	for {
		conn, err := l.ln.Accept()
		if err != nil {
			select {
			case <-l.done:
				return
			default:
			}
			l.b.stats.AcceptErrors.Add(1)
			if errors.Is(err, net.ErrClosed) {
				return
			}
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			l.b.log.Warn("accept failed; retrying", "err", err, "in", backoff)
			select {
			case <-time.After(backoff):
			case <-l.done:
				return
			}
			continue
		}
		backoff = 0
		if !l.rates.allow(conn.RemoteAddr()) {
			l.b.stats.ConnRateLimited.Add(1)
			conn.Close()
			continue
		}
		l.wg.Add(1)
		go func() {
			defer l.wg.Done()
			l.handle(conn, establish)
		}()
	}
}

// handle runs one connection: the TLS handshake under its deadline, then
// mochi under a deadline for CONNECT, and a recover() around it all.
func (l *listener) handle(raw net.Conn, establish listeners.EstablishFn) {
	b := l.b
	if !l.track(raw) {
		raw.Close()
		return
	}
	defer l.untrack(raw)
	// Every write has a deadline, the TLS layer's own (handshake, alerts,
	// key updates) included.
	tc := tls.Server(&clientConn{Conn: raw, timeout: b.limits.WriteTimeout}, b.tls)
	defer func() {
		if p := recover(); p != nil {
			b.stats.Panics.Add(1)
			b.log.Error("connection panicked; closed it, the gateway goes on", "remote", raw.RemoteAddr().String(), "panic", p, "stack", string(debug.Stack()))
			tc.Close()
			l.forget(tc)
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), b.limits.HandshakeTimeout)
	err := tc.HandshakeContext(ctx)
	cancel()
	if err != nil {
		// Refusals by VerifyConnection are counted there, with their reason.
		var ve *trust.VerifyError
		if !errors.As(err, &ve) {
			reason := "tls"
			switch {
			case errors.Is(ctx.Err(), context.DeadlineExceeded):
				reason = "handshake-timeout"
			case strings.Contains(err.Error(), "didn't provide a certificate"):
				reason = "no-certificate"
			}
			b.stats.HandshakeFailures.Add(1)
			b.stats.refused("handshake", reason)
			b.log.Info("TLS handshake failed", "reason", reason, "remote", raw.RemoteAddr().String(), "err", err)
		}
		raw.Close()
		return
	}
	b.stats.Handshakes.Add(1)
	// mochi reads CONNECT without any deadline; it sets keepalive
	// deadlines once the client is in.
	_ = tc.SetReadDeadline(time.Now().Add(b.limits.ConnectTimeout))
	_ = establish(l.id, tc)
	// mochi calls no OnDisconnect for a client it authenticated but could
	// not attach (its CONNACK or its session's resend failed to write);
	// mochi keeps the MQTT session itself, for the client's next
	// connection.
	l.ended(tc, "not attached")
}

// clientConn is a client's TCP connection under its TLS layer. Every
// write has a deadline, Limits.WriteTimeout, and a write that misses it
// closes the connection. mochi sets no write deadline of its own (its
// keepalive SetDeadline is taken here as the read deadline it is meant to
// be), and it writes under the client's lock, which publishing to that
// client takes too: without this, a client that stops reading would hold
// up whoever publishes to it, the gateway's delivery goroutines included,
// until its keepalive ran out, or for ever with a keepalive of 0.
type clientConn struct {
	net.Conn
	timeout time.Duration
	until   atomic.Int64 // the write deadline set, as monotonic time since monoBase
}

// monoBase anchors clientConn's monotonic clock: a step of the wall clock
// must not leave deadlines unmoved (and every client cut off at once).
var monoBase = time.Now()

// Write moves the write deadline only when less than half the timeout is
// left of it: a stalled write is cut off after between half the timeout
// and all of it, and most writes cost no deadline update.
func (c *clientConn) Write(b []byte) (int, error) {
	if now := time.Since(monoBase); now+c.timeout/2 > time.Duration(c.until.Load()) {
		_ = c.Conn.SetWriteDeadline(time.Now().Add(c.timeout))
		c.until.Store(int64(now + c.timeout))
	}
	n, err := c.Conn.Write(b)
	if err != nil && errors.Is(err, os.ErrDeadlineExceeded) {
		// TLS is broken after a failed write; closing ends mochi's read
		// loop, and with it the client.
		c.Conn.Close()
	}
	return n, err
}

// SetDeadline is mochi's keepalive (through the TLS layer): a read
// deadline.
func (c *clientConn) SetDeadline(t time.Time) error { return c.Conn.SetReadDeadline(t) }

// forget removes what mochi kept of a client whose goroutine panicked:
// its session (without its Will: a crash is not the client's last word)
// and its subscriptions.
func (l *listener) forget(tc *tls.Conn) {
	victim := l.ended(tc, "panicked")
	if victim == nil {
		return
	}
	atomic.StoreUint32(&victim.Properties.Will.Flag, 0)
	l.b.mqtt.UnsubscribeClient(victim)
	if cur, ok := l.b.mqtt.Clients.Get(victim.ID); ok && cur == victim {
		l.b.mqtt.Clients.Delete(victim.ID)
	}
}

// ended runs the gateway's disconnect bookkeeping (hook.OnDisconnect: its
// session entry, expiry timer, write-queue count, the device's connection
// count) for the client on tc if mochi has not, and returns that client.
func (l *listener) ended(tc *tls.Conn, why string) *mqtt.Client {
	l.b.mu.Lock()
	cl := l.b.byConn[tc]
	l.b.mu.Unlock()
	if cl != nil {
		(&hook{b: l.b}).OnDisconnect(cl, errors.New(why), false)
	}
	return cl
}

// Close stops accepting, closes the listener and waits for the
// connections' goroutines after closing every client.
func (l *listener) Close(closeClients listeners.CloseFn) {
	l.once.Do(func() {
		close(l.done)
		l.ln.Close()
	})
	closeClients(l.id)
	l.mu.Lock()
	l.closing = true
	for c := range l.conns {
		c.Close()
	}
	l.mu.Unlock()
	l.wg.Wait()
}

// track registers a connection being served; false once closing.
func (l *listener) track(c net.Conn) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closing {
		return false
	}
	if l.conns == nil {
		l.conns = map[net.Conn]struct{}{}
	}
	l.conns[c] = struct{}{}
	return true
}

func (l *listener) untrack(c net.Conn) {
	l.mu.Lock()
	delete(l.conns, c)
	l.mu.Unlock()
}

// addrRates is a token bucket per client IP: perSec new connections a
// second, bursts of twice that. Idle buckets are dropped every minute.
type addrRates struct {
	mu      sync.Mutex
	perSec  float64
	now     func() time.Time
	buckets map[string]*bucket
	swept   time.Time
}

type bucket struct {
	tokens float64
	last   time.Time
}

func (r *addrRates) allow(addr net.Addr) bool {
	host, _, err := net.SplitHostPort(addr.String())
	if err != nil {
		host = addr.String()
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	now, burst := r.now(), 2*r.perSec
	if now.Sub(r.swept) > time.Minute {
		for k, b := range r.buckets {
			if now.Sub(b.last) > time.Minute {
				delete(r.buckets, k)
			}
		}
		r.swept = now
	}
	b, ok := r.buckets[host]
	if !ok {
		b = &bucket{tokens: burst, last: now}
		r.buckets[host] = b
	}
	b.tokens = min(burst, b.tokens+now.Sub(b.last).Seconds()*r.perSec)
	b.last = now
	if b.tokens < 1 {
		return false
	}
	b.tokens--
	return true
}
