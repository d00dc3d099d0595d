package registry

import (
	"cmp"
	"context"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"
)

// memStore is the in-memory Store. One mutex guards everything, so every
// method is one atomic step; values are copied in and out, so no caller
// ever holds a pointer, slice or map the store also holds.
type memStore struct {
	mu       sync.Mutex
	tokens   map[string]Token
	devices  map[string]Device
	certs    map[string]Certificate
	audit    []AuditEvent
	revSeq   int64
	auditSeq int64
	eks      []EKEntry
}

// NewMemory returns an empty in-memory Store, for tests and tools. It
// behaves as the SQL stores do (the conformance suite checks it), times
// included: they are kept in UTC with microsecond precision.
func NewMemory() Store {
	return &memStore{tokens: map[string]Token{}, devices: map[string]Device{}, certs: map[string]Certificate{}}
}

// lock takes the mutex unless ctx is done; on success the caller must
// unlock.
func (m *memStore) lock(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	m.mu.Lock()
	return nil
}

func (m *memStore) CreateToken(ctx context.Context, t Token) error {
	if err := checkToken(t); err != nil {
		return err
	}
	if err := m.lock(ctx); err != nil {
		return err
	}
	defer m.mu.Unlock()
	if _, ok := m.tokens[t.ID]; ok {
		return tokenErr(t.ID, ErrExists)
	}
	m.tokens[t.ID] = normToken(t)
	return nil
}

func (m *memStore) GetToken(ctx context.Context, id string) (Token, error) {
	if err := m.lock(ctx); err != nil {
		return Token{}, err
	}
	defer m.mu.Unlock()
	t, ok := m.tokens[id]
	if !ok {
		return Token{}, tokenErr(id, ErrNotFound)
	}
	return normToken(t), nil
}

func (m *memStore) ListTokens(ctx context.Context) ([]Token, error) {
	if err := m.lock(ctx); err != nil {
		return nil, err
	}
	defer m.mu.Unlock()
	if len(m.tokens) > maxTokens {
		return nil, fmt.Errorf("listing tokens: more than %d: %w", maxTokens, errTooMany)
	}
	out := make([]Token, 0, len(m.tokens))
	for _, t := range m.tokens {
		out = append(out, normToken(t))
	}
	slices.SortFunc(out, func(a, b Token) int {
		return cmp.Or(a.CreatedAt.Compare(b.CreatedAt), strings.Compare(a.ID, b.ID))
	})
	return out, nil
}

func (m *memStore) DisableToken(ctx context.Context, id string, audit AuditEvent) error {
	if err := m.lock(ctx); err != nil {
		return err
	}
	defer m.mu.Unlock()
	t, ok := m.tokens[id]
	if !ok {
		return tokenErr(id, ErrNotFound)
	}
	t.Disabled = true
	m.tokens[id] = t
	m.appendAudit(audit)
	return nil
}

func (m *memStore) GetDevice(ctx context.Context, id string) (Device, error) {
	if err := m.lock(ctx); err != nil {
		return Device{}, err
	}
	defer m.mu.Unlock()
	d, ok := m.devices[id]
	if !ok {
		return Device{}, deviceErr(id, ErrNotFound)
	}
	return normDevice(d), nil
}

func (m *memStore) ListDevices(ctx context.Context, opts ListOptions) ([]Device, error) {
	if err := m.lock(ctx); err != nil {
		return nil, err
	}
	defer m.mu.Unlock()
	var out []Device
	for _, d := range m.devices {
		if d.ID > opts.After && (opts.Status == "" || d.Status == opts.Status) {
			out = append(out, d)
		}
	}
	slices.SortFunc(out, func(a, b Device) int { return strings.Compare(a.ID, b.ID) })
	out = out[:min(len(out), clampLimit(opts.Limit))]
	for i := range out {
		out[i] = normDevice(out[i])
	}
	return out, nil
}

func (m *memStore) GetCertificate(ctx context.Context, serial string) (Certificate, error) {
	if err := m.lock(ctx); err != nil {
		return Certificate{}, err
	}
	defer m.mu.Unlock()
	c, ok := m.certs[serial]
	if !ok {
		return Certificate{}, certErr(serial, ErrNotFound)
	}
	return normCert(c), nil
}

// byCreated orders certificates oldest first, serial breaking ties (the
// SQL stores' ORDER BY created_at, serial).
func byCreated(a, b Certificate) int {
	return cmp.Or(a.CreatedAt.Compare(b.CreatedAt), strings.Compare(a.Serial, b.Serial))
}

func (m *memStore) ListCertificates(ctx context.Context, deviceID string) ([]Certificate, error) {
	if err := m.lock(ctx); err != nil {
		return nil, err
	}
	defer m.mu.Unlock()
	out := m.certsWhere(func(c Certificate) bool { return c.DeviceID == deviceID })
	if len(out) > maxDeviceCerts {
		return nil, fmt.Errorf("listing certificates of %q: more than %d: %w", deviceID, maxDeviceCerts, errTooMany)
	}
	slices.SortFunc(out, byCreated)
	return out, nil
}

// certsWhere returns copies of the certificates keep accepts, unordered.
func (m *memStore) certsWhere(keep func(Certificate) bool) []Certificate {
	var out []Certificate
	for _, c := range m.certs {
		if keep(c) {
			out = append(out, normCert(c))
		}
	}
	return out
}

func (m *memStore) RecordIssue(ctx context.Context, rec IssueRecord) error {
	if err := checkIssue(rec); err != nil {
		return err
	}
	if err := m.lock(ctx); err != nil {
		return issueErr(rec.Cert.Serial, err)
	}
	defer m.mu.Unlock()
	serial, at := rec.Cert.Serial, normTime(rec.Cert.CreatedAt)

	// Check everything first, write only once nothing can fail.
	var tok Token
	if rec.TokenID != "" {
		var ok bool
		if tok, ok = m.tokens[rec.TokenID]; !ok {
			return issueErr(serial, tokenErr(rec.TokenID, ErrNotFound))
		}
		if err := tokenRefusal(tok, at); err != nil {
			return issueErr(serial, err)
		}
	}
	cur, exists := m.devices[rec.Device.ID]
	switch {
	case !exists && rec.ExpectSerial != "":
		return issueErr(serial, deviceErr(rec.Device.ID, fmt.Errorf("expected serial %q, device does not exist: %w", rec.ExpectSerial, ErrConflict)))
	case exists && cur.Status != DeviceActive:
		return issueErr(serial, deviceErr(rec.Device.ID, fmt.Errorf("device is %s: %w", cur.Status, ErrConflict)))
	case exists && cur.Serial != rec.ExpectSerial:
		return issueErr(serial, deviceErr(rec.Device.ID, fmt.Errorf("expected serial %q, device has %q: %w", rec.ExpectSerial, cur.Serial, ErrConflict)))
	}
	if _, dup := m.certs[serial]; dup {
		return issueErr(serial, ErrExists)
	}

	if rec.TokenID != "" {
		tok.Uses++
		m.tokens[tok.ID] = tok
	}
	dev := normDevice(rec.Device)
	if exists {
		dev.CreatedAt = cur.CreatedAt
	}
	m.devices[dev.ID] = dev
	if rec.RevokePrevious && rec.ExpectSerial != "" {
		if old, ok := m.certs[rec.ExpectSerial]; ok && old.DeviceID == dev.ID && !old.Revoked() {
			m.revoke(old, reasonSuperseded, at)
		}
	}
	m.certs[serial] = newCert(rec.Cert)
	m.appendAudit(rec.Audit)
	return nil
}

// revoke gives c the next revocation sequence number and returns a copy.
func (m *memStore) revoke(c Certificate, reason int, at time.Time) Certificate {
	m.revSeq++
	c.RevokedAt, c.RevocationReason, c.RevocationSeq = normTime(at), reason, m.revSeq
	m.certs[c.Serial] = c
	return normCert(c)
}

func (m *memStore) RevokeDevice(ctx context.Context, id string, reason int, at time.Time, audit AuditEvent) ([]Certificate, error) {
	if err := checkRevocationTime(at); err != nil {
		return nil, revokeDeviceErr(id, err)
	}
	if err := m.lock(ctx); err != nil {
		return nil, revokeDeviceErr(id, err)
	}
	defer m.mu.Unlock()
	d, ok := m.devices[id]
	if !ok {
		return nil, revokeDeviceErr(id, ErrNotFound)
	}
	todo := m.certsWhere(func(c Certificate) bool { return c.DeviceID == id && !c.Revoked() })
	if d.Status == DeviceRevoked && len(todo) == 0 {
		return nil, nil // already done: change nothing
	}
	slices.SortFunc(todo, byCreated)
	var out []Certificate
	for _, c := range todo {
		out = append(out, m.revoke(c, reason, at))
	}
	d.Status, d.UpdatedAt = DeviceRevoked, normTime(at)
	m.devices[id] = d
	m.appendAudit(audit)
	return out, nil
}

func (m *memStore) RevokeCertificate(ctx context.Context, serial string, reason int, at time.Time, audit AuditEvent) (Certificate, error) {
	if err := checkRevocationTime(at); err != nil {
		return Certificate{}, revokeCertErr(serial, err)
	}
	if err := m.lock(ctx); err != nil {
		return Certificate{}, revokeCertErr(serial, err)
	}
	defer m.mu.Unlock()
	c, ok := m.certs[serial]
	if !ok {
		return Certificate{}, revokeCertErr(serial, ErrNotFound)
	}
	if c.Revoked() {
		return normCert(c), nil // already revoked: change nothing
	}
	out := m.revoke(c, reason, at)
	m.appendAudit(audit)
	return out, nil
}

// byRevocation orders certificates by revocation sequence number.
func byRevocation(a, b Certificate) int { return cmp.Compare(a.RevocationSeq, b.RevocationSeq) }

func (m *memStore) RevocationsSince(ctx context.Context, seq int64, limit int) ([]Certificate, error) {
	if err := m.lock(ctx); err != nil {
		return nil, err
	}
	defer m.mu.Unlock()
	out := m.certsWhere(func(c Certificate) bool { return c.Revoked() && c.RevocationSeq > seq })
	slices.SortFunc(out, byRevocation)
	return out[:min(len(out), clampLimit(limit))], nil
}

func (m *memStore) RevokedUnexpired(ctx context.Context, now time.Time) ([]Certificate, error) {
	if err := m.lock(ctx); err != nil {
		return nil, err
	}
	defer m.mu.Unlock()
	now = normTime(now)
	out := m.certsWhere(func(c Certificate) bool { return c.Revoked() && c.NotAfter.After(now) })
	if len(out) > maxRevokedUnexpire {
		return nil, fmt.Errorf("listing revoked certificates: more than %d: %w", maxRevokedUnexpire, errTooMany)
	}
	slices.SortFunc(out, byRevocation)
	return out, nil
}

func (m *memStore) appendAudit(e AuditEvent) {
	e = normAudit(e)
	m.auditSeq++
	e.Seq = m.auditSeq
	m.audit = append(m.audit, e)
}

func (m *memStore) Audit(ctx context.Context, e AuditEvent) error {
	if err := m.lock(ctx); err != nil {
		return err
	}
	defer m.mu.Unlock()
	m.appendAudit(e)
	return nil
}

func (m *memStore) ListAudit(ctx context.Context, q AuditQuery) ([]AuditEvent, error) {
	if err := m.lock(ctx); err != nil {
		return nil, err
	}
	defer m.mu.Unlock()
	limit := clampLimit(q.Limit)
	// The log is in Seq order: start after AfterSeq.
	i, _ := slices.BinarySearchFunc(m.audit, q.AfterSeq+1, func(e AuditEvent, seq int64) int { return cmp.Compare(e.Seq, seq) })
	var out []AuditEvent
	for _, e := range m.audit[i:] {
		if q.Subject == "" || e.Subject == q.Subject {
			out = append(out, e)
			if len(out) == limit {
				break
			}
		}
	}
	return out, nil
}

func (m *memStore) Ping(ctx context.Context) error {
	if err := m.lock(ctx); err != nil {
		return err
	}
	m.mu.Unlock()
	return nil
}

// Close releases nothing: the data stays readable (tests inspect a store
// after the server using it shut down).
func (m *memStore) Close() error { return nil }

func (m *memStore) AddEKs(ctx context.Context, eks []EKEntry, audit AuditEvent) error {
	for _, e := range eks {
		if err := checkEK(e); err != nil {
			return err
		}
	}
	if err := m.lock(ctx); err != nil {
		return err
	}
	defer m.mu.Unlock()
	for _, e := range eks {
		if slices.IndexFunc(m.eks, func(x EKEntry) bool { return string(x.Hash) == string(e.Hash) }) < 0 {
			e.Hash = slices.Clone(e.Hash)
			m.eks = append(m.eks, e)
		}
	}
	m.appendAudit(audit)
	return nil
}

func (m *memStore) HasEK(ctx context.Context, hash []byte) (bool, error) {
	if err := m.lock(ctx); err != nil {
		return false, err
	}
	defer m.mu.Unlock()
	return slices.IndexFunc(m.eks, func(x EKEntry) bool { return string(x.Hash) == string(hash) }) >= 0, nil
}

func (m *memStore) ListEKs(ctx context.Context) ([]EKEntry, error) {
	if err := m.lock(ctx); err != nil {
		return nil, err
	}
	defer m.mu.Unlock()
	return slices.Clone(m.eks), nil
}

func (m *memStore) RemoveEK(ctx context.Context, hash []byte, audit AuditEvent) error {
	if err := m.lock(ctx); err != nil {
		return err
	}
	defer m.mu.Unlock()
	i := slices.IndexFunc(m.eks, func(x EKEntry) bool { return string(x.Hash) == string(hash) })
	if i < 0 {
		return fmt.Errorf("EK %x: %w", hash, ErrNotFound)
	}
	m.eks = slices.Delete(m.eks, i, i+1)
	m.appendAudit(audit)
	return nil
}
