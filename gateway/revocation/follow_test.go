package revocation

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"fmt"
	"math/big"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"fleetkey.dev/certs/authority"
	"fleetkey.dev/certs/crl"
	"fleetkey.dev/certs/identity"
	"fleetkey.dev/certs/pkidir"
)

// TestFollow: the follower applies feed events, resumes after the last
// one it saw, and falls back to the CRL while the feed is down.
func TestFollow(t *testing.T) {
	t.Parallel()
	pass := &pkidir.Passphrase{Secret: []byte("follow test passphrase"), Source: "test"}
	pki := filepath.Join(t.TempDir(), "pki")
	if _, err := pkidir.Init(pki, pkidir.InitOptions{TrustDomain: "fleet.test", Passphrase: pass, Options: pkidir.Options{KDFIterations: 1000}}); err != nil {
		t.Fatal(err)
	}
	bundle, _ := pkidir.LoadBundle(pki)
	iss, _ := pkidir.LoadIssuing(pki, pass)
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	onCRL, err := (&authority.Issuer{CA: iss, Policy: authority.Policy{TrustDomain: "fleet.test"}}).Issue(&authority.Request{Role: identity.RoleDevice, Name: "d", PublicKey: key.Public()})
	if err != nil {
		t.Fatal(err)
	}
	crlDER, err := crl.Build(iss, []crl.Entry{{Serial: onCRL.SerialNumber, RevokedAt: time.Now()}}, big.NewInt(1), time.Now().Add(-time.Minute), time.Now().Add(time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	var calls atomic.Int32
	sinces := make(chan string, 10)
	srv := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/revocations/v1/stream":
			sinces <- r.URL.Query().Get("since")
			switch calls.Add(1) {
			case 1: // two events, then the server goes away
				w.Header().Set("Content-Type", "text/event-stream")
				fmt.Fprint(w, ": hello\n\nid: 1\nevent: revoked\ndata: {\"seq\":1,\"serial\":\"AA01\",\"device\":\"a\"}\n\n")
				fmt.Fprint(w, "id: 2\nevent: revoked\ndata: {\"seq\":2,\"serial\":\"bb02\",\"device\":\"b\"}\n\n")
			default: // then it is down
				http.Error(w, "down", http.StatusServiceUnavailable)
			}
		case "/crl":
			w.Write(crlDER)
		}
	}))
	defer srv.Close()
	got := make(chan string, 10)
	f := &Follower{BaseURL: srv.URL, Client: srv.Client(), Bundle: bundle, Revoke: func(s string) { got <- s }, CRLInterval: time.Millisecond}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- f.Run(ctx) }()
	want := []string{"aa01", "bb02", onCRL.SerialNumber.Text(16)}
	for _, w := range want {
		select {
		case s := <-got:
			if s != w {
				t.Fatalf("revoked %q, want %q", s, w)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("no revocation of %s within 10 s", w)
		}
	}
	if s := <-sinces; s != "0" {
		t.Fatalf("first stream since=%s", s)
	}
	if s := <-sinces; s != "2" {
		t.Fatalf("the follower resumed since=%s, want 2", s)
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

// TestFollowRefusesMalformedEvents: an event that is not the feed's JSON
// revokes nothing; the follower drops the stream and resumes from the last
// good sequence number.
func TestFollowRefusesMalformedEvents(t *testing.T) {
	t.Parallel()
	var calls atomic.Int32
	sinces := make(chan string, 10)
	srv := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/revocations/v1/stream" {
			http.NotFound(w, r)
			return
		}
		sinces <- r.URL.Query().Get("since")
		w.Header().Set("Content-Type", "text/event-stream")
		if calls.Add(1) == 1 {
			fmt.Fprint(w, "id: 1\ndata: {\"seq\":1,\"serial\":\"0a\"}\n\nid: 2\ndata: not json\n\nid: 3\ndata: {\"seq\":3,\"serial\":\"0c\"}\n\n")
			return
		}
		fmt.Fprint(w, "id: 3\ndata: {\"seq\":3,\"serial\":\"0c\"}\n\n")
	}))
	defer srv.Close()
	got := make(chan string, 10)
	f := &Follower{BaseURL: srv.URL, Client: srv.Client(), Revoke: func(s string) { got <- s }, CRLInterval: time.Hour}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go f.Run(ctx)
	for _, want := range []string{"0a", "0c"} {
		select {
		case s := <-got:
			if s != want {
				t.Fatalf("revoked %q, want %q (the malformed event must revoke nothing)", s, want)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("no revocation of %s", want)
		}
	}
	<-sinces
	if s := <-sinces; s != "1" {
		t.Fatalf("after the malformed event the follower resumed since=%s, want 1", s)
	}
}
