package main

import (
	"fmt"
	"os"
	"strconv"
	"testing"

	"github.com/rogpeppe/go-internal/testscript"
)

// The CLI is tested as txtar scripts in testdata/script, run against the
// real binary; where openssl is installed, the scripts check every file the
// CLI writes with it.
func TestMain(m *testing.M) {
	testscript.Main(m, map[string]func(){"certs": main})
}

func TestScripts(t *testing.T) {
	t.Parallel()
	testscript.Run(t, testscript.Params{
		Dir: "testdata/script",
		Setup: func(env *testscript.Env) error {
			env.Setenv("FLEETKEY_CA_PASSPHRASE", "test passphrase for the CA keys")
			return nil
		},
		Cmds: map[string]func(ts *testscript.TestScript, neg bool, args []string){
			"mode": cmdMode,
		},
	})
}

// mode FILE OCTAL asserts a file's permission bits.
func cmdMode(ts *testscript.TestScript, neg bool, args []string) {
	if len(args) != 2 {
		ts.Fatalf("usage: mode FILE OCTAL")
	}
	fi, err := os.Stat(ts.MkAbs(args[0]))
	ts.Check(err)
	want, err := strconv.ParseUint(args[1], 8, 32)
	ts.Check(err)
	got := uint64(fi.Mode().Perm())
	if (got == want) == neg {
		ts.Fatalf("%s has mode %s; want %s%s", args[0], fmt.Sprintf("%o", got), map[bool]string{true: "not ", false: ""}[neg], args[1])
	}
}
