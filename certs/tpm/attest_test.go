package tpm_test

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/sha256"
	"math/big"
	"testing"

	"github.com/google/go-tpm/tpm2"

	"fleetkey.dev/certs/tpm"
)

// The provisioning service's side of the checks below is done here in
// plain Go with go-tpm's structures, as a stand-in until the service's
// /attest/v1 endpoints exist (issue 6): it proves the device's half
// produces what the service needs.

func public(t *testing.T, b []byte) *tpm2.TPMTPublic {
	t.Helper()
	p, err := tpm2.Unmarshal[tpm2.TPM2BPublic](b)
	if err != nil {
		t.Fatal(err)
	}
	c, err := p.Contents()
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func TestAttestationFlow(t *testing.T) {
	testSignerAndAttestation(t, openSim(t))
}

// testSignerAndAttestation runs the device's half of attestation on d,
// and checks each answer as the service would.
func testSignerAndAttestation(t *testing.T, d *tpm.Device) {
	t.Helper()
	ek, err := d.EK()
	if err != nil {
		t.Fatal(err)
	}
	if again, _ := d.EK(); !bytes.Equal(again.Public, ek.Public) {
		t.Fatal("the EK is not the same from one call to the next")
	}
	ak, err := d.CreateAK()
	if err != nil {
		t.Fatal(err)
	}
	key, keyPub, err := d.CreateDeviceKey()
	if err != nil {
		t.Fatal(err)
	}

	// The service checks the AK's attributes and makes a credential for
	// its name, encrypted to the EK.
	akPub := public(t, ak.Public)
	if a := akPub.ObjectAttributes; !a.Restricted || !a.SignEncrypt || !a.FixedTPM || !a.FixedParent || !a.SensitiveDataOrigin {
		t.Fatalf("AK attributes %+v", a)
	}
	akName, err := tpm2.ObjectName(akPub)
	if err != nil {
		t.Fatal(err)
	}
	ekKey, err := tpm2.ImportEncapsulationKey(public(t, ek.Public))
	if err != nil {
		t.Fatal(err)
	}
	secret := make([]byte, 32)
	rand.Read(secret)
	idObject, encSecret, err := tpm2.CreateCredential(rand.Reader, ekKey, akName.Buffer, secret)
	if err != nil {
		t.Fatal(err)
	}
	got, err := d.ActivateCredential(ak, idObject, encSecret)
	if err != nil || !bytes.Equal(got, secret) {
		t.Fatalf("activation: %x %v", got, err)
	}
	// Another AK of the same TPM cannot activate a credential for this one.
	other, _ := d.CreateAK()
	if _, err := d.ActivateCredential(other, idObject, encSecret); err == nil {
		t.Fatal("a credential for one AK activated with another")
	}
	tampered := bytes.Clone(idObject)
	tampered[len(tampered)-1] ^= 1
	if got, err := d.ActivateCredential(ak, tampered, encSecret); err == nil && bytes.Equal(got, secret) {
		t.Fatal("a tampered credential gave the secret")
	}

	// The AK certifies the device key with the session's nonce.
	nonce := make([]byte, 32)
	rand.Read(nonce)
	attest, sig, err := d.Certify(ak, key, nonce)
	if err != nil {
		t.Fatal(err)
	}
	a2b, err := tpm2.Unmarshal[tpm2.TPM2BAttest](attest)
	if err != nil {
		t.Fatal(err)
	}
	info, err := a2b.Contents()
	if err != nil {
		t.Fatal(err)
	}
	if info.Type != tpm2.TPMSTAttestCertify || !bytes.Equal(info.ExtraData.Buffer, nonce) {
		t.Fatalf("attestation type %v, extra data %x", info.Type, info.ExtraData.Buffer)
	}
	certified, err := info.Attested.Certify()
	if err != nil {
		t.Fatal(err)
	}
	keyName, _ := tpm2.ObjectName(public(t, key.Public))
	if !bytes.Equal(certified.Name.Buffer, keyName.Buffer) {
		t.Fatal("the certified name is not the device key's")
	}
	if a := public(t, key.Public).ObjectAttributes; !a.FixedTPM || a.Restricted {
		t.Fatalf("device key attributes %+v", a)
	}
	ts, err := tpm2.Unmarshal[tpm2.TPMTSignature](sig)
	if err != nil {
		t.Fatal(err)
	}
	es, err := ts.Signature.ECDSA()
	if err != nil {
		t.Fatal(err)
	}
	akParms, _ := akPub.Parameters.ECCDetail()
	akPoint, _ := akPub.Unique.ECC()
	akKey, err := tpm2.ECDSAPub(akParms, akPoint)
	if err != nil {
		t.Fatal(err)
	}
	digest := sha256.Sum256(attest[2:]) // the TPMS_ATTEST inside the TPM2B
	if !ecdsa.Verify(akKey, digest[:], new(big.Int).SetBytes(es.SignatureR.Buffer), new(big.Int).SetBytes(es.SignatureS.Buffer)) {
		t.Fatal("the AK's signature over the attestation does not verify")
	}
	// And the certified key is the key a CSR would carry.
	kp := public(t, key.Public)
	kParms, _ := kp.Parameters.ECCDetail()
	kPoint, _ := kp.Unique.ECC()
	if k, err := tpm2.ECDSAPub(kParms, kPoint); err != nil || !k.Equal(keyPub) {
		t.Fatalf("certified key differs from the device key: %v", err)
	}
}
