package registry

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"
)

// sqlStore is the Store over database/sql, shared by SQLite and
// PostgreSQL. The statements are written once, with '?' placeholders and
// portable types; a dialect rewrites what differs.
//
// Times are stored as Unix milliseconds (BIGINT) in both databases, so
// there is one encoding and no time-zone question.
type sqlStore struct {
	db *sql.DB
	d  dialect
}

// dialect is what differs between the databases.
type dialect struct {
	name string
	// rebind turns '?' placeholders into the database's own.
	rebind func(string) string
	// ddl turns the portable schema into the database's.
	ddl func(string) string
	// isUnique reports a unique-constraint violation.
	isUnique func(error) bool
	// lockRevocations serialises the transactions that assign revocation
	// sequence numbers, so they commit in number order (a no-op where the
	// database already serialises writers).
	lockRevocations func(ctx context.Context, tx *sql.Tx) error
}

const schemaVersion = 1

// schema is version 1, in portable form: BLOB and AUTO_SEQ are rewritten by
// the dialect.
const schema = `
CREATE TABLE tokens (
	id TEXT PRIMARY KEY,
	hash BLOB NOT NULL,
	prefix TEXT NOT NULL,
	max_uses INTEGER NOT NULL,
	uses INTEGER NOT NULL,
	expires_at BIGINT NOT NULL,
	require_tpm BOOLEAN NOT NULL,
	allow_reprovision BOOLEAN NOT NULL,
	disabled BOOLEAN NOT NULL,
	labels TEXT NOT NULL,
	created_at BIGINT NOT NULL,
	created_by TEXT NOT NULL
);
CREATE TABLE devices (
	id TEXT PRIMARY KEY,
	status TEXT NOT NULL,
	serial TEXT NOT NULL,
	fingerprint TEXT NOT NULL,
	not_after BIGINT NOT NULL,
	tpm_bound BOOLEAN NOT NULL,
	ek_hash BLOB,
	labels TEXT NOT NULL,
	created_at BIGINT NOT NULL,
	updated_at BIGINT NOT NULL
);
CREATE INDEX devices_status ON devices (status, id);
CREATE TABLE certificates (
	serial TEXT PRIMARY KEY,
	device_id TEXT NOT NULL,
	fingerprint TEXT NOT NULL,
	public_key_hash TEXT NOT NULL,
	request_hash TEXT NOT NULL,
	token_id TEXT NOT NULL,
	issuer TEXT NOT NULL,
	not_before BIGINT NOT NULL,
	not_after BIGINT NOT NULL,
	der BLOB NOT NULL,
	tpm_bound BOOLEAN NOT NULL,
	created_at BIGINT NOT NULL,
	revoked_at BIGINT,
	revocation_reason INTEGER NOT NULL,
	revocation_seq BIGINT UNIQUE
);
CREATE INDEX certificates_device ON certificates (device_id, created_at);
CREATE INDEX certificates_issued ON certificates (token_id, device_id, request_hash);
CREATE INDEX certificates_revoked ON certificates (not_after) WHERE revoked_at IS NOT NULL;
CREATE TABLE audit (
	seq AUTO_SEQ,
	at BIGINT NOT NULL,
	actor TEXT NOT NULL,
	action TEXT NOT NULL,
	subject TEXT NOT NULL,
	outcome TEXT NOT NULL,
	reason TEXT NOT NULL,
	remote_addr TEXT NOT NULL,
	serial TEXT NOT NULL
);
CREATE INDEX audit_subject ON audit (subject, seq);
`

// migrate creates the schema if the database is new. Callers that share a
// database between processes hold a lock around it.
func (s *sqlStore) migrate(ctx context.Context, conn *sql.Conn) error {
	if _, err := conn.ExecContext(ctx, `CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)`); err != nil {
		return fmt.Errorf("creating schema_version: %w", err)
	}
	var v int
	err := conn.QueryRowContext(ctx, `SELECT version FROM schema_version`).Scan(&v)
	switch {
	case errors.Is(err, sql.ErrNoRows):
	case err != nil:
		return fmt.Errorf("reading schema version: %w", err)
	case v == schemaVersion:
		return nil
	case v > schemaVersion:
		return fmt.Errorf("the registry has schema version %d, newer than this build's %d; upgrade fleetkey", v, schemaVersion)
	}
	tx, err := conn.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	defer tx.Rollback()
	for _, stmt := range strings.Split(s.d.ddl(schema), ";") {
		if strings.TrimSpace(stmt) == "" {
			continue
		}
		if _, err := tx.ExecContext(ctx, stmt); err != nil {
			return fmt.Errorf("creating schema: %w", err)
		}
	}
	if _, err := tx.ExecContext(ctx, s.d.rebind(`INSERT INTO schema_version (version) VALUES (?)`), schemaVersion); err != nil {
		return err
	}
	return tx.Commit()
}

func ms(t time.Time) int64 { return t.UnixMilli() }

func fromMS(v int64) time.Time { return time.UnixMilli(v).UTC() }

func labelsJSON(m map[string]string) string {
	if len(m) == 0 {
		return "{}"
	}
	b, _ := json.Marshal(m)
	return string(b)
}

func parseLabels(s string) (map[string]string, error) {
	var m map[string]string
	if err := json.Unmarshal([]byte(s), &m); err != nil {
		return nil, fmt.Errorf("stored labels: %w", err)
	}
	if len(m) == 0 {
		return nil, nil
	}
	return m, nil
}

// exec and query wrap the dialect's placeholder rewriting.
type querier interface {
	ExecContext(ctx context.Context, q string, args ...any) (sql.Result, error)
	QueryContext(ctx context.Context, q string, args ...any) (*sql.Rows, error)
	QueryRowContext(ctx context.Context, q string, args ...any) *sql.Row
}

func (s *sqlStore) exec(ctx context.Context, q querier, stmt string, args ...any) (sql.Result, error) {
	return q.ExecContext(ctx, s.d.rebind(stmt), args...)
}

func (s *sqlStore) row(ctx context.Context, q querier, stmt string, args ...any) *sql.Row {
	return q.QueryRowContext(ctx, s.d.rebind(stmt), args...)
}

func (s *sqlStore) rows(ctx context.Context, q querier, stmt string, args ...any) (*sql.Rows, error) {
	return q.QueryContext(ctx, s.d.rebind(stmt), args...)
}

// inTx runs fn in a transaction and commits it.
func (s *sqlStore) inTx(ctx context.Context, fn func(tx *sql.Tx) error) error {
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	defer tx.Rollback()
	if err := fn(tx); err != nil {
		return err
	}
	return tx.Commit()
}

const tokenCols = `id, hash, prefix, max_uses, uses, expires_at, require_tpm, allow_reprovision, disabled, labels, created_at, created_by`

type scanner interface{ Scan(dest ...any) error }

func scanToken(sc scanner) (Token, error) {
	var t Token
	var labels string
	var expires, created int64
	if err := sc.Scan(&t.ID, &t.Hash, &t.Prefix, &t.MaxUses, &t.Uses, &expires, &t.RequireTPM, &t.AllowReprovision, &t.Disabled, &labels, &created, &t.CreatedBy); err != nil {
		return Token{}, err
	}
	t.ExpiresAt, t.CreatedAt = fromMS(expires), fromMS(created)
	var err error
	t.Labels, err = parseLabels(labels)
	return t, err
}

func (s *sqlStore) CreateToken(ctx context.Context, t Token) error {
	_, err := s.exec(ctx, s.db, `INSERT INTO tokens (`+tokenCols+`) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`,
		t.ID, t.Hash, t.Prefix, t.MaxUses, t.Uses, ms(t.ExpiresAt), t.RequireTPM, t.AllowReprovision, t.Disabled, labelsJSON(t.Labels), ms(t.CreatedAt), t.CreatedBy)
	if s.d.isUnique(err) {
		return ErrExists
	}
	if err != nil {
		return fmt.Errorf("creating token %q: %w", t.ID, err)
	}
	return nil
}

func (s *sqlStore) GetToken(ctx context.Context, id string) (Token, error) {
	t, err := scanToken(s.row(ctx, s.db, `SELECT `+tokenCols+` FROM tokens WHERE id = ?`, id))
	if errors.Is(err, sql.ErrNoRows) {
		return Token{}, ErrNotFound
	}
	if err != nil {
		return Token{}, fmt.Errorf("reading token %q: %w", id, err)
	}
	return t, nil
}

func (s *sqlStore) ListTokens(ctx context.Context) ([]Token, error) {
	rows, err := s.rows(ctx, s.db, `SELECT `+tokenCols+` FROM tokens ORDER BY created_at, id LIMIT 10000`)
	if err != nil {
		return nil, fmt.Errorf("listing tokens: %w", err)
	}
	defer rows.Close()
	var out []Token
	for rows.Next() {
		t, err := scanToken(rows)
		if err != nil {
			return nil, err
		}
		out = append(out, t)
	}
	return out, rows.Err()
}

func (s *sqlStore) DisableToken(ctx context.Context, id string, audit AuditEvent) error {
	return s.inTx(ctx, func(tx *sql.Tx) error {
		res, err := s.exec(ctx, tx, `UPDATE tokens SET disabled = ? WHERE id = ?`, true, id)
		if err != nil {
			return fmt.Errorf("disabling token %q: %w", id, err)
		}
		if n, _ := res.RowsAffected(); n == 0 {
			return ErrNotFound
		}
		return s.appendAudit(ctx, tx, audit)
	})
}

const deviceCols = `id, status, serial, fingerprint, not_after, tpm_bound, ek_hash, labels, created_at, updated_at`

func scanDevice(sc scanner) (Device, error) {
	var d Device
	var labels string
	var notAfter, created, updated int64
	if err := sc.Scan(&d.ID, &d.Status, &d.Serial, &d.Fingerprint, &notAfter, &d.TPMBound, &d.EKHash, &labels, &created, &updated); err != nil {
		return Device{}, err
	}
	d.NotAfter, d.CreatedAt, d.UpdatedAt = fromMS(notAfter), fromMS(created), fromMS(updated)
	if len(d.EKHash) == 0 {
		d.EKHash = nil
	}
	var err error
	d.Labels, err = parseLabels(labels)
	return d, err
}

func (s *sqlStore) GetDevice(ctx context.Context, id string) (Device, error) {
	d, err := scanDevice(s.row(ctx, s.db, `SELECT `+deviceCols+` FROM devices WHERE id = ?`, id))
	if errors.Is(err, sql.ErrNoRows) {
		return Device{}, ErrNotFound
	}
	if err != nil {
		return Device{}, fmt.Errorf("reading device %q: %w", id, err)
	}
	return d, nil
}

func (s *sqlStore) ListDevices(ctx context.Context, opts ListOptions) ([]Device, error) {
	q := `SELECT ` + deviceCols + ` FROM devices WHERE id > ?`
	args := []any{opts.After}
	if opts.Status != "" {
		q += ` AND status = ?`
		args = append(args, string(opts.Status))
	}
	q += ` ORDER BY id LIMIT ` + strconv.Itoa(clamp(opts.Limit))
	rows, err := s.rows(ctx, s.db, q, args...)
	if err != nil {
		return nil, fmt.Errorf("listing devices: %w", err)
	}
	defer rows.Close()
	var out []Device
	for rows.Next() {
		d, err := scanDevice(rows)
		if err != nil {
			return nil, err
		}
		out = append(out, d)
	}
	return out, rows.Err()
}

const certCols = `serial, device_id, fingerprint, public_key_hash, request_hash, token_id, issuer, not_before, not_after, der, tpm_bound, created_at, revoked_at, revocation_reason, revocation_seq`

func scanCert(sc scanner) (Certificate, error) {
	var c Certificate
	var notBefore, notAfter, created int64
	var revokedAt, seq sql.NullInt64
	if err := sc.Scan(&c.Serial, &c.DeviceID, &c.Fingerprint, &c.PublicKeyHash, &c.RequestHash, &c.TokenID, &c.Issuer, &notBefore, &notAfter,
		&c.DER, &c.TPMBound, &created, &revokedAt, &c.RevocationReason, &seq); err != nil {
		return Certificate{}, err
	}
	c.NotBefore, c.NotAfter, c.CreatedAt = fromMS(notBefore), fromMS(notAfter), fromMS(created)
	if revokedAt.Valid {
		c.RevokedAt = fromMS(revokedAt.Int64)
	}
	c.RevocationSeq = seq.Int64
	return c, nil
}

func (s *sqlStore) certs(ctx context.Context, q querier, where string, args ...any) ([]Certificate, error) {
	rows, err := s.rows(ctx, q, `SELECT `+certCols+` FROM certificates `+where, args...)
	if err != nil {
		return nil, fmt.Errorf("reading certificates: %w", err)
	}
	defer rows.Close()
	var out []Certificate
	for rows.Next() {
		c, err := scanCert(rows)
		if err != nil {
			return nil, err
		}
		out = append(out, c)
	}
	return out, rows.Err()
}

func (s *sqlStore) oneCert(ctx context.Context, q querier, where string, args ...any) (Certificate, error) {
	c, err := scanCert(s.row(ctx, q, `SELECT `+certCols+` FROM certificates `+where, args...))
	if errors.Is(err, sql.ErrNoRows) {
		return Certificate{}, ErrNotFound
	}
	if err != nil {
		return Certificate{}, fmt.Errorf("reading certificate: %w", err)
	}
	return c, nil
}

func (s *sqlStore) GetCertificate(ctx context.Context, serial string) (Certificate, error) {
	return s.oneCert(ctx, s.db, `WHERE serial = ?`, serial)
}

func (s *sqlStore) ListCertificates(ctx context.Context, deviceID string) ([]Certificate, error) {
	return s.certs(ctx, s.db, `WHERE device_id = ? ORDER BY created_at, serial LIMIT 10000`, deviceID)
}

func (s *sqlStore) FindIssued(ctx context.Context, tokenID, deviceID, requestHash string) (Certificate, error) {
	return s.oneCert(ctx, s.db, `WHERE token_id = ? AND device_id = ? AND request_hash = ? ORDER BY created_at LIMIT 1`, tokenID, deviceID, requestHash)
}

func (s *sqlStore) RecordIssue(ctx context.Context, rec IssueRecord) error {
	at := rec.Cert.CreatedAt
	return s.inTx(ctx, func(tx *sql.Tx) error {
		if rec.TokenID != "" {
			res, err := s.exec(ctx, tx, `UPDATE tokens SET uses = uses + 1 WHERE id = ? AND uses < max_uses AND NOT disabled AND expires_at > ?`, rec.TokenID, ms(at))
			if err != nil {
				return fmt.Errorf("spending token %q: %w", rec.TokenID, err)
			}
			if n, _ := res.RowsAffected(); n != 1 {
				return s.whyTokenRefused(ctx, tx, rec.TokenID, at)
			}
		}
		// The device row: lock it (PostgreSQL) and check it is what the
		// caller saw.
		var serial, status string
		err := s.row(ctx, tx, `SELECT serial, status FROM devices WHERE id = ?`+s.forUpdate(), rec.Device.ID).Scan(&serial, &status)
		exists := err == nil
		switch {
		case err != nil && !errors.Is(err, sql.ErrNoRows):
			return fmt.Errorf("reading device %q: %w", rec.Device.ID, err)
		case exists && status == string(DeviceRevoked):
			return ErrConflict
		case exists && serial != rec.ExpectSerial, !exists && rec.ExpectSerial != "":
			return ErrConflict
		}
		if rec.RevokePrevious && rec.ExpectSerial != "" {
			if _, err := s.revokeCerts(ctx, tx, `serial = ?`, []any{rec.ExpectSerial}, 4, at); err != nil {
				return err
			}
		}
		c := rec.Cert
		_, err = s.exec(ctx, tx, `INSERT INTO certificates (`+certCols+`) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, 0, NULL)`,
			c.Serial, c.DeviceID, c.Fingerprint, c.PublicKeyHash, c.RequestHash, c.TokenID, c.Issuer, ms(c.NotBefore), ms(c.NotAfter), c.DER, c.TPMBound, ms(c.CreatedAt))
		if s.d.isUnique(err) {
			return ErrExists
		}
		if err != nil {
			return fmt.Errorf("recording certificate %q: %w", c.Serial, err)
		}
		d := rec.Device
		_, err = s.exec(ctx, tx, `INSERT INTO devices (`+deviceCols+`) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
			ON CONFLICT (id) DO UPDATE SET status = excluded.status, serial = excluded.serial, fingerprint = excluded.fingerprint,
			not_after = excluded.not_after, tpm_bound = excluded.tpm_bound, ek_hash = excluded.ek_hash, labels = excluded.labels,
			updated_at = excluded.updated_at`,
			d.ID, string(d.Status), d.Serial, d.Fingerprint, ms(d.NotAfter), d.TPMBound, d.EKHash, labelsJSON(d.Labels), ms(d.CreatedAt), ms(d.UpdatedAt))
		if s.d.isUnique(err) {
			return ErrConflict // a concurrent first enrollment of the same id won
		}
		if err != nil {
			return fmt.Errorf("recording device %q: %w", d.ID, err)
		}
		return s.appendAudit(ctx, tx, rec.Audit)
	})
}

func (s *sqlStore) forUpdate() string {
	if s.d.name == "postgres" {
		return " FOR UPDATE"
	}
	return ""
}

// whyTokenRefused tells which rule refused a token after the conditional
// update matched nothing.
func (s *sqlStore) whyTokenRefused(ctx context.Context, tx *sql.Tx, id string, at time.Time) error {
	t, err := scanToken(s.row(ctx, tx, `SELECT `+tokenCols+` FROM tokens WHERE id = ?`, id))
	switch {
	case errors.Is(err, sql.ErrNoRows):
		return ErrNotFound
	case err != nil:
		return err
	case t.Disabled:
		return ErrTokenDisabled
	case !at.Before(t.ExpiresAt):
		return ErrTokenExpired
	}
	return ErrTokenSpent
}

// revokeCerts revokes the not-yet-revoked certificates matching where,
// oldest first, numbering them after the highest sequence so far. The
// dialect's lock makes the numbering follow commit order.
func (s *sqlStore) revokeCerts(ctx context.Context, tx *sql.Tx, where string, args []any, reason int, at time.Time) ([]Certificate, error) {
	todo, err := s.certs(ctx, tx, `WHERE `+where+` AND revoked_at IS NULL ORDER BY created_at, serial`, args...)
	if err != nil || len(todo) == 0 {
		return nil, err
	}
	if err := s.d.lockRevocations(ctx, tx); err != nil {
		return nil, fmt.Errorf("locking revocations: %w", err)
	}
	var seq int64
	if err := s.row(ctx, tx, `SELECT COALESCE(MAX(revocation_seq), 0) FROM certificates`).Scan(&seq); err != nil {
		return nil, fmt.Errorf("reading revocation sequence: %w", err)
	}
	for i := range todo {
		seq++
		if _, err := s.exec(ctx, tx, `UPDATE certificates SET revoked_at = ?, revocation_reason = ?, revocation_seq = ? WHERE serial = ?`,
			ms(at), reason, seq, todo[i].Serial); err != nil {
			return nil, fmt.Errorf("revoking %q: %w", todo[i].Serial, err)
		}
		todo[i].RevokedAt, todo[i].RevocationReason, todo[i].RevocationSeq = fromMS(ms(at)), reason, seq
	}
	return todo, nil
}

func (s *sqlStore) RevokeDevice(ctx context.Context, id string, reason int, at time.Time, audit AuditEvent) ([]Certificate, error) {
	var out []Certificate
	err := s.inTx(ctx, func(tx *sql.Tx) error {
		var status string
		err := s.row(ctx, tx, `SELECT status FROM devices WHERE id = ?`+s.forUpdate(), id).Scan(&status)
		if errors.Is(err, sql.ErrNoRows) {
			return ErrNotFound
		}
		if err != nil {
			return fmt.Errorf("reading device %q: %w", id, err)
		}
		if out, err = s.revokeCerts(ctx, tx, `device_id = ?`, []any{id}, reason, at); err != nil {
			return err
		}
		if status == string(DeviceRevoked) && len(out) == 0 {
			return nil
		}
		if _, err := s.exec(ctx, tx, `UPDATE devices SET status = ?, updated_at = ? WHERE id = ?`, string(DeviceRevoked), ms(at), id); err != nil {
			return fmt.Errorf("revoking device %q: %w", id, err)
		}
		return s.appendAudit(ctx, tx, audit)
	})
	return out, err
}

func (s *sqlStore) RevokeCertificate(ctx context.Context, serial string, reason int, at time.Time, audit AuditEvent) (Certificate, error) {
	var out Certificate
	err := s.inTx(ctx, func(tx *sql.Tx) error {
		c, err := s.oneCert(ctx, tx, `WHERE serial = ?`, serial)
		if err != nil {
			return err
		}
		if c.Revoked() {
			out = c
			return nil
		}
		revoked, err := s.revokeCerts(ctx, tx, `serial = ?`, []any{serial}, reason, at)
		if err != nil {
			return err
		}
		out = revoked[0]
		return s.appendAudit(ctx, tx, audit)
	})
	return out, err
}

func (s *sqlStore) RevocationsSince(ctx context.Context, seq int64, limit int) ([]Certificate, error) {
	return s.certs(ctx, s.db, `WHERE revocation_seq > ? ORDER BY revocation_seq LIMIT `+strconv.Itoa(clamp(limit)), seq)
}

func (s *sqlStore) RevokedUnexpired(ctx context.Context, now time.Time) ([]Certificate, error) {
	return s.certs(ctx, s.db, `WHERE revoked_at IS NOT NULL AND not_after > ? ORDER BY revocation_seq`, ms(now))
}

func (s *sqlStore) appendAudit(ctx context.Context, q querier, e AuditEvent) error {
	if _, err := s.exec(ctx, q, `INSERT INTO audit (at, actor, action, subject, outcome, reason, remote_addr, serial) VALUES (?, ?, ?, ?, ?, ?, ?, ?)`,
		ms(e.At), e.Actor, e.Action, e.Subject, e.Outcome, e.Reason, e.RemoteAddr, e.Serial); err != nil {
		return fmt.Errorf("writing audit event: %w", err)
	}
	return nil
}

func (s *sqlStore) Audit(ctx context.Context, e AuditEvent) error { return s.appendAudit(ctx, s.db, e) }

func (s *sqlStore) ListAudit(ctx context.Context, q AuditQuery) ([]AuditEvent, error) {
	stmt := `SELECT seq, at, actor, action, subject, outcome, reason, remote_addr, serial FROM audit WHERE seq > ?`
	args := []any{q.AfterSeq}
	if q.Subject != "" {
		stmt += ` AND subject = ?`
		args = append(args, q.Subject)
	}
	rows, err := s.rows(ctx, s.db, stmt+` ORDER BY seq LIMIT `+strconv.Itoa(clamp(q.Limit)), args...)
	if err != nil {
		return nil, fmt.Errorf("reading audit log: %w", err)
	}
	defer rows.Close()
	var out []AuditEvent
	for rows.Next() {
		var e AuditEvent
		var at int64
		if err := rows.Scan(&e.Seq, &at, &e.Actor, &e.Action, &e.Subject, &e.Outcome, &e.Reason, &e.RemoteAddr, &e.Serial); err != nil {
			return nil, err
		}
		e.At = fromMS(at)
		out = append(out, e)
	}
	return out, rows.Err()
}

func (s *sqlStore) Ping(ctx context.Context) error { return s.db.PingContext(ctx) }
func (s *sqlStore) Close() error                   { return s.db.Close() }
