package server

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"time"

	"fleetkey.dev/certs/identity"
	"fleetkey.dev/provisioning/est"
	"fleetkey.dev/provisioning/registry"
	"fleetkey.dev/provisioning/token"
)

// The admin API, /admin/v1/..., answers admin-role mTLS clients only.
//
//	GET  /admin/v1/devices?after=&limit=&status=   list devices
//	GET  /admin/v1/devices/{id}                    a device and its certificates
//	POST /admin/v1/devices/{id}/revoke             {"reason": "keyCompromise"}
//	GET  /admin/v1/tokens                          list tokens (never secrets)
//	POST /admin/v1/tokens                          create; the token is in the answer, once
//	POST /admin/v1/tokens/{id}/disable
//	GET  /admin/v1/audit?after=&limit=&subject=    the audit log
func (s *Server) registerAdmin(mux *http.ServeMux) {
	mux.HandleFunc("GET /admin/v1/devices", s.admin(s.listDevices))
	mux.HandleFunc("GET /admin/v1/devices/{id}", s.admin(s.showDevice))
	mux.HandleFunc("POST /admin/v1/devices/{id}/revoke", s.admin(s.adminRevoke))
	mux.HandleFunc("GET /admin/v1/tokens", s.admin(s.listTokens))
	mux.HandleFunc("POST /admin/v1/tokens", s.admin(s.createToken))
	mux.HandleFunc("POST /admin/v1/tokens/{id}/disable", s.admin(s.disableToken))
	mux.HandleFunc("GET /admin/v1/audit", s.admin(s.listAudit))
	mux.HandleFunc("GET /admin/v1/eks", s.admin(s.listEKs))
	mux.HandleFunc("POST /admin/v1/eks", s.admin(s.addEKs))
	mux.HandleFunc("DELETE /admin/v1/eks/{hash}", s.admin(s.removeEK))
}

// maxAdminBody bounds admin request bodies.
const maxAdminBody = 16 << 10

type adminCall struct {
	actor  string
	remote string
}

type apiError struct {
	status int
	msg    string
}

func (e *apiError) Error() string { return e.msg }

func badRequest(format string, args ...any) error {
	return &apiError{http.StatusBadRequest, fmt.Sprintf(format, args...)}
}

// admin checks the caller's admin certificate, runs fn, and writes its
// result as JSON or its error with the right status.
func (s *Server) admin(fn func(*http.Request, adminCall) (any, error)) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		peer, err := est.PeerOf(r, s.bundle, s.now(), s.offline.revoked, identity.RoleAdmin)
		if err != nil {
			s.metrics.admin.WithLabelValues("forbidden").Inc()
			writeJSON(w, http.StatusForbidden, map[string]string{"error": "the admin API needs an admin certificate: " + err.Error()})
			return
		}
		host, _, _ := net.SplitHostPort(r.RemoteAddr)
		out, err := fn(r, adminCall{actor: "admin:" + peer.ID.Name, remote: host})
		var ae *apiError
		switch {
		case err == nil:
			s.metrics.admin.WithLabelValues("ok").Inc()
			writeJSON(w, http.StatusOK, out)
		case errors.As(err, &ae):
			s.metrics.admin.WithLabelValues("refused").Inc()
			writeJSON(w, ae.status, map[string]string{"error": ae.msg})
		case errors.Is(err, registry.ErrNotFound):
			s.metrics.admin.WithLabelValues("not-found").Inc()
			writeJSON(w, http.StatusNotFound, map[string]string{"error": "not found"})
		case errors.Is(err, identity.ErrInvalid):
			s.metrics.admin.WithLabelValues("refused").Inc()
			writeJSON(w, http.StatusBadRequest, map[string]string{"error": err.Error()})
		default:
			s.metrics.admin.WithLabelValues("error").Inc()
			s.log.Error("admin API", "path", r.URL.Path, "err", err)
			writeJSON(w, http.StatusInternalServerError, map[string]string{"error": "internal error"})
		}
	}
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(v)
}

func decodeBody(r *http.Request, v any) error {
	dec := json.NewDecoder(io.LimitReader(r.Body, maxAdminBody))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil && !errors.Is(err, io.EOF) {
		return badRequest("request body: %v", err)
	}
	return nil
}

func limitParam(r *http.Request) (int, error) {
	q := r.URL.Query().Get("limit")
	if q == "" {
		return 100, nil
	}
	n, err := strconv.Atoi(q)
	if err != nil || n < 1 || n > 1000 {
		return 0, badRequest("limit %q must be 1 to 1000", q)
	}
	return n, nil
}

// DeviceView is a device as the admin API and CLI show it.
type DeviceView struct {
	ID          string            `json:"id"`
	Status      string            `json:"status"`
	Serial      string            `json:"serial"`
	Fingerprint string            `json:"sha256"`
	NotAfter    time.Time         `json:"not_after"`
	TPMBound    bool              `json:"tpm_bound"`
	Labels      map[string]string `json:"labels,omitempty"`
	CreatedAt   time.Time         `json:"created_at"`
	UpdatedAt   time.Time         `json:"updated_at"`
	Certs       []CertView        `json:"certificates,omitempty"`
}

// CertView is a certificate as the admin API shows it.
type CertView struct {
	Serial    string     `json:"serial"`
	NotBefore time.Time  `json:"not_before"`
	NotAfter  time.Time  `json:"not_after"`
	Issuer    string     `json:"issuer"`
	Token     string     `json:"token,omitempty"`
	RevokedAt *time.Time `json:"revoked_at,omitempty"`
	Reason    *int       `json:"revocation_reason,omitempty"`
}

func deviceView(d registry.Device) DeviceView {
	return DeviceView{ID: d.ID, Status: string(d.Status), Serial: d.Serial, Fingerprint: d.Fingerprint, NotAfter: d.NotAfter,
		TPMBound: d.TPMBound, Labels: d.Labels, CreatedAt: d.CreatedAt, UpdatedAt: d.UpdatedAt}
}

func (s *Server) listDevices(r *http.Request, _ adminCall) (any, error) {
	limit, err := limitParam(r)
	if err != nil {
		return nil, err
	}
	status := registry.DeviceStatus(r.URL.Query().Get("status"))
	if status != "" && status != registry.DeviceActive && status != registry.DeviceRevoked {
		return nil, badRequest("status %q must be active or revoked", status)
	}
	devs, err := s.store.ListDevices(r.Context(), registry.ListOptions{After: r.URL.Query().Get("after"), Limit: limit, Status: status})
	if err != nil {
		return nil, err
	}
	out := make([]DeviceView, 0, len(devs))
	for _, d := range devs {
		out = append(out, deviceView(d))
	}
	return out, nil
}

func (s *Server) showDevice(r *http.Request, _ adminCall) (any, error) {
	id := r.PathValue("id")
	if err := identity.ValidateID(id); err != nil {
		return nil, err
	}
	d, err := s.store.GetDevice(r.Context(), id)
	if err != nil {
		return nil, err
	}
	certs, err := s.store.ListCertificates(r.Context(), id)
	if err != nil {
		return nil, err
	}
	v := deviceView(d)
	for _, c := range certs {
		cv := CertView{Serial: c.Serial, NotBefore: c.NotBefore, NotAfter: c.NotAfter, Issuer: c.Issuer, Token: c.TokenID}
		if c.Revoked() {
			at, reason := c.RevokedAt, c.RevocationReason
			cv.RevokedAt, cv.Reason = &at, &reason
		}
		v.Certs = append(v.Certs, cv)
	}
	return v, nil
}

func (s *Server) adminRevoke(r *http.Request, call adminCall) (any, error) {
	var body struct {
		Reason string `json:"reason"`
	}
	if err := decodeBody(r, &body); err != nil {
		return nil, err
	}
	if body.Reason == "" {
		body.Reason = "unspecified"
	}
	certs, err := s.revokeDevice(r.Context(), r.PathValue("id"), body.Reason, call.actor, call.remote)
	if errors.Is(err, ErrUnknownReason) {
		return nil, badRequest("%v", err)
	}
	if err != nil {
		return nil, err
	}
	serials := make([]string, 0, len(certs))
	for _, c := range certs {
		serials = append(serials, c.Serial)
	}
	return map[string]any{"device": r.PathValue("id"), "revoked": serials}, nil
}

// TokenRequest creates a token through the admin API.
type TokenRequest struct {
	Prefix           string            `json:"prefix"`
	MaxUses          int               `json:"max_uses"`
	ExpiresIn        string            `json:"expires_in"` // Go duration, e.g. "72h"
	RequireTPM       bool              `json:"require_tpm"`
	AllowReprovision bool              `json:"allow_reprovision"`
	Labels           map[string]string `json:"labels"`
}

// TokenView is a token without its secret.
type TokenView struct {
	ID               string            `json:"id"`
	Token            string            `json:"token,omitempty"` // only in the answer to create
	Prefix           string            `json:"prefix"`
	MaxUses          int               `json:"max_uses"`
	Uses             int               `json:"uses"`
	ExpiresAt        time.Time         `json:"expires_at"`
	RequireTPM       bool              `json:"require_tpm"`
	AllowReprovision bool              `json:"allow_reprovision"`
	Disabled         bool              `json:"disabled"`
	Labels           map[string]string `json:"labels,omitempty"`
	CreatedAt        time.Time         `json:"created_at"`
	CreatedBy        string            `json:"created_by"`
}

func tokenView(t registry.Token) TokenView {
	return TokenView{ID: t.ID, Prefix: t.Prefix, MaxUses: t.MaxUses, Uses: t.Uses, ExpiresAt: t.ExpiresAt, RequireTPM: t.RequireTPM,
		AllowReprovision: t.AllowReprovision, Disabled: t.Disabled, Labels: t.Labels, CreatedAt: t.CreatedAt, CreatedBy: t.CreatedBy}
}

// MaxTokenUses and MaxTokenLifetime bound what one token can do.
const (
	MaxTokenUses     = 1_000_000
	MaxTokenLifetime = 366 * 24 * time.Hour
)

// CreateToken checks a request and stores a new token. The returned view
// holds the token itself, which is shown once and never stored.
func CreateToken(ctx context.Context, store registry.Store, req TokenRequest, expiresIn time.Duration, actor string, now time.Time) (TokenView, error) {
	if req.Prefix != "" {
		// The prefix must itself be the start of a valid id.
		if err := identity.ValidateID(req.Prefix); err != nil {
			return TokenView{}, badRequest("prefix: %v", err)
		}
	}
	if req.MaxUses < 1 || req.MaxUses > MaxTokenUses {
		return TokenView{}, badRequest("max_uses %d must be 1 to %d", req.MaxUses, MaxTokenUses)
	}
	if expiresIn <= 0 || expiresIn > MaxTokenLifetime {
		return TokenView{}, badRequest("expiry %s must be positive and at most %s", expiresIn, MaxTokenLifetime)
	}
	for k, v := range req.Labels {
		if k == "" || len(k) > 64 || len(v) > 256 || len(req.Labels) > 32 {
			return TokenView{}, badRequest("labels: at most 32, keys 1 to 64 bytes, values up to 256 bytes")
		}
	}
	tok, id, hash, err := token.New(nil)
	if err != nil {
		return TokenView{}, err
	}
	t := registry.Token{ID: id, Hash: hash, Prefix: req.Prefix, MaxUses: req.MaxUses, ExpiresAt: now.Add(expiresIn), RequireTPM: req.RequireTPM,
		AllowReprovision: req.AllowReprovision, Labels: req.Labels, CreatedAt: now, CreatedBy: actor}
	if err := store.CreateToken(ctx, t); err != nil {
		return TokenView{}, err
	}
	_ = store.Audit(ctx, registry.AuditEvent{At: now, Actor: actor, Action: "token.create", Subject: id, Outcome: registry.Allowed,
		Reason: fmt.Sprintf("prefix %q, %d uses, expires %s", req.Prefix, req.MaxUses, t.ExpiresAt.UTC().Format(time.RFC3339))})
	v := tokenView(t)
	v.Token = tok
	return v, nil
}

func (s *Server) createToken(r *http.Request, call adminCall) (any, error) {
	var req TokenRequest
	if err := decodeBody(r, &req); err != nil {
		return nil, err
	}
	d, err := time.ParseDuration(req.ExpiresIn)
	if err != nil {
		return nil, badRequest("expires_in %q is not a duration such as 72h", req.ExpiresIn)
	}
	return CreateToken(r.Context(), s.store, req, d, call.actor, s.now())
}

func (s *Server) listTokens(r *http.Request, _ adminCall) (any, error) {
	toks, err := s.store.ListTokens(r.Context())
	if err != nil {
		return nil, err
	}
	out := make([]TokenView, 0, len(toks))
	for _, t := range toks {
		out = append(out, tokenView(t))
	}
	return out, nil
}

func (s *Server) disableToken(r *http.Request, call adminCall) (any, error) {
	id := r.PathValue("id")
	if !token.ValidID(id) {
		return nil, badRequest("%q is not a token id", id)
	}
	err := s.store.DisableToken(r.Context(), id, registry.AuditEvent{At: s.now(), Actor: call.actor, Action: "token.disable", Subject: id,
		Outcome: registry.Allowed, RemoteAddr: call.remote})
	if err != nil {
		return nil, err
	}
	return map[string]string{"disabled": id}, nil
}

// AuditView is an audit event as the admin API shows it.
type AuditView struct {
	Seq        int64     `json:"seq"`
	At         time.Time `json:"at"`
	Actor      string    `json:"actor"`
	Action     string    `json:"action"`
	Subject    string    `json:"subject,omitempty"`
	Outcome    string    `json:"outcome"`
	Reason     string    `json:"reason,omitempty"`
	RemoteAddr string    `json:"remote_addr,omitempty"`
	Serial     string    `json:"serial,omitempty"`
}

func (s *Server) listAudit(r *http.Request, _ adminCall) (any, error) {
	limit, err := limitParam(r)
	if err != nil {
		return nil, err
	}
	var after int64
	if q := r.URL.Query().Get("after"); q != "" {
		if after, err = strconv.ParseInt(q, 10, 64); err != nil || after < 0 {
			return nil, badRequest("after %q must be an audit sequence number", q)
		}
	}
	evs, err := s.store.ListAudit(r.Context(), registry.AuditQuery{AfterSeq: after, Limit: limit, Subject: r.URL.Query().Get("subject")})
	if err != nil {
		return nil, err
	}
	out := make([]AuditView, 0, len(evs))
	for _, e := range evs {
		out = append(out, AuditView(e))
	}
	return out, nil
}

// EKRequest puts EKs on the attestation allowlist: each hash is the
// SHA-256 (hex) of an EK public key's SubjectPublicKeyInfo DER.
type EKRequest struct {
	Hashes []string `json:"hashes"`
	Label  string   `json:"label"`
}

func (s *Server) addEKs(r *http.Request, call adminCall) (any, error) {
	var body EKRequest
	if err := decodeBody(r, &body); err != nil {
		return nil, err
	}
	if len(body.Hashes) == 0 || len(body.Hashes) > 10_000 {
		return nil, badRequest("send 1 to 10,000 hashes")
	}
	eks := make([]registry.EKEntry, 0, len(body.Hashes))
	now := s.now()
	for _, h := range body.Hashes {
		b, err := hex.DecodeString(h)
		if err != nil || len(b) != 32 {
			return nil, badRequest("%q is not an EK hash (64 hex digits of SHA-256)", h)
		}
		eks = append(eks, registry.EKEntry{Hash: b, Label: body.Label, AddedAt: now, AddedBy: call.actor})
	}
	ev := registry.AuditEvent{At: now, Actor: call.actor, RemoteAddr: call.remote, Action: "ek.add", Subject: fmt.Sprintf("%d EKs", len(eks)), Outcome: registry.Allowed}
	if err := s.store.AddEKs(r.Context(), eks, ev); err != nil {
		return nil, err
	}
	return map[string]any{"added": len(eks)}, nil
}

func (s *Server) listEKs(r *http.Request, call adminCall) (any, error) {
	eks, err := s.store.ListEKs(r.Context())
	if err != nil {
		return nil, err
	}
	out := make([]map[string]any, 0, len(eks))
	for _, e := range eks {
		out = append(out, map[string]any{"hash": hex.EncodeToString(e.Hash), "label": e.Label, "added_at": e.AddedAt, "added_by": e.AddedBy})
	}
	return out, nil
}

func (s *Server) removeEK(r *http.Request, call adminCall) (any, error) {
	b, err := hex.DecodeString(r.PathValue("hash"))
	if err != nil || len(b) != 32 {
		return nil, badRequest("%q is not an EK hash (64 hex digits of SHA-256)", r.PathValue("hash"))
	}
	ev := registry.AuditEvent{At: s.now(), Actor: call.actor, RemoteAddr: call.remote, Action: "ek.remove", Subject: hex.EncodeToString(b), Outcome: registry.Allowed}
	if err := s.store.RemoveEK(r.Context(), b, ev); err != nil {
		return nil, err
	}
	return map[string]any{"removed": hex.EncodeToString(b)}, nil
}
