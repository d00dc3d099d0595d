package main

import (
	"os"
	"strings"
	"testing"
	"time"

	"github.com/rogpeppe/go-internal/testscript"

	"fleetkey.dev/certs/pkidir"
)

// The CLI and the EST interface are tested as txtar scripts against the real
// binary, with curl and openssl as the clients (skipped where they are not
// installed; .ci/run installs them).
func TestMain(m *testing.M) {
	testscript.Main(m, map[string]func(){"provisioning": main})
}

func TestScripts(t *testing.T) {
	t.Parallel()
	testscript.Run(t, testscript.Params{
		Dir: "testdata/script",
		Setup: func(env *testscript.Env) error {
			env.Setenv(pkidir.EnvPassphrase, "test passphrase for the CA keys")
			return nil
		},
		Cmds: map[string]func(ts *testscript.TestScript, neg bool, args []string){
			"pki":      cmdPKI,
			"waitaddr": cmdWaitAddr,
		},
	})
}

// pki DIR makes a fleet PKI (trust domain fleet.test) as `certs init` would.
func cmdPKI(ts *testscript.TestScript, neg bool, args []string) {
	if len(args) != 1 {
		ts.Fatalf("usage: pki DIR")
	}
	_, err := pkidir.Init(ts.MkAbs(args[0]), pkidir.InitOptions{TrustDomain: "fleet.test",
		Passphrase: &pkidir.Passphrase{Secret: []byte(ts.Getenv(pkidir.EnvPassphrase)), Source: "env"}, Options: pkidir.Options{KDFIterations: 10000}})
	ts.Check(err)
}

// waitaddr FIFO waits, up to 20 s, for a server to write its --addr-file
// into FIFO (made with mkfifo before the server starts): the read returns
// the moment the server writes, so nothing polls or sleeps. It sets $ADDR
// to host:port and $PORT to the port.
func cmdWaitAddr(ts *testscript.TestScript, neg bool, args []string) {
	if len(args) != 1 {
		ts.Fatalf("usage: waitaddr FIFO")
	}
	got := make(chan []byte, 1)
	go func() {
		b, _ := os.ReadFile(ts.MkAbs(args[0]))
		got <- b
	}()
	select {
	case b := <-got:
		addr := strings.TrimSpace(string(b))
		if !strings.Contains(addr, ":") {
			ts.Fatalf("%s held %q, not an address", args[0], b)
		}
		ts.Setenv("ADDR", addr)
		ts.Setenv("PORT", addr[strings.LastIndex(addr, ":")+1:])
	case <-time.After(20 * time.Second):
		ts.Fatalf("no address in %s within 20 s", args[0])
	}
}
