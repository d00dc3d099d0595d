package registry

import (
	"context"
	"maps"
	"slices"
	"sort"
	"sync"
	"time"
)

// memStore is the in-memory Store: one mutex, copies in and out.
type memStore struct {
	mu       sync.Mutex
	tokens   map[string]Token
	devices  map[string]Device
	certs    map[string]Certificate
	audit    []AuditEvent
	revSeq   int64
	auditSeq int64
}

// NewMemory returns an empty in-memory Store, for tests and tools.
func NewMemory() Store {
	return &memStore{tokens: map[string]Token{}, devices: map[string]Device{}, certs: map[string]Certificate{}}
}

func clamp(limit int) int {
	switch {
	case limit <= 0:
		return 100
	case limit > 1000:
		return 1000
	}
	return limit
}

func copyToken(t Token) Token {
	t.Hash = slices.Clone(t.Hash)
	t.Labels = maps.Clone(t.Labels)
	return t
}

func copyDevice(d Device) Device {
	d.EKHash = slices.Clone(d.EKHash)
	d.Labels = maps.Clone(d.Labels)
	return d
}

func copyCert(c Certificate) Certificate {
	c.DER = slices.Clone(c.DER)
	return c
}

func (m *memStore) CreateToken(ctx context.Context, t Token) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, ok := m.tokens[t.ID]; ok {
		return ErrExists
	}
	m.tokens[t.ID] = copyToken(t)
	return nil
}

func (m *memStore) GetToken(ctx context.Context, id string) (Token, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	t, ok := m.tokens[id]
	if !ok {
		return Token{}, ErrNotFound
	}
	return copyToken(t), nil
}

func (m *memStore) ListTokens(ctx context.Context) ([]Token, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := make([]Token, 0, len(m.tokens))
	for _, t := range m.tokens {
		out = append(out, copyToken(t))
	}
	sort.Slice(out, func(i, j int) bool {
		return out[i].CreatedAt.Before(out[j].CreatedAt) || (out[i].CreatedAt.Equal(out[j].CreatedAt) && out[i].ID < out[j].ID)
	})
	return out, nil
}

func (m *memStore) DisableToken(ctx context.Context, id string, audit AuditEvent) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	t, ok := m.tokens[id]
	if !ok {
		return ErrNotFound
	}
	t.Disabled = true
	m.tokens[id] = t
	m.appendAudit(audit)
	return nil
}

func (m *memStore) GetDevice(ctx context.Context, id string) (Device, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	d, ok := m.devices[id]
	if !ok {
		return Device{}, ErrNotFound
	}
	return copyDevice(d), nil
}

func (m *memStore) ListDevices(ctx context.Context, opts ListOptions) ([]Device, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []Device
	for _, d := range m.devices {
		if d.ID > opts.After && (opts.Status == "" || d.Status == opts.Status) {
			out = append(out, copyDevice(d))
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out[:min(len(out), clamp(opts.Limit))], nil
}

func (m *memStore) GetCertificate(ctx context.Context, serial string) (Certificate, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	c, ok := m.certs[serial]
	if !ok {
		return Certificate{}, ErrNotFound
	}
	return copyCert(c), nil
}

func (m *memStore) ListCertificates(ctx context.Context, deviceID string) ([]Certificate, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []Certificate
	for _, c := range m.certs {
		if c.DeviceID == deviceID {
			out = append(out, copyCert(c))
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].CreatedAt.Before(out[j].CreatedAt) })
	return out, nil
}

func (m *memStore) FindIssued(ctx context.Context, tokenID, deviceID, requestHash string) (Certificate, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, c := range m.certs {
		if c.TokenID == tokenID && c.DeviceID == deviceID && c.RequestHash == requestHash {
			return copyCert(c), nil
		}
	}
	return Certificate{}, ErrNotFound
}

func (m *memStore) RecordIssue(ctx context.Context, rec IssueRecord) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	at := rec.Cert.CreatedAt
	var tok Token
	if rec.TokenID != "" {
		var ok bool
		if tok, ok = m.tokens[rec.TokenID]; !ok {
			return ErrNotFound
		}
		switch {
		case tok.Disabled:
			return ErrTokenDisabled
		case !at.Before(tok.ExpiresAt):
			return ErrTokenExpired
		case tok.Uses >= tok.MaxUses:
			return ErrTokenSpent
		}
	}
	cur, exists := m.devices[rec.Device.ID]
	switch {
	case exists && cur.Status == DeviceRevoked:
		return ErrConflict
	case exists && cur.Serial != rec.ExpectSerial, !exists && rec.ExpectSerial != "":
		return ErrConflict
	}
	if _, dup := m.certs[rec.Cert.Serial]; dup {
		return ErrExists
	}
	if rec.RevokePrevious && rec.ExpectSerial != "" {
		if old, ok := m.certs[rec.ExpectSerial]; ok && !old.Revoked() {
			m.revSeq++
			old.RevokedAt, old.RevocationReason, old.RevocationSeq = at, 4, m.revSeq
			m.certs[old.Serial] = old
		}
	}
	if rec.TokenID != "" {
		tok.Uses++
		m.tokens[tok.ID] = tok
	}
	dev := copyDevice(rec.Device)
	if exists {
		dev.CreatedAt = cur.CreatedAt
	}
	m.devices[dev.ID] = dev
	m.certs[rec.Cert.Serial] = copyCert(rec.Cert)
	m.appendAudit(rec.Audit)
	return nil
}

func (m *memStore) revoke(c Certificate, reason int, at time.Time) Certificate {
	m.revSeq++
	c.RevokedAt, c.RevocationReason, c.RevocationSeq = at, reason, m.revSeq
	m.certs[c.Serial] = c
	return copyCert(c)
}

func (m *memStore) RevokeDevice(ctx context.Context, id string, reason int, at time.Time, audit AuditEvent) ([]Certificate, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	d, ok := m.devices[id]
	if !ok {
		return nil, ErrNotFound
	}
	var todo []Certificate
	for _, c := range m.certs {
		if c.DeviceID == id && !c.Revoked() {
			todo = append(todo, c)
		}
	}
	sort.Slice(todo, func(i, j int) bool { return todo[i].CreatedAt.Before(todo[j].CreatedAt) })
	var out []Certificate
	for _, c := range todo {
		out = append(out, m.revoke(c, reason, at))
	}
	if d.Status != DeviceRevoked || len(out) > 0 {
		d.Status, d.UpdatedAt = DeviceRevoked, at
		m.devices[id] = d
		m.appendAudit(audit)
	}
	return out, nil
}

func (m *memStore) RevokeCertificate(ctx context.Context, serial string, reason int, at time.Time, audit AuditEvent) (Certificate, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	c, ok := m.certs[serial]
	if !ok {
		return Certificate{}, ErrNotFound
	}
	if c.Revoked() {
		return copyCert(c), nil
	}
	m.appendAudit(audit)
	return m.revoke(c, reason, at), nil
}

func (m *memStore) RevocationsSince(ctx context.Context, seq int64, limit int) ([]Certificate, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []Certificate
	for _, c := range m.certs {
		if c.RevocationSeq > seq {
			out = append(out, copyCert(c))
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].RevocationSeq < out[j].RevocationSeq })
	return out[:min(len(out), clamp(limit))], nil
}

func (m *memStore) RevokedUnexpired(ctx context.Context, now time.Time) ([]Certificate, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []Certificate
	for _, c := range m.certs {
		if c.Revoked() && c.NotAfter.After(now) {
			out = append(out, copyCert(c))
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].RevocationSeq < out[j].RevocationSeq })
	return out, nil
}

func (m *memStore) appendAudit(e AuditEvent) {
	m.auditSeq++
	e.Seq = m.auditSeq
	m.audit = append(m.audit, e)
}

func (m *memStore) Audit(ctx context.Context, e AuditEvent) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.appendAudit(e)
	return nil
}

func (m *memStore) ListAudit(ctx context.Context, q AuditQuery) ([]AuditEvent, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []AuditEvent
	limit := clamp(q.Limit)
	for _, e := range m.audit {
		if e.Seq > q.AfterSeq && (q.Subject == "" || e.Subject == q.Subject) {
			out = append(out, e)
			if len(out) == limit {
				break
			}
		}
	}
	return out, nil
}

func (m *memStore) Ping(ctx context.Context) error { return ctx.Err() }
func (m *memStore) Close() error                   { return nil }
