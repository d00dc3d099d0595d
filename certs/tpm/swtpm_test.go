package tpm_test

import (
	"crypto"
	"crypto/x509"
	"strings"
	"testing"

	"fleetkey.dev/certs/tpm"
	"fleetkey.dev/certs/tpm/tpmsim"
)

func TestSWTPM(t *testing.T) {
	spec := tpmsim.StartSWTPM(t, false)
	d, err := tpm.Open(spec)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	testSignerAndAttestation(t, d)
	ek, err := d.EK()
	if err != nil {
		t.Fatal(err)
	}
	if ek.Cert != nil {
		t.Fatal("an unmanufactured swtpm reported an EK certificate")
	}
}

func TestSWTPMWithEKCertificate(t *testing.T) {
	spec := tpmsim.StartSWTPM(t, true)
	d, err := tpm.Open(spec)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	ek, err := d.EK()
	if err != nil {
		t.Fatal(err)
	}
	if ek.Cert == nil {
		t.Fatal("no EK certificate read from NV")
	}
	// TCG EK certificates carry a critical SAN (the TPM's manufacturer and
	// model as a directory name) that Go refuses to parse as a SAN; that
	// is the provisioning service's business. The key must be the EK's.
	cert, err := x509.ParseCertificate(ek.Cert)
	if err != nil {
		t.Logf("Go's parser refuses this EK certificate: %v", err)
		return
	}
	if !cert.PublicKey.(interface{ Equal(crypto.PublicKey) bool }).Equal(ek.Key) {
		t.Fatal("the EK certificate is for another key than the EK")
	}
	testSignerAndAttestation(t, d)
}

func TestSWTPMOverTCP(t *testing.T) {
	d, err := tpm.Open(tpmsim.StartSWTPMTCP(t))
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	testSignerAndAttestation(t, d)
}

// TestChangeEndorsementSeedRefused: a TPM whose platform hierarchy is
// closed (as firmware leaves a real one) refuses, with a reason.
func TestChangeEndorsementSeedRefused(t *testing.T) {
	spec := tpmsim.StartSWTPM(t, false)
	d, err := tpm.Open(spec)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if err := d.DisablePlatformHierarchy(); err != nil {
		t.Fatal(err)
	}
	err = d.ChangeEndorsementSeed()
	if err == nil || !strings.Contains(err.Error(), "platform hierarchy is closed") {
		t.Fatalf("ChangeEPS on a closed platform hierarchy: %v", err)
	}
}
