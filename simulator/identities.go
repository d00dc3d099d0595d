package simulator

import (
	"fmt"

	"fleetkey.dev/certs/authority"
	"fleetkey.dev/certs/pkidir"
	"fleetkey.dev/certs/trust"
	"fleetkey.dev/device-agent/agent"
)

// Fleet mints device identities straight from the fleet's issuing CA
// (--identities fast): what a load test needs when enrollment itself is
// not under test. Each device still gets its own key and certificate.
type Fleet struct {
	issuer *authority.Issuer
	bundle *trust.Bundle
}

// OpenFleet loads the issuing CA of a PKI directory (its passphrase from
// ca.pass or the environment, as `certs` finds it).
func OpenFleet(pki string) (*Fleet, error) {
	pass, err := pkidir.ResolvePassphrase(pki, "")
	if err != nil {
		return nil, err
	}
	ca, err := pkidir.LoadIssuing(pki, pass)
	if err != nil {
		return nil, err
	}
	bundle, err := pkidir.LoadBundle(pki)
	if err != nil {
		return nil, err
	}
	return &Fleet{issuer: &authority.Issuer{CA: ca, Policy: authority.Policy{TrustDomain: bundle.TrustDomain()}}, bundle: bundle}, nil
}

// Mint makes n identities ("sim-%05d") in parallel, one worker per CPU,
// in memory.
func (f *Fleet) Mint(n int) ([]*agent.Credentials, error) {
	out := make([]*agent.Credentials, n)
	idx := make([]int, n)
	for i := range idx {
		idx[i] = i
	}
	if err := f.mintInto(out, idx); err != nil {
		return nil, err
	}
	return out, nil
}

func deviceID(i int) string { return fmt.Sprintf("sim-%05d", i) }

// Issuer is the fleet's issuing CA, for attacks that need identities of
// their own.
func (f *Fleet) Issuer() *authority.Issuer { return f.issuer }

// Bundle is the fleet's trust bundle.
func (f *Fleet) Bundle() *trust.Bundle { return f.bundle }
