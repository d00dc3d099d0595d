package attest

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"fleetkey.dev/certs/authority"
	"fleetkey.dev/certs/pkidir"
	"fleetkey.dev/certs/tpm"
	"fleetkey.dev/provisioning/enroll"
	"fleetkey.dev/provisioning/registry"
	"fleetkey.dev/provisioning/token"
)

type service struct {
	t     testing.TB
	srv   *httptest.Server
	store registry.Store
	h     *Handler
	clock time.Time
}

func newService(t *testing.T, allowed func([]byte) (bool, error)) *service {
	return newBenchService(t, allowed)
}

func newBenchService(t testing.TB, allowed func([]byte) (bool, error)) *service {
	t.Helper()
	pki := filepath.Join(t.TempDir(), "pki")
	pass := &pkidir.Passphrase{Secret: []byte("attestation test passphrase"), Source: "test"}
	if _, err := pkidir.Init(pki, pkidir.InitOptions{TrustDomain: "fleet.test", Passphrase: pass, Options: pkidir.Options{KDFIterations: 1000}}); err != nil {
		t.Fatal(err)
	}
	ca, err := pkidir.LoadIssuing(pki, pass)
	if err != nil {
		t.Fatal(err)
	}
	bundle, _ := pkidir.LoadBundle(pki)
	iss, err := authority.NewIssuer(ca, authority.Policy{TrustDomain: "fleet.test"})
	if err != nil {
		t.Fatal(err)
	}
	s := &service{t: t, store: registry.NewMemory(), clock: time.Now()}
	svc := &enroll.Service{Store: s.store, Issuer: iss, Bundle: bundle, Now: func() time.Time { return s.clock }}
	s.h = &Handler{Svc: svc, Trust: &EKTrust{Allowed: allowed}, Now: func() time.Time { return s.clock }}
	mux := http.NewServeMux()
	s.h.Register(mux)
	s.srv = httptest.NewServer(mux)
	t.Cleanup(s.srv.Close)
	return s
}

func (s *service) token(requireTPM bool) string { return s.tokenUses(requireTPM, 5) }

func (s *service) tokenUses(requireTPM bool, uses int) string {
	s.t.Helper()
	tok, id, hash, err := token.New(rand.Reader)
	if err != nil {
		s.t.Fatal(err)
	}
	if err := s.store.CreateToken(context.Background(), registry.Token{ID: id, Hash: hash, Prefix: "tpm-", MaxUses: uses,
		ExpiresAt: s.clock.Add(time.Hour), RequireTPM: requireTPM, CreatedAt: s.clock}); err != nil {
		s.t.Fatal(err)
	}
	return tok
}

func (s *service) post(path, tok string, body any) (int, map[string]any) {
	s.t.Helper()
	b, _ := json.Marshal(body)
	return s.postRaw(path, tok, "application/json", b)
}

func (s *service) postRaw(path, tok, contentType string, b []byte) (int, map[string]any) {
	s.t.Helper()
	req, _ := http.NewRequest("POST", s.srv.URL+path, bytes.NewReader(b))
	req.Header.Set("Content-Type", contentType)
	if tok != "" {
		req.Header.Set("Authorization", "Bearer "+tok)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		s.t.Fatal(err)
	}
	defer resp.Body.Close()
	var out map[string]any
	_ = json.NewDecoder(resp.Body).Decode(&out)
	return resp.StatusCode, out
}

// attestAndEnroll runs the device's side against the service and returns
// the finish status and answer; mutate may spoil the finish request.
func (s *service) attestAndEnroll(v *device, tok, id string, mutate func(*FinishRequest)) (int, map[string]any) {
	s.t.Helper()
	code, start := s.post("/attest/v1/start", tok, StartRequest{ID: id, EKPublic: v.ek.Public, EKCert: v.ek.Cert, AKPublic: v.ak.Public})
	if code != 200 {
		return code, start
	}
	var sr StartResponse
	b, _ := json.Marshal(start)
	json.Unmarshal(b, &sr)
	activated, err := v.d.ActivateCredential(v.ak, sr.CredentialBlob, sr.EncryptedSecret)
	if err != nil {
		s.t.Fatal(err)
	}
	attest, sig, err := v.d.Certify(v.ak, v.key, sr.Nonce)
	if err != nil {
		s.t.Fatal(err)
	}
	signer, err := v.d.Signer(v.key)
	if err != nil {
		s.t.Fatal(err)
	}
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: id}}, signer)
	if err != nil {
		s.t.Fatal(err)
	}
	fr := FinishRequest{Session: sr.Session, Activated: activated, KeyPublic: v.key.Public, CertifyInfo: attest, CertifySignature: sig, CSR: csr}
	if mutate != nil {
		mutate(&fr)
	}
	return s.post("/attest/v1/finish", tok, fr)
}

func TestAttestedEnrollment(t *testing.T) {
	v := newDevice(t)
	s := newService(t, v.allowAll)
	tok := s.token(true)
	code, out := s.attestAndEnroll(v, tok, "tpm-0001", nil)
	if code != 200 {
		t.Fatalf("finish: %d %v", code, out)
	}
	block, _ := pem.Decode([]byte(out["certificate"].(string)))
	cert, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	ekHash, bound, err := authority.TPMBinding(cert)
	if err != nil || !bound || !bytes.Equal(ekHash, v.ekHash) {
		t.Fatalf("TPM binding: %x %v %v", ekHash, bound, err)
	}
	dev, err := s.store.GetDevice(context.Background(), "tpm-0001")
	if err != nil || !dev.TPMBound || !bytes.Equal(dev.EKHash, v.ekHash) {
		t.Fatalf("registry: %+v %v", dev, err)
	}
}

// TestAttestationHTTPRefusals: each is refused with its reason and leaves
// an audit entry, and no certificate is issued.
func TestAttestationHTTPRefusals(t *testing.T) {
	v := newDevice(t)
	s := newService(t, v.allowAll)
	tok := s.token(true)
	expect := func(name string, code int, out map[string]any, wantCode int, wantReason string) {
		t.Helper()
		if code != wantCode || out["reason"] != wantReason {
			t.Errorf("%s: %d %v; want %d %s", name, code, out, wantCode, wantReason)
		}
	}
	code, out := s.attestAndEnroll(v, tok, "tpm-0002", func(f *FinishRequest) { f.Activated = make([]byte, 32) })
	expect("wrong activation secret", code, out, 403, "activation-failed")
	code, out = s.attestAndEnroll(v, tok, "tpm-0002", func(f *FinishRequest) {
		other, _, _ := v.d.CreateDeviceKey()
		f.KeyPublic = other.Public
	})
	expect("attestation of another key", code, out, 400, "certify-name")
	code, out = s.attestAndEnroll(v, tok, "tpm-0002", func(f *FinishRequest) {
		key, _, _ := v.d.CreateDeviceKey()
		signer, _ := v.d.Signer(key)
		f.CSR, _ = x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: "tpm-0002"}}, signer)
	})
	expect("CSR with another key", code, out, 400, "csr-key-not-certified")
	// A key the TPM made but may let out (not fixedTPM, not fixedParent:
	// duplicable), certified by the AK all the same.
	code, out = s.attestAndEnroll(v, tok, "tpm-0002", func(f *FinishRequest) {
		tmpl := tpm.DeviceKeyTemplate
		tmpl.ObjectAttributes.FixedTPM, tmpl.ObjectAttributes.FixedParent = false, false
		dup, _, err := v.d.CreateKey(tmpl)
		if err != nil {
			t.Fatal(err)
		}
		f.KeyPublic = dup.Public
		f.CertifyInfo, f.CertifySignature, err = v.d.Certify(v.ak, dup, nil)
		if err != nil {
			t.Fatal(err)
		}
	})
	expect("a duplicable key", code, out, 400, "key-not-fixed")
	code, out = s.attestAndEnroll(v, tok, "tpm-0002", func(f *FinishRequest) {
		var err error
		f.CertifyInfo, f.CertifySignature, err = v.d.Certify(v.ak, v.key, bytes.Repeat([]byte{9}, 32))
		if err != nil {
			t.Fatal(err)
		}
	})
	expect("qualifying data from another session", code, out, 400, "certify-nonce")
	code, out = s.attestAndEnroll(v, tok, "tpm-0002", func(f *FinishRequest) { f.CertifyInfo = append(f.CertifyInfo, 0) })
	expect("trailing bytes", code, out, 400, "malformed-certify-info")
	// A replayed session.
	var session string
	code, out = s.attestAndEnroll(v, tok, "tpm-0003", func(f *FinishRequest) { session = f.Session })
	if code != 200 {
		t.Fatalf("good enrollment: %d %v", code, out)
	}
	code, out = s.post("/attest/v1/finish", tok, FinishRequest{Session: session})
	expect("replayed session", code, out, 403, "session-unknown")
	// An expired session.
	code, out = s.attestAndEnroll(v, tok, "tpm-0004", func(f *FinishRequest) { s.clock = s.clock.Add(2 * time.Minute) })
	expect("expired session", code, out, 403, "session-expired")
	// An EK the fleet does not trust.
	s.h.Trust = &EKTrust{Allowed: func([]byte) (bool, error) { return false, nil }}
	code, out = s.attestAndEnroll(v, tok, "tpm-0005", nil)
	expect("unknown EK", code, out, 403, "ek-untrusted")
	s.h.Trust = &EKTrust{Allowed: v.allowAll}
	// An AK that is not restricted.
	code, out = s.post("/attest/v1/start", tok, StartRequest{ID: "tpm-0006", EKPublic: v.ek.Public, AKPublic: v.key.Public})
	expect("unrestricted AK", code, out, 400, "ak-not-restricted")
	// Bad input.
	code, out = s.post("/attest/v1/start", "", StartRequest{ID: "tpm-0006"})
	expect("no token", code, out, 401, "no-credential")
	// A session finished with another token than it was opened with.
	code, out = s.post("/attest/v1/start", tok, StartRequest{ID: "tpm-0007", EKPublic: v.ek.Public, AKPublic: v.ak.Public})
	if code != 200 {
		t.Fatalf("start: %d %v", code, out)
	}
	code, out = s.post("/attest/v1/finish", s.token(true), FinishRequest{Session: out["session"].(string)})
	expect("session of another token", code, out, 403, "session-token")
	// The wrong content type, and a body over the limit.
	code, out = s.postRaw("/attest/v1/start", tok, "text/plain", []byte("{}"))
	expect("content type", code, out, 415, "content-type")
	code, out = s.postRaw("/attest/v1/start", tok, "application/json", bytes.Repeat([]byte(" "), MaxBody+1))
	expect("oversized body", code, out, 413, "too-large")
	// Too many sessions open at once.
	s.h.MaxSessions = 1
	code, _ = s.post("/attest/v1/start", tok, StartRequest{ID: "tpm-0008", EKPublic: v.ek.Public, AKPublic: v.ak.Public})
	if code != 200 {
		t.Fatalf("first session: %d", code)
	}
	code, out = s.post("/attest/v1/start", tok, StartRequest{ID: "tpm-0009", EKPublic: v.ek.Public, AKPublic: v.ak.Public})
	expect("too many sessions", code, out, 503, "busy")
	s.h.MaxSessions = 0
	code, out = s.post("/attest/v1/start", tok, map[string]any{"id": "tpm-0006", "surprise": 1})
	expect("unknown field", code, out, 400, "bad-json")
	code, out = s.post("/attest/v1/start", tok, StartRequest{ID: "other-1", EKPublic: v.ek.Public, AKPublic: v.ak.Public})
	expect("id outside the token's prefix", code, out, 403, "id-not-allowed")
	// Every refusal is in the audit log; only tpm-0003 got a certificate.
	events, err := s.store.ListAudit(context.Background(), registry.AuditQuery{})
	if err != nil {
		t.Fatal(err)
	}
	refused := 0
	for _, e := range events {
		if e.Outcome == registry.Refused && strings.HasPrefix(e.Action, "attest") {
			refused++
		}
	}
	if refused < 10 {
		t.Fatalf("%d attestation refusals in the audit log", refused)
	}
	for _, id := range []string{"tpm-0002", "tpm-0004", "tpm-0005", "tpm-0006"} {
		if _, err := s.store.GetDevice(context.Background(), id); err == nil {
			t.Errorf("%s got a certificate", id)
		}
	}
	// Plain EST enrollment with a require-TPM token is refused (enroll).
	if _, err := s.h.Svc.Enroll(context.Background(), tok, enroll.Request{CSR: []byte{0}}); err == nil {
		t.Fatal("plain enrollment with a require-TPM token")
	}
}

// BenchmarkAttestedEnrollment: one device's whole attested enrollment on
// the simulated TPM, as a factory station runs it: read the EK, make an AK
// and a device key, /attest/v1/start, activate the credential, certify the
// key, sign the CSR in the TPM, /attest/v1/finish (the service in process,
// over HTTP on loopback, with the in-memory registry).
func BenchmarkAttestedEnrollment(b *testing.B) {
	simMu.Lock()
	defer simMu.Unlock()
	d, err := tpm.Open("sim")
	if err != nil {
		b.Fatal(err)
	}
	defer d.Close()
	ek, err := d.EK()
	if err != nil {
		b.Fatal(err)
	}
	hash, _ := EKHash(ek.Key)
	s := newBenchService(b, func(h []byte) (bool, error) { return bytes.Equal(h, hash), nil })
	tok := s.tokenUses(true, 1<<30)
	n := 0
	for b.Loop() {
		n++
		ak, err := d.CreateAK()
		if err != nil {
			b.Fatal(err)
		}
		key, _, err := d.CreateDeviceKey()
		if err != nil {
			b.Fatal(err)
		}
		v := &device{d: d, ek: ek, ak: ak, key: key}
		if code, out := s.attestAndEnroll(v, tok, fmt.Sprintf("tpm-%06d", n), nil); code != 200 {
			b.Fatalf("%d %v", code, out)
		}
	}
}
