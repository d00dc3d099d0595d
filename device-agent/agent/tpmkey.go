package agent

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"

	"fleetkey.dev/certs/identity"
	"fleetkey.dev/certs/keyfile"
	"fleetkey.dev/certs/tpm"
	"fleetkey.dev/certs/trust"
)

// TPMKeyFile holds a TPM-bound device's key blob (public area and the
// private area encrypted to the TPM's SRK: useless without that TPM) and
// the TPM it lives in.
const TPMKeyFile = "device.tpmkey"

type tpmKeyFile struct {
	TPM     string `json:"tpm"`
	Public  []byte `json:"public"`
	Private []byte `json:"private"`
}

// loadTPMCredentials opens the TPM (spec, or the one recorded at
// enrollment) and returns a signer over the device key.
func (s *State) loadTPMKey(spec string) (*tpm.Signer, io.Closer, error) {
	b, err := os.ReadFile(s.path(TPMKeyFile))
	if err != nil {
		return nil, nil, err
	}
	var kf tpmKeyFile
	if err := json.Unmarshal(b, &kf); err != nil {
		return nil, nil, fmt.Errorf("%s: %w", s.path(TPMKeyFile), err)
	}
	if spec == "" {
		spec = kf.TPM
	}
	d, closer, err := s.openTPM(spec)
	if err != nil {
		return nil, nil, err
	}
	signer, err := d.Signer(&tpm.KeyBlob{Public: kf.Public, Private: kf.Private})
	if err != nil {
		closer.Close()
		return nil, nil, fmt.Errorf("%s: %w", s.path(TPMKeyFile), err)
	}
	return signer, closer, nil
}

// openTPM opens the TPM spec names, or returns the shared TPMDevice with
// a closer that leaves it open.
func (s *State) openTPM(spec string) (*tpm.Device, io.Closer, error) {
	if s.TPMDevice != nil {
		return s.TPMDevice, io.NopCloser(nil), nil
	}
	d, err := tpm.Open(spec)
	if err != nil {
		return nil, nil, err
	}
	return d, d, nil
}

// attestation API messages (provisioning/attest).
type attestStart struct {
	ID       string `json:"id"`
	EKPublic []byte `json:"ek_public"`
	EKCert   []byte `json:"ek_cert,omitempty"`
	AKPublic []byte `json:"ak_public"`
}

type attestChallenge struct {
	Session         string `json:"session"`
	CredentialBlob  []byte `json:"credential_blob"`
	EncryptedSecret []byte `json:"encrypted_secret"`
	Nonce           []byte `json:"nonce"`
}

type attestFinish struct {
	Session          string `json:"session"`
	Activated        []byte `json:"activated"`
	KeyPublic        []byte `json:"key_public"`
	CertifyInfo      []byte `json:"certify_info"`
	CertifySignature []byte `json:"certify_signature"`
	CSR              []byte `json:"csr"`
}

type attestResult struct {
	Certificate string `json:"certificate"`
}

// enrollTPM makes the device key inside the TPM and enrolls through
// TPM attestation: the service checks the EK, activates a credential to
// tie the AK to it, and has the AK certify the key before it issues a
// TPM-bound certificate.
func (s *State) enrollTPM(ctx context.Context, o EnrollOptions, client *http.Client, base string, bundle *trust.Bundle) (*x509.Certificate, error) {
	d, closer, err := s.openTPM(o.TPM)
	if err != nil {
		return nil, err
	}
	defer closer.Close()
	ek, err := d.EK()
	if err != nil {
		return nil, err
	}
	ak, err := d.CreateAK()
	if err != nil {
		return nil, err
	}
	key, _, err := d.CreateDeviceKey()
	if err != nil {
		return nil, err
	}
	var ch attestChallenge
	if err := postJSON(ctx, client, base+"/attest/v1/start", o.Token, attestStart{ID: o.ID, EKPublic: ek.Public, EKCert: ek.Cert, AKPublic: ak.Public}, &ch); err != nil {
		return nil, fmt.Errorf("attestation start: %w", err)
	}
	activated, err := d.ActivateCredential(ak, ch.CredentialBlob, ch.EncryptedSecret)
	if err != nil {
		return nil, err
	}
	attest, sig, err := d.Certify(ak, key, ch.Nonce)
	if err != nil {
		return nil, err
	}
	signer, err := d.Signer(key)
	if err != nil {
		return nil, err
	}
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: o.ID}}, signer)
	if err != nil {
		return nil, err
	}
	var res attestResult
	if err := postJSON(ctx, client, base+"/attest/v1/finish", o.Token, attestFinish{Session: ch.Session, Activated: activated, KeyPublic: key.Public,
		CertifyInfo: attest, CertifySignature: sig, CSR: csr}, &res); err != nil {
		return nil, fmt.Errorf("attestation finish: %w", err)
	}
	block, _ := pem.Decode([]byte(res.Certificate))
	if block == nil {
		return nil, errors.New("attestation finish: no certificate in the answer")
	}
	leaf, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		return nil, fmt.Errorf("attestation finish: %w", err)
	}
	if !samePublicKey(leaf.PublicKey, signer.Public()) {
		return nil, errors.New("the certificate returned is not for the TPM's device key")
	}
	if _, err := bundle.Verify([]*x509.Certificate{leaf}, trust.VerifyOptions{Roles: []identity.Role{identity.RoleDevice}, RequireTPM: true}); err != nil {
		return nil, fmt.Errorf("the provisioning service returned a certificate that is not a TPM-bound device certificate of this fleet: %w", err)
	}
	kf, _ := json.MarshalIndent(tpmKeyFile{TPM: o.TPM, Public: key.Public, Private: key.Private}, "", "  ")
	if err := keyfile.WriteFile(s.path(TPMKeyFile), append(kf, '\n'), 0o600, false); err != nil {
		return nil, fmt.Errorf("storing the TPM key blob: %w", err)
	}
	if err := keyfile.WriteFile(s.path(CertFile), pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: leaf.Raw}), 0o644, true); err != nil {
		return nil, err
	}
	return leaf, nil
}

// postJSON posts v as JSON with the token and decodes the answer into
// out; a refusal comes back with the service's reason.
func postJSON(ctx context.Context, c *http.Client, url, tok string, v, out any) error {
	body, err := json.Marshal(v)
	if err != nil {
		return err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, url, bytes.NewReader(body))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Authorization", "Bearer "+tok)
	resp, err := c.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, maxESTReply+1))
	if err != nil {
		return err
	}
	if resp.StatusCode != http.StatusOK {
		var e struct{ Error, Reason string }
		if json.Unmarshal(data, &e) == nil && e.Reason != "" {
			return fmt.Errorf("refused with %s (%s): %s", resp.Status, e.Reason, e.Error)
		}
		return fmt.Errorf("refused with %s: %s", resp.Status, strings.TrimSpace(string(data)))
	}
	return json.Unmarshal(data, out)
}
