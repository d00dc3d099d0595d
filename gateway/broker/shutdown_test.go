package broker

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"log/slog"
	"net"
	"testing"
	"time"

	"fleetkey.dev/certs/identity"
)

// TestCloseMidConnect: a client that has finished its TLS handshake but
// not yet sent CONNECT when the broker stops is not one of mochi's clients
// yet; the broker still closes it, and stops at once rather than when the
// client's CONNECT deadline ends. Such a connection used to outlive a
// restarted gateway, holding a device on a dead broker.
func TestCloseMidConnect(t *testing.T) {
	_, iss, opts := gatewayOptions(t)
	bundle := opts.Bundle
	opts.Log, opts.Limits = slog.New(slog.DiscardHandler), Limits{ConnectTimeout: time.Minute}
	b, err := New(opts)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- b.Serve(ctx, ln) }()
	e := &env{t: t, issuer: iss}
	dev := e.leaf(iss, identity.RoleDevice, "dev-1")
	roots := bundle.RootPool()
	c, err := tls.Dial("tcp", ln.Addr().String(), &tls.Config{RootCAs: roots, ServerName: "localhost", Certificates: []tls.Certificate{dev}})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	// The server's side of the handshake is done once it has read the
	// client's Finished; a read that waits makes sure of it.
	_ = c.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
	if _, err := c.Read(make([]byte, 1)); err == nil {
		t.Fatal("the broker sent something before CONNECT")
	}
	cancel()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("the broker waited for a connection that never sent CONNECT")
	}
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, err = io.Copy(io.Discard, c)
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		t.Fatal("the connection outlived the broker")
	}
}
