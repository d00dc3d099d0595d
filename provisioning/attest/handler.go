package attest

import (
	"crypto"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"sync"
	"time"

	"github.com/google/go-tpm/tpm2"

	"fleetkey.dev/certs/identity"
	"fleetkey.dev/certs/tpm"
	"fleetkey.dev/provisioning/enroll"
	"fleetkey.dev/provisioning/est"
	"fleetkey.dev/provisioning/token"
)

// The attestation API (JSON over HTTPS, with the enrollment token as
// Bearer, like EST's simpleenroll). Byte fields are base64 (standard).
//
//	POST /attest/v1/start   {id, ek_public, ek_cert?, ak_public}
//	                     -> {session, credential_blob, encrypted_secret, nonce, expires_at}
//	POST /attest/v1/finish  {session, activated, key_public, certify_info, certify_signature, csr}
//	                     -> {certificate (PEM), serial, not_after}
//
// ek_public, ak_public and key_public are TPM2B_PUBLIC; certify_info a
// TPM2B_ATTEST; certify_signature a TPMT_SIGNATURE; csr a DER PKCS#10.

// StartRequest opens an attestation session.
type StartRequest struct {
	ID       string `json:"id"`
	EKPublic []byte `json:"ek_public"`
	EKCert   []byte `json:"ek_cert,omitempty"`
	AKPublic []byte `json:"ak_public"`
}

// StartResponse is the credential challenge and the nonce to certify with.
type StartResponse struct {
	Session         string    `json:"session"`
	CredentialBlob  []byte    `json:"credential_blob"`
	EncryptedSecret []byte    `json:"encrypted_secret"`
	Nonce           []byte    `json:"nonce"`
	ExpiresAt       time.Time `json:"expires_at"`
}

// FinishRequest answers the challenge and asks for the certificate.
type FinishRequest struct {
	Session          string `json:"session"`
	Activated        []byte `json:"activated"`
	KeyPublic        []byte `json:"key_public"`
	CertifyInfo      []byte `json:"certify_info"`
	CertifySignature []byte `json:"certify_signature"`
	CSR              []byte `json:"csr"`
}

// FinishResponse carries the TPM-bound certificate.
type FinishResponse struct {
	Certificate string    `json:"certificate"`
	Serial      string    `json:"serial"`
	NotAfter    time.Time `json:"not_after"`
}

// MaxBody bounds a request body.
const MaxBody = 16 << 10

// Handler serves /attest/v1. Sessions live in memory: single use, and
// gone after SessionTTL.
type Handler struct {
	Svc   *enroll.Service
	Trust *EKTrust
	// AddrLimiter rate-limits by client address; nil means no limit.
	AddrLimiter est.Limiter
	Log         *slog.Logger
	Now         func() time.Time
	Rand        io.Reader
	SessionTTL  time.Duration // default 60 s
	MaxSessions int           // default 10,000

	mu       sync.Mutex
	sessions map[string]*session
}

type session struct {
	id       string
	tokenID  string
	device   string
	ak       *tpm2.TPMTPublic
	ekHash   []byte
	ch       *Challenge
	nonce    []byte
	expires  time.Time
	remote   string
	howTrust string
}

// Register adds the endpoints to mux.
func (h *Handler) Register(mux *http.ServeMux) {
	mux.HandleFunc("POST /attest/v1/start", h.start)
	mux.HandleFunc("POST /attest/v1/finish", h.finish)
}

func (h *Handler) now() time.Time {
	if h.Now != nil {
		return h.Now()
	}
	return time.Now()
}

func (h *Handler) rnd() io.Reader {
	if h.Rand != nil {
		return h.Rand
	}
	return rand.Reader
}

// fail answers a refusal as JSON and records it in the audit log.
func (h *Handler) fail(w http.ResponseWriter, r *http.Request, action, actor string, ref *enroll.Refusal, recorded bool) {
	if !recorded {
		h.Svc.Refuse(r.Context(), action, actor, est.ClientAddr(r), ref)
	}
	if ref.RetryAfter > 0 {
		w.Header().Set("Retry-After", fmt.Sprint(ref.RetryAfter))
	}
	writeJSON(w, ref.Status, map[string]string{"error": ref.Message, "reason": ref.Reason})
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

// decode reads a JSON body of at most MaxBody bytes, refusing unknown
// fields and trailing data.
func decode(w http.ResponseWriter, r *http.Request, v any) *enroll.Refusal {
	if ct := r.Header.Get("Content-Type"); ct != "application/json" {
		return enroll.NewRefusal(http.StatusUnsupportedMediaType, "content-type", "send application/json, not %q", ct)
	}
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, MaxBody))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		var tooBig *http.MaxBytesError
		if errors.As(err, &tooBig) {
			return enroll.NewRefusal(http.StatusRequestEntityTooLarge, "too-large", "the body is larger than %d bytes", MaxBody)
		}
		return enroll.NewRefusal(http.StatusBadRequest, "bad-json", "the body is not the expected JSON: %v", err)
	}
	if dec.More() {
		return enroll.NewRefusal(http.StatusBadRequest, "bad-json", "trailing data after the JSON object")
	}
	return nil
}

// asRefusal turns a verification error into a 400 refusal.
func asRefusal(err error) *enroll.Refusal {
	var e *Error
	if errors.As(err, &e) {
		status := http.StatusBadRequest
		if e.Reason == "ek-untrusted" || e.Reason == "activation-failed" {
			status = http.StatusForbidden
		}
		return enroll.NewRefusal(status, e.Reason, "%s", e.Message)
	}
	return nil
}

func (h *Handler) start(w http.ResponseWriter, r *http.Request) {
	const action = "attest-start"
	actor := "token:?"
	tok, hasTok := est.BearerOrBasic(r)
	if id, _, err := token.Parse(tok); hasTok && err == nil {
		actor = "token:" + id
	}
	if h.AddrLimiter != nil {
		if ok, wait := h.AddrLimiter.Allow("addr:" + est.ClientAddr(r)); !ok {
			ref := enroll.NewRefusal(http.StatusTooManyRequests, "rate-limited", "too many requests; retry in %s", wait.Round(time.Second))
			ref.RetryAfter = int(wait.Seconds()) + 1
			h.fail(w, r, action, actor, ref, false)
			return
		}
	}
	if !hasTok {
		h.fail(w, r, action, actor, enroll.NewRefusal(http.StatusUnauthorized, "no-credential", "attestation needs an enrollment token: 'Authorization: Bearer <token>'"), false)
		return
	}
	var req StartRequest
	if ref := decode(w, r, &req); ref != nil {
		h.fail(w, r, action, actor, ref, false)
		return
	}
	if err := identity.ValidateID(req.ID); err != nil {
		h.fail(w, r, action, actor, enroll.NewRefusal(http.StatusBadRequest, "bad-id", "%v", err), false)
		return
	}
	if err := h.Svc.CheckToken(r.Context(), tok, req.ID, est.ClientAddr(r)); err != nil {
		if ref, ok := enroll.AsRefusal(err); ok {
			h.fail(w, r, action, actor, ref, true)
			return
		}
		http.Error(w, "internal error", http.StatusInternalServerError)
		return
	}
	s, err := h.open(&req)
	if ref := asRefusal(err); ref != nil {
		h.fail(w, r, action, actor, ref, false)
		return
	}
	if err != nil {
		h.log().Error("attestation start", "err", err)
		http.Error(w, "internal error", http.StatusInternalServerError)
		return
	}
	tid, _, _ := token.Parse(tok)
	s.tokenID, s.remote = tid, est.ClientAddr(r)
	if ref := h.store(s); ref != nil {
		h.fail(w, r, action, actor, ref, false)
		return
	}
	h.log().Info("attestation session opened", "device", req.ID, "ek_trusted_by", s.howTrust, "actor", actor)
	writeJSON(w, http.StatusOK, StartResponse{Session: s.id, CredentialBlob: s.ch.IDObject, EncryptedSecret: s.ch.EncSecret, Nonce: s.nonce, ExpiresAt: s.expires})
}

// open checks the EK and AK and makes the session's challenge.
func (h *Handler) open(req *StartRequest) (*session, error) {
	ekPub, err := ParsePublic(req.EKPublic, "ek")
	if err != nil {
		return nil, err
	}
	ekKey, err := tpmPublicKey(ekPub, "ek")
	if err != nil {
		return nil, err
	}
	if h.Trust == nil {
		return nil, refuse("ek-untrusted", "this service trusts no EK: configure an EK allowlist or manufacturer roots")
	}
	ekHash, how, err := h.Trust.Check(ekKey, req.EKCert, h.now())
	if err != nil {
		return nil, err
	}
	akPub, err := ParsePublic(req.AKPublic, "ak")
	if err != nil {
		return nil, err
	}
	if err := CheckAK(akPub); err != nil {
		return nil, err
	}
	ch, err := MakeChallenge(h.rnd(), ekPub, akPub)
	if err != nil {
		return nil, err
	}
	s := &session{device: req.ID, ak: akPub, ekHash: ekHash, ch: ch, howTrust: how, nonce: make([]byte, 32)}
	idb := make([]byte, 32)
	if _, err := io.ReadFull(h.rnd(), idb); err != nil {
		return nil, err
	}
	if _, err := io.ReadFull(h.rnd(), s.nonce); err != nil {
		return nil, err
	}
	s.id = hex.EncodeToString(idb)
	return s, nil
}

func tpmPublicKey(p *tpm2.TPMTPublic, what string) (crypto.PublicKey, error) {
	k, err := tpm.PublicKey(p)
	if err != nil {
		return nil, refuse("malformed-"+what, "%s: %v", what, err)
	}
	return k, nil
}

func (h *Handler) store(s *session) *enroll.Refusal {
	ttl, max := h.SessionTTL, h.MaxSessions
	if ttl == 0 {
		ttl = 60 * time.Second
	}
	if max == 0 {
		max = 10_000
	}
	now := h.now()
	s.expires = now.Add(ttl)
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.sessions == nil {
		h.sessions = map[string]*session{}
	}
	for id, o := range h.sessions {
		if !now.Before(o.expires) {
			delete(h.sessions, id)
		}
	}
	if len(h.sessions) >= max {
		ref := enroll.NewRefusal(http.StatusServiceUnavailable, "busy", "too many attestation sessions open; retry shortly")
		ref.RetryAfter = int(ttl.Seconds())
		return ref
	}
	h.sessions[s.id] = s
	return nil
}

// take removes and returns a session: each is used once, whatever the
// outcome.
func (h *Handler) take(id string) *session {
	h.mu.Lock()
	defer h.mu.Unlock()
	s := h.sessions[id]
	delete(h.sessions, id)
	return s
}

func (h *Handler) finish(w http.ResponseWriter, r *http.Request) {
	const action = "attest-finish"
	actor := "token:?"
	tok, hasTok := est.BearerOrBasic(r)
	tid, _, terr := token.Parse(tok)
	if hasTok && terr == nil {
		actor = "token:" + tid
	}
	if !hasTok {
		h.fail(w, r, action, actor, enroll.NewRefusal(http.StatusUnauthorized, "no-credential", "attestation needs an enrollment token: 'Authorization: Bearer <token>'"), false)
		return
	}
	var req FinishRequest
	if ref := decode(w, r, &req); ref != nil {
		h.fail(w, r, action, actor, ref, false)
		return
	}
	s := h.take(req.Session)
	switch {
	case s == nil:
		h.fail(w, r, action, actor, enroll.NewRefusal(http.StatusForbidden, "session-unknown", "no such attestation session: it was used already, has expired, or never existed"), false)
		return
	case !h.now().Before(s.expires):
		h.fail(w, r, action, actor, enroll.NewRefusal(http.StatusForbidden, "session-expired", "the attestation session expired at %s; start again", s.expires.UTC().Format(time.RFC3339)), false)
		return
	case s.tokenID != tid:
		h.fail(w, r, action, actor, enroll.NewRefusal(http.StatusForbidden, "session-token", "the attestation session was opened with another token"), false)
		return
	}
	att, err := s.verify(&req)
	if ref := asRefusal(err); ref != nil {
		h.fail(w, r, action, actor, ref, false)
		return
	}
	if err != nil {
		h.log().Error("attestation finish", "err", err)
		http.Error(w, "internal error", http.StatusInternalServerError)
		return
	}
	res, err := h.Svc.EnrollAttested(r.Context(), tok, enroll.Request{CSR: req.CSR, RemoteAddr: est.ClientAddr(r)}, att)
	if ref, ok := enroll.AsRefusal(err); ok {
		h.fail(w, r, action, actor, ref, true)
		return
	}
	if err != nil {
		h.log().Error("attested enrollment", "err", err)
		http.Error(w, "internal error", http.StatusInternalServerError)
		return
	}
	writeJSON(w, http.StatusOK, FinishResponse{
		Certificate: string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: res.Cert.Raw})),
		Serial:      res.Cert.SerialNumber.Text(16), NotAfter: res.Cert.NotAfter,
	})
}

// verify checks the answers: the activated secret, then the certified key
// and its attestation.
func (s *session) verify(req *FinishRequest) (*enroll.Attested, error) {
	if err := s.ch.CheckActivation(req.Activated); err != nil {
		return nil, err
	}
	keyPub, err := ParsePublic(req.KeyPublic, "key")
	if err != nil {
		return nil, err
	}
	key, err := CheckDeviceKey(keyPub)
	if err != nil {
		return nil, err
	}
	if err := CheckCertify(s.ak, keyPub, req.CertifyInfo, req.CertifySignature, s.nonce); err != nil {
		return nil, err
	}
	return &enroll.Attested{EKHash: s.ekHash, Key: key, Name: s.device}, nil
}

func (h *Handler) log() *slog.Logger {
	if h.Log != nil {
		return h.Log
	}
	return slog.New(slog.DiscardHandler)
}
