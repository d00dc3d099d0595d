package tpm

import (
	"crypto"
	"errors"
	"fmt"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
)

// The device's half of TPM attestation ("TPM attestation" in the design):
// it reports its endorsement key (EK), makes an attestation key (AK) in
// the same TPM, proves the two share a TPM by activating a credential the
// provisioning service encrypted to the EK for the AK's name, and has the
// AK certify the device key with qualifying data bound to the session.

// AKTemplate is the attestation key: ECC P-256 ECDSA-SHA256, restricted
// (it signs only structures the TPM itself made, so a TPM2_Certify by it
// is the TPM's word), fixedTPM, fixedParent, sensitiveDataOrigin.
var AKTemplate = tpm2.TPMTPublic{
	Type:    tpm2.TPMAlgECC,
	NameAlg: tpm2.TPMAlgSHA256,
	ObjectAttributes: tpm2.TPMAObject{
		FixedTPM:            true,
		FixedParent:         true,
		SensitiveDataOrigin: true,
		UserWithAuth:        true,
		Restricted:          true,
		SignEncrypt:         true,
	},
	Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgECC, &tpm2.TPMSECCParms{
		CurveID: tpm2.TPMECCNistP256,
		Scheme: tpm2.TPMTECCScheme{
			Scheme:  tpm2.TPMAlgECDSA,
			Details: tpm2.NewTPMUAsymScheme(tpm2.TPMAlgECDSA, &tpm2.TPMSSigSchemeECDSA{HashAlg: tpm2.TPMAlgSHA256}),
		},
	}),
}

// EK certificate NV indices (TCG EK Credential Profile, low range) and
// the templates their keys come from.
const (
	ekCertIndexRSA = tpm2.TPMHandle(0x01C00002) // RSA 2048, most TPMs have it
	ekCertIndexECC = tpm2.TPMHandle(0x01C0000A) // ECC NIST P-256
)

// EK is the TPM's endorsement key, from a TCG standard template.
type EK struct {
	// Public is its TPM2B_PUBLIC, as the TPM reports it.
	Public []byte
	// Key is its public key (*ecdsa.PublicKey or *rsa.PublicKey).
	Key crypto.PublicKey
	// Cert is the manufacturer's EK certificate (DER) for this key, if the
	// TPM holds one in NV; nil otherwise.
	Cert []byte
}

// ekTemplate chooses the EK: the ECC P-256 EK if its certificate is in
// NV, else the RSA 2048 EK if its certificate is, else the ECC P-256 EK
// (trusted through the allowlist). The choice depends only on the TPM, so
// it is the same at every call. Caller holds mu.
func (d *Device) ekTemplate() (tpm2.TPMTPublic, []byte) {
	if cert := d.readNV(ekCertIndexECC); cert != nil {
		return tpm2.ECCEKTemplate, cert
	}
	if cert := d.readNV(ekCertIndexRSA); cert != nil {
		return tpm2.RSAEKTemplate, cert
	}
	return tpm2.ECCEKTemplate, nil
}

// createEK makes the EK primary. Caller holds mu and flushes it.
func (d *Device) createEK() (*tpm2.CreatePrimaryResponse, []byte, error) {
	tmpl, cert := d.ekTemplate()
	rsp, err := tpm2.CreatePrimary{PrimaryHandle: tpm2.TPMRHEndorsement, InPublic: tpm2.New2B(tmpl)}.Execute(d.t)
	if err != nil {
		return nil, nil, fmt.Errorf("TPM: creating the endorsement key: %w", err)
	}
	return rsp, cert, nil
}

// EK reads the endorsement key (recreated from its template: the same key
// on every call) and its certificate, if any.
func (d *Device) EK() (*EK, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	rsp, cert, err := d.createEK()
	if err != nil {
		return nil, err
	}
	d.flush(rsp.ObjectHandle)
	pub, err := rsp.OutPublic.Contents()
	if err != nil {
		return nil, fmt.Errorf("TPM: EK public area: %w", err)
	}
	key, err := PublicKey(pub)
	if err != nil {
		return nil, err
	}
	return &EK{Public: tpm2.Marshal(rsp.OutPublic), Key: key, Cert: cert}, nil
}

// PublicKey converts a TPM public area (ECC or RSA) to a crypto public key.
func PublicKey(pub *tpm2.TPMTPublic) (crypto.PublicKey, error) {
	switch pub.Type {
	case tpm2.TPMAlgECC:
		parms, err := pub.Parameters.ECCDetail()
		if err != nil {
			return nil, err
		}
		point, err := pub.Unique.ECC()
		if err != nil {
			return nil, err
		}
		return tpm2.ECDSAPub(parms, point)
	case tpm2.TPMAlgRSA:
		parms, err := pub.Parameters.RSADetail()
		if err != nil {
			return nil, err
		}
		n, err := pub.Unique.RSA()
		if err != nil {
			return nil, err
		}
		return tpm2.RSAPub(parms, n)
	}
	return nil, fmt.Errorf("TPM: a key of type %v", pub.Type)
}

// readNV reads an NV index whole, or returns nil when there is none.
func (d *Device) readNV(index tpm2.TPMHandle) []byte {
	pub, err := tpm2.NVReadPublic{NVIndex: index}.Execute(d.t)
	if err != nil {
		return nil
	}
	contents, err := pub.NVPublic.Contents()
	if err != nil {
		return nil
	}
	var out []byte
	for off := uint16(0); off < contents.DataSize; {
		n := min(contents.DataSize-off, 768)
		rsp, err := tpm2.NVRead{
			AuthHandle: tpm2.AuthHandle{Handle: tpm2.TPMRHOwner, Auth: tpm2.PasswordAuth(nil)},
			NVIndex:    tpm2.NamedHandle{Handle: index, Name: pub.NVName},
			Size:       n, Offset: off,
		}.Execute(d.t)
		if err != nil {
			return nil
		}
		out = append(out, rsp.Data.Buffer...)
		off += n
	}
	return out
}

// CreateAK has the TPM make an attestation key under the SRK.
func (d *Device) CreateAK() (*KeyBlob, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	srk, err := d.storageRoot()
	if err != nil {
		return nil, err
	}
	rsp, err := tpm2.Create{ParentHandle: tpm2.NamedHandle{Handle: srk.ObjectHandle, Name: srk.Name}, InPublic: tpm2.New2B(AKTemplate)}.Execute(d.t)
	if err != nil {
		return nil, fmt.Errorf("TPM: creating the attestation key: %w", err)
	}
	return &KeyBlob{Public: tpm2.Marshal(rsp.OutPublic), Private: tpm2.Marshal(rsp.OutPrivate)}, nil
}

// load loads blob under the SRK. Caller holds mu and flushes the handle.
func (d *Device) load(blob *KeyBlob) (*tpm2.LoadResponse, error) {
	tpub, err := tpm2.Unmarshal[tpm2.TPM2BPublic](blob.Public)
	if err != nil {
		return nil, fmt.Errorf("TPM key blob: public area: %w", err)
	}
	tpri, err := tpm2.Unmarshal[tpm2.TPM2BPrivate](blob.Private)
	if err != nil {
		return nil, fmt.Errorf("TPM key blob: private area: %w", err)
	}
	srk, err := d.storageRoot()
	if err != nil {
		return nil, err
	}
	rsp, err := tpm2.Load{ParentHandle: tpm2.NamedHandle{Handle: srk.ObjectHandle, Name: srk.Name}, InPrivate: *tpri, InPublic: *tpub}.Execute(d.t)
	if err != nil {
		return nil, fmt.Errorf("TPM: loading a key (is this the TPM it was made in?): %w", err)
	}
	return rsp, nil
}

// Certify has the AK certify key, with qualifying data (the attestation
// session's nonce), and returns the TPM2B_ATTEST and TPMT_SIGNATURE as the
// TPM produced them.
func (d *Device) Certify(ak, key *KeyBlob, qualifying []byte) (attest, sig []byte, err error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	a, err := d.load(ak)
	if err != nil {
		return nil, nil, err
	}
	defer d.flush(a.ObjectHandle)
	k, err := d.load(key)
	if err != nil {
		return nil, nil, err
	}
	defer d.flush(k.ObjectHandle)
	rsp, err := tpm2.Certify{
		ObjectHandle:   tpm2.NamedHandle{Handle: k.ObjectHandle, Name: k.Name},
		SignHandle:     tpm2.NamedHandle{Handle: a.ObjectHandle, Name: a.Name},
		QualifyingData: tpm2.TPM2BData{Buffer: qualifying},
		InScheme:       tpm2.TPMTSigScheme{Scheme: tpm2.TPMAlgNull},
	}.Execute(d.t)
	if err != nil {
		return nil, nil, fmt.Errorf("TPM: certifying the device key: %w", err)
	}
	return tpm2.Marshal(rsp.CertifyInfo), tpm2.Marshal(rsp.Signature), nil
}

// ActivateCredential decrypts a credential the provisioning service made
// for the AK's name with the EK's public key. Only the TPM that holds both
// keys can: that is the proof that they share a TPM.
func (d *Device) ActivateCredential(ak *KeyBlob, idObject, encSecret []byte) ([]byte, error) {
	if len(idObject) == 0 || len(encSecret) == 0 || len(idObject) > 1024 || len(encSecret) > 1024 {
		return nil, errors.New("credential: empty or oversized")
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	ek, _, err := d.createEK()
	if err != nil {
		return nil, err
	}
	defer d.flush(ek.ObjectHandle)
	a, err := d.load(ak)
	if err != nil {
		return nil, err
	}
	defer d.flush(a.ObjectHandle)
	rsp, err := tpm2.ActivateCredential{
		ActivateHandle: tpm2.NamedHandle{Handle: a.ObjectHandle, Name: a.Name},
		KeyHandle: tpm2.AuthHandle{Handle: ek.ObjectHandle, Name: ek.Name,
			// The EK's policy: PolicySecret(TPM_RH_ENDORSEMENT).
			Auth: tpm2.Policy(tpm2.TPMAlgSHA256, 16, func(t transport.TPM, h tpm2.TPMISHPolicy, nonce tpm2.TPM2BNonce) error {
				_, err := tpm2.PolicySecret{AuthHandle: tpm2.TPMRHEndorsement, PolicySession: h, NonceTPM: nonce}.Execute(t)
				return err
			})},
		CredentialBlob: tpm2.TPM2BIDObject{Buffer: idObject},
		Secret:         tpm2.TPM2BEncryptedSecret{Buffer: encSecret},
	}.Execute(d.t)
	if err != nil {
		return nil, fmt.Errorf("TPM: activating the credential (not made for this TPM's EK and AK?): %w", err)
	}
	return rsp.CertInfo.Buffer, nil
}

// ChangeEndorsementSeed has the TPM replace its endorsement primary seed
// (TPM2_ChangeEPS, with the platform hierarchy's empty password): from
// then on it has a new EK, as if it were another TPM. Keys under the SRK
// are not affected. Only a TPM whose platform hierarchy is open (a
// simulator, or one on a manufacturing line before the firmware closes it)
// accepts it; the fleet simulator uses it so that one simulated TPM can
// attest many virtual devices, each with an EK of its own.
func (d *Device) ChangeEndorsementSeed() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	// go-tpm has no ChangeEPS: the command is small enough to write out.
	// tag ST_SESSIONS, size, TPM_CC_ChangeEPS, TPM_RH_PLATFORM, then one
	// password session (TPM_RS_PW, empty nonce, continueSession, empty
	// password).
	cmd := []byte{0x80, 0x02, 0, 0, 0, 27, 0, 0, 0x01, 0x24, 0x40, 0, 0, 0x0c,
		0, 0, 0, 9, 0x40, 0, 0, 0x09, 0, 0, 0x01, 0, 0}
	rsp, err := d.t.Send(cmd)
	if err != nil {
		return fmt.Errorf("TPM: ChangeEPS: %w", err)
	}
	if len(rsp) < 10 {
		return fmt.Errorf("TPM: ChangeEPS: a %d-byte response", len(rsp))
	}
	if rc := uint32(rsp[6])<<24 | uint32(rsp[7])<<16 | uint32(rsp[8])<<8 | uint32(rsp[9]); rc != 0 {
		return fmt.Errorf("TPM: ChangeEPS refused (response code 0x%x): the platform hierarchy is closed on this TPM", rc)
	}
	return nil
}
