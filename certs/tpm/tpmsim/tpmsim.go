// Package tpmsim registers the in-process TPM 2.0 simulator (the
// Microsoft reference implementation, through go-tpm-tools; it needs cgo)
// as --tpm sim. Only tests and the fleet simulator import it, so the
// device agent itself builds without cgo.
package tpmsim

import (
	"github.com/google/go-tpm/tpm2/transport"
	"github.com/google/go-tpm/tpm2/transport/simulator"

	"fleetkey.dev/certs/tpm"
)

func init() {
	tpm.Register("sim", func(string) (transport.TPMCloser, error) { return simulator.OpenSimulator() })
}
