// Command certs creates and runs a fleetkey PKI: the root and issuing CAs,
// the trust bundle, gateway/service/admin certificates, CRLs and issuing-CA
// rollover. It is a thin layer of flags over fleetkey.dev/certs.
package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"time"
)

const usage = `certs: the fleetkey PKI tool

Usage:
  certs init --dir DIR --trust-domain TD [--gateway-dns NAMES] [--gateway-ip IPS]
  certs issue --dir DIR --role gateway|service|admin --name N [--dns ..] [--ip ..] [--csr FILE]
  certs inspect [--bundle FILE] FILE...
  certs crl --dir DIR [--revoke SERIAL,...] [--reason R] [--lifetime 7d]
  certs rotate-issuing --dir DIR

The CA passphrase comes from --passphrase-file, $FLEETKEY_CA_PASSPHRASE,
$FLEETKEY_CA_PASSPHRASE_FILE, or DIR/ca.pass (which init writes when it is
given none: fine for development, move it off the machine for production).

Example:
  certs init --dir ./pki --trust-domain fleet.example --gateway-dns gw.fleet.example
  certs inspect ./pki/gateway.crt
  openssl verify -CAfile ./pki/root.crt -untrusted ./pki/issuing.crt ./pki/gateway.crt

Run 'certs COMMAND --help' for a command's flags.
`

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

// errUsage marks a misuse: it exits 2 and the message carries a hint.
var errUsage = errors.New("usage")

func run(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return 2
	}
	commands := map[string]func([]string, io.Writer) error{
		"init":           cmdInit,
		"issue":          cmdIssue,
		"inspect":        cmdInspect,
		"crl":            cmdCRL,
		"rotate-issuing": cmdRotate,
	}
	name := args[0]
	if name == "help" || name == "-h" || name == "--help" {
		fmt.Fprint(stdout, usage)
		return 0
	}
	cmd, ok := commands[name]
	if !ok {
		fmt.Fprintf(stderr, "certs: unknown command %q\nhint: run 'certs --help' for the list of commands\n", name)
		return 2
	}
	err := cmd(args[1:], stdout)
	switch {
	case err == nil:
		return 0
	case errors.Is(err, flag.ErrHelp):
		return 0
	case errors.Is(err, errUsage):
		fmt.Fprintf(stderr, "certs %s: %v\n", name, strings.TrimPrefix(err.Error(), errUsage.Error()+": "))
		return 2
	case errors.Is(err, errFailedCheck):
		return 1
	default:
		fmt.Fprintf(stderr, "certs %s: %v\n", name, err)
		return 1
	}
}

// errFailedCheck is returned once the command has already told the user
// what failed (inspect: a certificate that does not verify).
var errFailedCheck = errors.New("check failed")

func usageErr(format string, args ...any) error {
	return fmt.Errorf("%w: %s", errUsage, fmt.Sprintf(format, args...))
}

// flags is a command's flag set with its usage text.
type flags struct {
	*flag.FlagSet
	synopsis string
	out      io.Writer
}

// newFlags makes a flag set whose --help prints synopsis (the command's
// usage and an example) and the flags to out. Parse errors do not print;
// they come back as usage errors with a hint.
func newFlags(name, synopsis string, out io.Writer) *flags {
	fs := flag.NewFlagSet("certs "+name, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.Usage = func() {}
	return &flags{FlagSet: fs, synopsis: synopsis, out: out}
}

func (f *flags) parse(args []string) error {
	err := f.Parse(args)
	if errors.Is(err, flag.ErrHelp) {
		fmt.Fprintf(f.out, "%s\n\nFlags:\n", f.synopsis)
		f.SetOutput(f.out)
		f.PrintDefaults()
		return err
	}
	if err != nil {
		return usageErr("%v\nhint: run '%s --help'", err, f.Name())
	}
	return nil
}

// listFlag is a comma-separated, repeatable string list flag.
type listFlag []string

func (l *listFlag) String() string { return strings.Join(*l, ",") }
func (l *listFlag) Set(s string) error {
	for _, v := range strings.Split(s, ",") {
		if v = strings.TrimSpace(v); v != "" {
			*l = append(*l, v)
		}
	}
	return nil
}

// parseDuration accepts Go durations plus a "d" (day) suffix: 90d, 36h.
func parseDuration(s string) (time.Duration, error) {
	if days, ok := strings.CutSuffix(s, "d"); ok {
		n, err := strconv.Atoi(days)
		if err != nil || n <= 0 {
			return 0, fmt.Errorf("%q is not a whole number of days", s)
		}
		return time.Duration(n) * 24 * time.Hour, nil
	}
	d, err := time.ParseDuration(s)
	if err != nil || d <= 0 {
		return 0, fmt.Errorf("%q is not a positive duration (examples: 90d, 36h)", s)
	}
	return d, nil
}
