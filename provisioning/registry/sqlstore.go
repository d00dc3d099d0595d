package registry

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"time"
)

// sqlStore is the Store over database/sql that SQLite and PostgreSQL
// share: one schema, one set of statements, one way of scanning rows. What
// differs is in dialect, and is small: placeholders, two column types, how
// a time is bound, which errors mean "duplicate" or "retry", and the locks
// PostgreSQL needs because several processes write to it.
type sqlStore struct {
	// r serves reads outside transactions; w runs every write. For SQLite
	// w holds one connection (one writer) and r is read-only; for
	// PostgreSQL both are the same pool.
	r, w *sql.DB
	d    *dialect
	// The group committer of RecordIssue: pending feeds it, closing stops
	// it, committed is closed when it has stopped.
	pending   chan *pendingIssue
	closing   chan struct{}
	committed chan struct{}
	closeOnce sync.Once
	// stmts holds the statements prepared by on, per pool; the statement
	// texts are fixed, so it stays small.
	stmtMu sync.Mutex
	stmts  map[stmtKey]*sql.Stmt
}

// startCommitter launches the group committer; the Open functions call it
// once the schema is in place.
func (s *sqlStore) startCommitter(ctx context.Context) error {
	s.stmts = map[stmtKey]*sql.Stmt{}
	if s.d.prepare {
		if err := s.warmWrites(ctx); err != nil {
			return err
		}
	}
	s.pending = make(chan *pendingIssue)
	s.closing = make(chan struct{})
	s.committed = make(chan struct{})
	go s.commitLoop()
	return nil
}

// dialect is everything that differs between the SQL databases.
type dialect struct {
	name string
	// dollar: placeholders are $1, $2, ... instead of ?.
	dollar bool
	// types fills the schema's {time}, {bytes} and {seq} column types.
	types *strings.Replacer
	// time is how a time is bound as an argument: it must match the
	// column type {time} becomes, and sort like the time.
	time func(time.Time) any
	// forUpdate is appended to the SELECT that reads a device row to be
	// changed, to lock it until commit ("" where writers are serialised).
	forUpdate string
	// lockMigration and lockRevocations, when not "", run first in the
	// transactions that migrate the schema and that assign revocation
	// sequence numbers, serialising them across processes.
	lockMigration, lockRevocations string
	// isUnique reports a unique-constraint violation; isRetryable a
	// transaction the database aborted to resolve a race (deadlock,
	// serialisation failure).
	isUnique, isRetryable func(error) bool
	// prepare: cache prepared statements (see sqlStore.on).
	prepare bool

	rebound sync.Map // statement with ? -> statement with $n
}

// q returns stmt with the dialect's placeholders. Statements here never
// hold a '?' inside a string literal.
func (d *dialect) q(stmt string) string {
	if !d.dollar {
		return stmt
	}
	if v, ok := d.rebound.Load(stmt); ok {
		return v.(string)
	}
	var b strings.Builder
	n := 0
	for _, r := range stmt {
		if r == '?' {
			n++
			b.WriteString("$" + strconv.Itoa(n))
			continue
		}
		b.WriteRune(r)
	}
	d.rebound.Store(stmt, b.String())
	return b.String()
}

// migrations are the schema versions in order: migrations[i] takes the
// schema from version i to i+1. Statements are separated by ';'. Column
// types in braces are the dialect's. Times are UTC: microseconds since the
// Unix epoch in SQLite (INTEGER), TIMESTAMPTZ in PostgreSQL.
var migrations = []string{
	// 1: the first schema.
	`
CREATE TABLE tokens (
	id                TEXT PRIMARY KEY,
	hash              {bytes} NOT NULL,
	prefix            TEXT NOT NULL,
	max_uses          INTEGER NOT NULL,
	uses              INTEGER NOT NULL CHECK (uses >= 0),
	expires_at        {time} NOT NULL,
	require_tpm       BOOLEAN NOT NULL,
	allow_reprovision BOOLEAN NOT NULL,
	disabled          BOOLEAN NOT NULL,
	labels            TEXT NOT NULL,
	created_at        {time} NOT NULL,
	created_by        TEXT NOT NULL
);
CREATE INDEX tokens_created ON tokens (created_at, id);

CREATE TABLE devices (
	id          TEXT PRIMARY KEY,
	status      TEXT NOT NULL,
	serial      TEXT NOT NULL,
	fingerprint TEXT NOT NULL,
	not_after   {time} NOT NULL,
	tpm_bound   BOOLEAN NOT NULL,
	ek_hash     {bytes},
	labels      TEXT NOT NULL,
	created_at  {time} NOT NULL,
	updated_at  {time} NOT NULL
);
CREATE INDEX devices_status ON devices (status, id);

CREATE TABLE certificates (
	serial            TEXT PRIMARY KEY,
	device_id         TEXT NOT NULL REFERENCES devices (id),
	fingerprint       TEXT NOT NULL,
	public_key_hash   TEXT NOT NULL,
	request_hash      TEXT NOT NULL,
	token_id          TEXT NOT NULL,
	issuer            TEXT NOT NULL,
	not_before        {time} NOT NULL,
	not_after         {time} NOT NULL,
	der               {bytes} NOT NULL,
	tpm_bound         BOOLEAN NOT NULL,
	created_at        {time} NOT NULL,
	revoked_at        {time},
	revocation_reason INTEGER NOT NULL DEFAULT 0,
	revocation_seq    BIGINT UNIQUE,
	CHECK ((revoked_at IS NULL) = (revocation_seq IS NULL))
);
CREATE INDEX certificates_device ON certificates (device_id, created_at);
CREATE INDEX certificates_crl ON certificates (not_after) WHERE revoked_at IS NOT NULL;

CREATE TABLE audit (
	seq         {seq},
	at          {time} NOT NULL,
	actor       TEXT NOT NULL,
	action      TEXT NOT NULL,
	subject     TEXT NOT NULL,
	outcome     TEXT NOT NULL,
	reason      TEXT NOT NULL,
	remote_addr TEXT NOT NULL,
	serial      TEXT NOT NULL
);
CREATE INDEX audit_subject ON audit (subject, seq)
`,
	// 2: the EK allowlist for TPM attestation.
	`
CREATE TABLE ek_allowlist (
	hash     {bytes} PRIMARY KEY,
	label    TEXT NOT NULL,
	added_at {time} NOT NULL,
	added_by TEXT NOT NULL
)
`,
}

// migrate brings the schema to the newest version, in one transaction that
// holds the dialect's migration lock (SQLite: the write lock BEGIN
// IMMEDIATE takes), so two processes opening a new database at once create
// it once. Opening an up-to-date database changes nothing.
func (s *sqlStore) migrate(ctx context.Context) error {
	return s.inTx(ctx, func(tx *sql.Tx) error {
		if s.d.lockMigration != "" {
			if _, err := tx.ExecContext(ctx, s.d.lockMigration); err != nil {
				return fmt.Errorf("locking the schema: %w", err)
			}
		}
		if _, err := tx.ExecContext(ctx, s.d.types.Replace(
			`CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, applied_at {time} NOT NULL)`)); err != nil {
			return fmt.Errorf("creating schema_version: %w", err)
		}
		var v int
		if err := tx.QueryRowContext(ctx, `SELECT COALESCE(MAX(version), 0) FROM schema_version`).Scan(&v); err != nil {
			return fmt.Errorf("reading the schema version: %w", err)
		}
		if v > len(migrations) {
			return fmt.Errorf("the registry has schema version %d, newer than this program's %d; upgrade it", v, len(migrations))
		}
		for ; v < len(migrations); v++ {
			for _, stmt := range strings.Split(s.d.types.Replace(migrations[v]), ";") {
				if strings.TrimSpace(stmt) == "" {
					continue
				}
				if _, err := tx.ExecContext(ctx, stmt); err != nil {
					return fmt.Errorf("migrating the schema to version %d: %w", v+1, err)
				}
			}
			if _, err := tx.ExecContext(ctx, s.d.q(`INSERT INTO schema_version (version, applied_at) VALUES (?, ?)`),
				v+1, s.d.time(time.Now())); err != nil {
				return fmt.Errorf("recording schema version %d: %w", v+1, err)
			}
		}
		return nil
	})
}

// inTx runs fn in a write transaction and commits it. A transaction the
// database aborted to settle a race comes back as ErrConflict.
func (s *sqlStore) inTx(ctx context.Context, fn func(tx *sql.Tx) error) error {
	err := func() error {
		tx, err := s.w.BeginTx(ctx, nil)
		if err != nil {
			return fmt.Errorf("beginning transaction: %w", err)
		}
		defer tx.Rollback() //nolint:errcheck // a no-op after Commit
		if err := fn(tx); err != nil {
			return err
		}
		if err := tx.Commit(); err != nil {
			return fmt.Errorf("committing: %w", err)
		}
		return nil
	}()
	if err != nil && !errors.Is(err, ErrConflict) && s.d.isRetryable(err) {
		return fmt.Errorf("%w: %w", ErrConflict, err)
	}
	return err
}

// queryer is what *sql.DB and *sql.Tx share.
type queryer interface {
	ExecContext(ctx context.Context, q string, args ...any) (sql.Result, error)
	QueryContext(ctx context.Context, q string, args ...any) (*sql.Rows, error)
	QueryRowContext(ctx context.Context, q string, args ...any) *sql.Row
}

type scanner interface{ Scan(dest ...any) error }

// on returns q with prepared statements: each statement text is prepared
// once per pool and reused, so the hot path (enrollment) does not make
// SQLite parse and plan the same SQL again for every certificate. pgx
// already caches prepared statements per connection, so PostgreSQL gets q
// itself.
func (s *sqlStore) on(q queryer) queryer {
	if !s.d.prepare {
		return q
	}
	return &preparedQueryer{s: s, q: q}
}

type preparedQueryer struct {
	s *sqlStore
	q queryer
}

// stmt returns the prepared statement for query, bound to the transaction
// when q is one, or nil to run the query unprepared. Statements of the
// write pool are prepared only by warm, at open: the SQLite write pool has
// a single connection, and preparing on it while a transaction holds that
// connection would wait forever. Read statements are prepared on first use.
func (p *preparedQueryer) stmt(ctx context.Context, query string) *sql.Stmt {
	tx, inTx := p.q.(*sql.Tx)
	db := p.s.r
	if inTx || p.q == p.s.w {
		db = p.s.w
	}
	key := stmtKey{db, query}
	p.s.stmtMu.Lock()
	st := p.s.stmts[key]
	p.s.stmtMu.Unlock()
	if st == nil && db == p.s.r {
		var err error
		if st, err = p.s.prepareOn(ctx, db, query); err != nil {
			return nil
		}
	}
	if st == nil {
		return nil
	}
	if inTx {
		return tx.StmtContext(ctx, st)
	}
	return st
}

// prepareOn prepares query on db and caches it.
func (s *sqlStore) prepareOn(ctx context.Context, db *sql.DB, query string) (*sql.Stmt, error) {
	st, err := db.PrepareContext(ctx, query)
	if err != nil {
		return nil, err
	}
	key := stmtKey{db, query}
	s.stmtMu.Lock()
	defer s.stmtMu.Unlock()
	if old := s.stmts[key]; old != nil {
		st.Close()
		return old, nil
	}
	s.stmts[key] = st
	return st, nil
}

// The statements of RecordIssue, named so that warmWrites can prepare
// them ahead.
const (
	stmtSpendToken      = `UPDATE tokens SET uses = uses + 1 WHERE id = ? AND uses < max_uses AND NOT disabled AND expires_at > ?`
	stmtDeviceForUpdate = `SELECT status, serial FROM devices WHERE id = ?`
	stmtInsertDevice    = `INSERT INTO devices (` + deviceCols + `) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`
	stmtUpdateDevice    = `UPDATE devices SET status = ?, serial = ?, fingerprint = ?, not_after = ?, tpm_bound = ?, ` +
		`ek_hash = ?, labels = ?, updated_at = ? WHERE id = ? AND serial = ? AND status = ?`
	stmtInsertCert = `INSERT INTO certificates (serial, device_id, fingerprint, public_key_hash, request_hash, ` +
		`token_id, issuer, not_before, not_after, der, tpm_bound, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`
	stmtInsertAudit = `INSERT INTO audit (at, actor, action, subject, outcome, reason, remote_addr, serial) VALUES (?, ?, ?, ?, ?, ?, ?, ?)`
)

// warmWrites prepares the statements of RecordIssue on the write pool.
func (s *sqlStore) warmWrites(ctx context.Context) error {
	for _, q := range []string{stmtSpendToken, stmtDeviceForUpdate, stmtInsertDevice, stmtUpdateDevice, stmtInsertCert, stmtInsertAudit,
		`SELECT ` + tokenCols + ` FROM tokens WHERE id = ?`, `SELECT ` + certCols + ` FROM certificates WHERE serial = ?`} {
		if _, err := s.prepareOn(ctx, s.w, s.d.q(q)); err != nil {
			return fmt.Errorf("preparing %q: %w", q, err)
		}
	}
	return nil
}

func (p *preparedQueryer) ExecContext(ctx context.Context, query string, args ...any) (sql.Result, error) {
	if st := p.stmt(ctx, query); st != nil {
		return st.ExecContext(ctx, args...)
	}
	return p.q.ExecContext(ctx, query, args...)
}

func (p *preparedQueryer) QueryContext(ctx context.Context, query string, args ...any) (*sql.Rows, error) {
	if st := p.stmt(ctx, query); st != nil {
		return st.QueryContext(ctx, args...)
	}
	return p.q.QueryContext(ctx, query, args...)
}

func (p *preparedQueryer) QueryRowContext(ctx context.Context, query string, args ...any) *sql.Row {
	if st := p.stmt(ctx, query); st != nil {
		return st.QueryRowContext(ctx, args...)
	}
	return p.q.QueryRowContext(ctx, query, args...)
}

type stmtKey struct {
	db    *sql.DB
	query string
}

// dbTime scans a time column of either dialect into a UTC time.Time; NULL
// is the zero time.
type dbTime time.Time

func (t *dbTime) Scan(v any) error {
	switch v := v.(type) {
	case nil:
		*t = dbTime{}
	case int64: // SQLite: microseconds since the epoch
		*t = dbTime(time.UnixMicro(v).UTC())
	case time.Time: // PostgreSQL
		*t = dbTime(v.UTC())
	default:
		return fmt.Errorf("scanning a time from %T", v)
	}
	return nil
}

// labelsText is the JSON a label map is stored as.
func labelsText(m map[string]string) (string, error) {
	if len(m) == 0 {
		return "{}", nil
	}
	b, err := json.Marshal(m)
	return string(b), err
}

func parseLabels(s string) (map[string]string, error) {
	var m map[string]string
	if err := json.Unmarshal([]byte(s), &m); err != nil {
		return nil, fmt.Errorf("decoding stored labels: %w", err)
	}
	return normLabels(m), nil
}

// blob binds b for a NOT NULL column; nullBlob binds NULL when b is empty.
func blob(b []byte) []byte {
	if b == nil {
		return []byte{}
	}
	return b
}

func nullBlob(b []byte) any {
	if len(b) == 0 {
		return nil
	}
	return b
}

// readRows scans every row with scan, failing if there are more than max
// (0: no cap).
func readRows[T any](rows *sql.Rows, max int, scan func(scanner) (T, error)) ([]T, error) {
	defer rows.Close()
	var out []T
	for rows.Next() {
		if max > 0 && len(out) == max {
			return nil, fmt.Errorf("more than %d: %w", max, errTooMany)
		}
		v, err := scan(rows)
		if err != nil {
			return nil, err
		}
		out = append(out, v)
	}
	return out, rows.Err()
}

// Tokens.

const tokenCols = `id, hash, prefix, max_uses, uses, expires_at, require_tpm, allow_reprovision, disabled, labels, created_at, created_by`

func scanToken(sc scanner) (Token, error) {
	var t Token
	var labels string
	if err := sc.Scan(&t.ID, &t.Hash, &t.Prefix, &t.MaxUses, &t.Uses, (*dbTime)(&t.ExpiresAt), &t.RequireTPM,
		&t.AllowReprovision, &t.Disabled, &labels, (*dbTime)(&t.CreatedAt), &t.CreatedBy); err != nil {
		return Token{}, err
	}
	var err error
	t.Labels, err = parseLabels(labels)
	t.Hash = normBytes(t.Hash)
	return t, err
}

func (s *sqlStore) CreateToken(ctx context.Context, t Token) error {
	if err := checkToken(t); err != nil {
		return err
	}
	t = normToken(t)
	labels, err := labelsText(t.Labels)
	if err != nil {
		return fmt.Errorf("creating token %q: %w", t.ID, err)
	}
	_, err = s.w.ExecContext(ctx, s.d.q(`INSERT INTO tokens (`+tokenCols+`) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`),
		t.ID, blob(t.Hash), t.Prefix, t.MaxUses, t.Uses, s.d.time(t.ExpiresAt), t.RequireTPM, t.AllowReprovision, t.Disabled,
		labels, s.d.time(t.CreatedAt), t.CreatedBy)
	switch {
	case s.d.isUnique(err):
		return tokenErr(t.ID, ErrExists)
	case err != nil:
		return fmt.Errorf("creating token %q: %w", t.ID, err)
	}
	return nil
}

func (s *sqlStore) getToken(ctx context.Context, q queryer, id string) (Token, error) {
	t, err := scanToken(s.on(q).QueryRowContext(ctx, s.d.q(`SELECT `+tokenCols+` FROM tokens WHERE id = ?`), id))
	switch {
	case errors.Is(err, sql.ErrNoRows):
		return Token{}, tokenErr(id, ErrNotFound)
	case err != nil:
		return Token{}, fmt.Errorf("reading token %q: %w", id, err)
	}
	return t, nil
}

func (s *sqlStore) GetToken(ctx context.Context, id string) (Token, error) {
	return s.getToken(ctx, s.r, id)
}

func (s *sqlStore) ListTokens(ctx context.Context) ([]Token, error) {
	rows, err := s.r.QueryContext(ctx, s.d.q(`SELECT `+tokenCols+` FROM tokens ORDER BY created_at, id LIMIT ?`), maxTokens+1)
	if err != nil {
		return nil, fmt.Errorf("listing tokens: %w", err)
	}
	out, err := readRows(rows, maxTokens, scanToken)
	if err != nil {
		return nil, fmt.Errorf("listing tokens: %w", err)
	}
	return out, nil
}

func (s *sqlStore) DisableToken(ctx context.Context, id string, audit AuditEvent) error {
	return s.inTx(ctx, func(tx *sql.Tx) error {
		res, err := tx.ExecContext(ctx, s.d.q(`UPDATE tokens SET disabled = ? WHERE id = ?`), true, id)
		if err != nil {
			return fmt.Errorf("disabling token %q: %w", id, err)
		}
		if n, err := res.RowsAffected(); err != nil || n == 0 {
			return tokenErr(id, cmpErr(err, ErrNotFound))
		}
		return s.appendAudit(ctx, tx, audit)
	})
}

// cmpErr returns err if it is not nil, else fallback.
func cmpErr(err, fallback error) error {
	if err != nil {
		return err
	}
	return fallback
}

// Devices.

const deviceCols = `id, status, serial, fingerprint, not_after, tpm_bound, ek_hash, labels, created_at, updated_at`

func scanDevice(sc scanner) (Device, error) {
	var d Device
	var labels string
	if err := sc.Scan(&d.ID, &d.Status, &d.Serial, &d.Fingerprint, (*dbTime)(&d.NotAfter), &d.TPMBound, &d.EKHash, &labels,
		(*dbTime)(&d.CreatedAt), (*dbTime)(&d.UpdatedAt)); err != nil {
		return Device{}, err
	}
	var err error
	d.Labels, err = parseLabels(labels)
	d.EKHash = normBytes(d.EKHash)
	return d, err
}

func (s *sqlStore) GetDevice(ctx context.Context, id string) (Device, error) {
	d, err := scanDevice(s.on(s.r).QueryRowContext(ctx, s.d.q(`SELECT `+deviceCols+` FROM devices WHERE id = ?`), id))
	switch {
	case errors.Is(err, sql.ErrNoRows):
		return Device{}, deviceErr(id, ErrNotFound)
	case err != nil:
		return Device{}, fmt.Errorf("reading device %q: %w", id, err)
	}
	return d, nil
}

func (s *sqlStore) ListDevices(ctx context.Context, opts ListOptions) ([]Device, error) {
	stmt, args := `SELECT `+deviceCols+` FROM devices WHERE id > ?`, []any{opts.After}
	if opts.Status != "" {
		stmt += ` AND status = ?`
		args = append(args, string(opts.Status))
	}
	rows, err := s.r.QueryContext(ctx, s.d.q(stmt+` ORDER BY id LIMIT ?`), append(args, clampLimit(opts.Limit))...)
	if err != nil {
		return nil, fmt.Errorf("listing devices: %w", err)
	}
	out, err := readRows(rows, 0, scanDevice)
	if err != nil {
		return nil, fmt.Errorf("listing devices: %w", err)
	}
	return out, nil
}

// Certificates.

const certCols = `serial, device_id, fingerprint, public_key_hash, request_hash, token_id, issuer, not_before, not_after, der, ` +
	`tpm_bound, created_at, revoked_at, revocation_reason, revocation_seq`

func scanCert(sc scanner) (Certificate, error) {
	var c Certificate
	var seq sql.NullInt64
	if err := sc.Scan(&c.Serial, &c.DeviceID, &c.Fingerprint, &c.PublicKeyHash, &c.RequestHash, &c.TokenID, &c.Issuer,
		(*dbTime)(&c.NotBefore), (*dbTime)(&c.NotAfter), &c.DER, &c.TPMBound, (*dbTime)(&c.CreatedAt), (*dbTime)(&c.RevokedAt),
		&c.RevocationReason, &seq); err != nil {
		return Certificate{}, err
	}
	c.RevocationSeq = seq.Int64
	c.DER = normBytes(c.DER)
	return c, nil
}

// certs returns the certificates "SELECT ... FROM certificates <rest>"
// finds, failing if there are more than max (0: no cap).
func (s *sqlStore) certs(ctx context.Context, q queryer, max int, rest string, args ...any) ([]Certificate, error) {
	rows, err := s.on(q).QueryContext(ctx, s.d.q(`SELECT `+certCols+` FROM certificates `+rest), args...)
	if err != nil {
		return nil, err
	}
	return readRows(rows, max, scanCert)
}

func (s *sqlStore) getCert(ctx context.Context, q queryer, serial string) (Certificate, error) {
	c, err := scanCert(s.on(q).QueryRowContext(ctx, s.d.q(`SELECT `+certCols+` FROM certificates WHERE serial = ?`), serial))
	switch {
	case errors.Is(err, sql.ErrNoRows):
		return Certificate{}, certErr(serial, ErrNotFound)
	case err != nil:
		return Certificate{}, fmt.Errorf("reading certificate %q: %w", serial, err)
	}
	return c, nil
}

func (s *sqlStore) GetCertificate(ctx context.Context, serial string) (Certificate, error) {
	return s.getCert(ctx, s.r, serial)
}

func (s *sqlStore) ListCertificates(ctx context.Context, deviceID string) ([]Certificate, error) {
	out, err := s.certs(ctx, s.r, maxDeviceCerts, `WHERE device_id = ? ORDER BY created_at, serial LIMIT ?`, deviceID, maxDeviceCerts+1)
	if err != nil {
		return nil, fmt.Errorf("listing certificates of %q: %w", deviceID, err)
	}
	return out, nil
}

// RecordIssue, in one transaction: spend the token use, compare-and-set
// the device row, revoke the previous certificate if asked, insert the
// certificate, append the audit event. Any failure rolls everything of
// this record back.
//
// Records from concurrent callers are group-committed: the committer
// goroutine writes every record waiting at the moment into one
// transaction, so a burst of enrollments pays one fsync per batch instead
// of one per certificate. RecordIssue still returns only once its own
// record has committed (or with the error that kept it out).
func (s *sqlStore) RecordIssue(ctx context.Context, rec IssueRecord) error {
	if err := checkIssue(rec); err != nil {
		return err
	}
	r := &pendingIssue{rec: rec, c: newCert(rec.Cert), d: normDevice(rec.Device), ctx: ctx, done: make(chan error, 1)}
	var err error
	if r.labels, err = labelsText(r.d.Labels); err != nil {
		return issueErr(r.c.Serial, err)
	}
	select {
	case s.pending <- r:
	case <-ctx.Done():
		return ctx.Err()
	case <-s.closing:
		return issueErr(r.c.Serial, errClosed)
	}
	// Always wait for the answer: once handed over, the record may be in a
	// transaction that commits even if ctx ends now.
	if err := <-r.done; err != nil {
		return issueErr(r.c.Serial, err)
	}
	return nil
}

var errClosed = errors.New("the registry is closed")

// pendingIssue is a record waiting for the group committer.
type pendingIssue struct {
	rec    IssueRecord
	c      Certificate
	d      Device
	labels string
	ctx    context.Context
	done   chan error
}

// maxBatch bounds the records of one transaction.
const maxBatch = 64

// commitLoop is the group committer: it takes the first waiting record and
// every other one already waiting, and commits them together.
func (s *sqlStore) commitLoop() {
	defer close(s.committed)
	for {
		var batch []*pendingIssue
		select {
		case r := <-s.pending:
			batch = append(batch, r)
		case <-s.closing:
			return
		}
	more:
		for len(batch) < maxBatch {
			select {
			case r := <-s.pending:
				batch = append(batch, r)
			default:
				break more
			}
		}
		s.commitBatch(batch)
	}
}

// commitBatch runs the records optimistically in one transaction, without
// savepoints: the enrollment service checked everything it could first, so
// a record failing here is rare. When one fails, the transaction is rolled
// back and run again without it.
func (s *sqlStore) commitBatch(batch []*pendingIssue) {
	errs := make([]error, len(batch))
	out := make([]bool, len(batch)) // answered already
	// The batch runs under its own deadline, not any caller's context: one
	// caller giving up must not roll back the others' records.
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for {
		failed := -1
		err := s.inTx(ctx, func(tx *sql.Tx) error {
			for i, r := range batch {
				if out[i] {
					continue
				}
				if err := r.ctx.Err(); err != nil {
					errs[i], out[i] = err, true
					continue
				}
				if err := s.recordIssue(ctx, tx, r); err != nil {
					failed, errs[i] = i, err
					return err
				}
			}
			return nil
		})
		if failed >= 0 {
			out[failed] = true
			continue
		}
		for i, r := range batch {
			if !out[i] && err != nil {
				errs[i] = err
			}
			r.done <- errs[i]
		}
		return
	}
}

// recordIssue is one record's writes, in the batch's transaction.
func (s *sqlStore) recordIssue(ctx context.Context, tx *sql.Tx, r *pendingIssue) error {
	rec, c, d, labels := r.rec, r.c, r.d, r.labels
	at := c.CreatedAt
	if rec.TokenID != "" {
		if err := s.spendToken(ctx, tx, rec.TokenID, at); err != nil {
			return err
		}
	}
	if err := s.setDevice(ctx, tx, d, labels, rec.ExpectSerial); err != nil {
		return err
	}
	if rec.RevokePrevious && rec.ExpectSerial != "" {
		if _, err := s.revoke(ctx, tx, `serial = ? AND device_id = ?`, []any{rec.ExpectSerial, d.ID}, reasonSuperseded, at); err != nil {
			return err
		}
	}
	_, err := s.on(tx).ExecContext(ctx, s.d.q(stmtInsertCert),
		c.Serial, c.DeviceID, c.Fingerprint, c.PublicKeyHash, c.RequestHash, c.TokenID, c.Issuer,
		s.d.time(c.NotBefore), s.d.time(c.NotAfter), blob(c.DER), c.TPMBound, s.d.time(c.CreatedAt))
	switch {
	case s.d.isUnique(err):
		return ErrExists
	case err != nil:
		return fmt.Errorf("inserting: %w", err)
	}
	return s.appendAudit(ctx, tx, rec.Audit)
}

// spendToken takes one use of the token, atomically: the UPDATE's WHERE is
// the whole rule, so two writers can never both take the last use. When it
// matches nothing, the token row says why.
func (s *sqlStore) spendToken(ctx context.Context, tx *sql.Tx, id string, at time.Time) error {
	res, err := s.on(tx).ExecContext(ctx, s.d.q(stmtSpendToken), id, s.d.time(at))
	if err != nil {
		return fmt.Errorf("spending a use of token %q: %w", id, err)
	}
	n, err := res.RowsAffected()
	if err != nil {
		return fmt.Errorf("spending a use of token %q: %w", id, err)
	}
	if n == 1 {
		return nil
	}
	t, err := s.getToken(ctx, tx, id)
	if err != nil {
		return err
	}
	if err := tokenRefusal(t, at); err != nil {
		return err
	}
	// Cannot happen: the row refused the update but passes every rule.
	return tokenErr(id, fmt.Errorf("use refused: %w", ErrConflict))
}

// setDevice writes the device's new state if its row is still what the
// caller saw: absent when expect is "", else active with serial expect.
// Both branches are compare-and-set in SQL as well (a plain INSERT that a
// concurrent first enrollment makes fail; an UPDATE conditioned on the old
// serial), so they hold even without the row lock.
func (s *sqlStore) setDevice(ctx context.Context, tx *sql.Tx, d Device, labels, expect string) error {
	var status, serial string
	err := s.on(tx).QueryRowContext(ctx, s.d.q(stmtDeviceForUpdate+s.d.forUpdate), d.ID).Scan(&status, &serial)
	exists := err == nil
	switch {
	case err != nil && !errors.Is(err, sql.ErrNoRows):
		return fmt.Errorf("reading device %q: %w", d.ID, err)
	case !exists && expect != "":
		return deviceErr(d.ID, fmt.Errorf("expected serial %q, device does not exist: %w", expect, ErrConflict))
	case exists && status != string(DeviceActive):
		return deviceErr(d.ID, fmt.Errorf("device is %s: %w", status, ErrConflict))
	case exists && serial != expect:
		return deviceErr(d.ID, fmt.Errorf("expected serial %q, device has %q: %w", expect, serial, ErrConflict))
	}
	if !exists {
		_, err := s.on(tx).ExecContext(ctx, s.d.q(stmtInsertDevice),
			d.ID, string(d.Status), d.Serial, d.Fingerprint, s.d.time(d.NotAfter), d.TPMBound, nullBlob(d.EKHash), labels,
			s.d.time(d.CreatedAt), s.d.time(d.UpdatedAt))
		switch {
		case s.d.isUnique(err):
			return deviceErr(d.ID, fmt.Errorf("enrolled concurrently: %w", ErrConflict))
		case err != nil:
			return fmt.Errorf("inserting device %q: %w", d.ID, err)
		}
		return nil
	}
	// created_at is kept.
	res, err := s.on(tx).ExecContext(ctx, s.d.q(stmtUpdateDevice),
		string(d.Status), d.Serial, d.Fingerprint, s.d.time(d.NotAfter), d.TPMBound, nullBlob(d.EKHash), labels, s.d.time(d.UpdatedAt),
		d.ID, expect, string(DeviceActive))
	if err != nil {
		return fmt.Errorf("updating device %q: %w", d.ID, err)
	}
	if n, err := res.RowsAffected(); err != nil || n != 1 {
		return deviceErr(d.ID, cmpErr(err, fmt.Errorf("changed concurrently: %w", ErrConflict)))
	}
	return nil
}

// revoke revokes the not-yet-revoked certificates "WHERE <where>" selects,
// oldest first, giving each the next revocation sequence number, and
// returns them as revoked.
//
// The numbers follow commit order: on PostgreSQL the dialect's
// transaction-scoped lock is taken before the certificates are read and
// the highest number so far is looked up, and it is held until commit, so
// the next transaction to number revocations starts only once this one's
// are visible; on SQLite there is one writer at a time anyway.
func (s *sqlStore) revoke(ctx context.Context, tx *sql.Tx, where string, args []any, reason int, at time.Time) ([]Certificate, error) {
	if s.d.lockRevocations != "" {
		if _, err := tx.ExecContext(ctx, s.d.lockRevocations); err != nil {
			return nil, fmt.Errorf("locking the revocation sequence: %w", err)
		}
	}
	todo, err := s.certs(ctx, tx, 0, `WHERE `+where+` AND revoked_at IS NULL ORDER BY created_at, serial`, args...)
	if err != nil || len(todo) == 0 {
		return nil, err
	}
	var seq int64
	if err := tx.QueryRowContext(ctx, `SELECT COALESCE(MAX(revocation_seq), 0) FROM certificates`).Scan(&seq); err != nil {
		return nil, fmt.Errorf("reading the revocation sequence: %w", err)
	}
	at = normTime(at)
	for i := range todo {
		seq++
		res, err := tx.ExecContext(ctx, s.d.q(`UPDATE certificates SET revoked_at = ?, revocation_reason = ?, revocation_seq = ? `+
			`WHERE serial = ? AND revoked_at IS NULL`), s.d.time(at), reason, seq, todo[i].Serial)
		if err != nil {
			return nil, fmt.Errorf("revoking %q: %w", todo[i].Serial, err)
		}
		if n, err := res.RowsAffected(); err != nil || n != 1 {
			return nil, certErr(todo[i].Serial, cmpErr(err, fmt.Errorf("revoked concurrently: %w", ErrConflict)))
		}
		todo[i].RevokedAt, todo[i].RevocationReason, todo[i].RevocationSeq = at, reason, seq
	}
	return todo, nil
}

func (s *sqlStore) RevokeDevice(ctx context.Context, id string, reason int, at time.Time, audit AuditEvent) ([]Certificate, error) {
	if err := checkRevocationTime(at); err != nil {
		return nil, revokeDeviceErr(id, err)
	}
	var out []Certificate
	err := s.inTx(ctx, func(tx *sql.Tx) error {
		var status string
		err := tx.QueryRowContext(ctx, s.d.q(`SELECT status FROM devices WHERE id = ?`+s.d.forUpdate), id).Scan(&status)
		switch {
		case errors.Is(err, sql.ErrNoRows):
			return ErrNotFound
		case err != nil:
			return fmt.Errorf("reading: %w", err)
		}
		if out, err = s.revoke(ctx, tx, `device_id = ?`, []any{id}, reason, at); err != nil {
			return err
		}
		if status == string(DeviceRevoked) && len(out) == 0 {
			return nil // already done: change nothing
		}
		if _, err := tx.ExecContext(ctx, s.d.q(`UPDATE devices SET status = ?, updated_at = ? WHERE id = ?`),
			string(DeviceRevoked), s.d.time(normTime(at)), id); err != nil {
			return fmt.Errorf("updating: %w", err)
		}
		return s.appendAudit(ctx, tx, audit)
	})
	if err != nil {
		return nil, revokeDeviceErr(id, err)
	}
	return out, nil
}

func (s *sqlStore) RevokeCertificate(ctx context.Context, serial string, reason int, at time.Time, audit AuditEvent) (Certificate, error) {
	if err := checkRevocationTime(at); err != nil {
		return Certificate{}, revokeCertErr(serial, err)
	}
	var out Certificate
	err := s.inTx(ctx, func(tx *sql.Tx) error {
		revoked, err := s.revoke(ctx, tx, `serial = ?`, []any{serial}, reason, at)
		if err != nil {
			return err
		}
		if len(revoked) == 0 { // unknown, or already revoked: change nothing
			out, err = s.getCert(ctx, tx, serial)
			return err
		}
		out = revoked[0]
		return s.appendAudit(ctx, tx, audit)
	})
	if err != nil {
		return Certificate{}, revokeCertErr(serial, err)
	}
	return out, nil
}

func (s *sqlStore) RevocationsSince(ctx context.Context, seq int64, limit int) ([]Certificate, error) {
	out, err := s.certs(ctx, s.r, 0, `WHERE revocation_seq > ? ORDER BY revocation_seq LIMIT ?`, seq, clampLimit(limit))
	if err != nil {
		return nil, fmt.Errorf("reading revocations after %d: %w", seq, err)
	}
	return out, nil
}

func (s *sqlStore) RevokedUnexpired(ctx context.Context, now time.Time) ([]Certificate, error) {
	out, err := s.certs(ctx, s.r, maxRevokedUnexpire, `WHERE revoked_at IS NOT NULL AND not_after > ? ORDER BY revocation_seq LIMIT ?`,
		s.d.time(normTime(now)), maxRevokedUnexpire+1)
	if err != nil {
		return nil, fmt.Errorf("listing revoked certificates: %w", err)
	}
	return out, nil
}

// Audit log.

func (s *sqlStore) appendAudit(ctx context.Context, q queryer, e AuditEvent) error {
	e = normAudit(e)
	if _, err := s.on(q).ExecContext(ctx, s.d.q(stmtInsertAudit), s.d.time(e.At), e.Actor, e.Action, e.Subject, e.Outcome, e.Reason, e.RemoteAddr, e.Serial); err != nil {
		return fmt.Errorf("appending audit event: %w", err)
	}
	return nil
}

func (s *sqlStore) Audit(ctx context.Context, e AuditEvent) error { return s.appendAudit(ctx, s.w, e) }

func scanAudit(sc scanner) (AuditEvent, error) {
	var e AuditEvent
	err := sc.Scan(&e.Seq, (*dbTime)(&e.At), &e.Actor, &e.Action, &e.Subject, &e.Outcome, &e.Reason, &e.RemoteAddr, &e.Serial)
	return e, err
}

func (s *sqlStore) ListAudit(ctx context.Context, q AuditQuery) ([]AuditEvent, error) {
	stmt, args := `SELECT seq, at, actor, action, subject, outcome, reason, remote_addr, serial FROM audit WHERE seq > ?`, []any{q.AfterSeq}
	if q.Subject != "" {
		stmt += ` AND subject = ?`
		args = append(args, q.Subject)
	}
	rows, err := s.r.QueryContext(ctx, s.d.q(stmt+` ORDER BY seq LIMIT ?`), append(args, clampLimit(q.Limit))...)
	if err != nil {
		return nil, fmt.Errorf("reading the audit log: %w", err)
	}
	out, err := readRows(rows, 0, scanAudit)
	if err != nil {
		return nil, fmt.Errorf("reading the audit log: %w", err)
	}
	return out, nil
}

func (s *sqlStore) Ping(ctx context.Context) error {
	if err := s.r.PingContext(ctx); err != nil {
		return fmt.Errorf("registry: %w", err)
	}
	if s.w != s.r {
		if err := s.w.PingContext(ctx); err != nil {
			return fmt.Errorf("registry: %w", err)
		}
	}
	return nil
}

func (s *sqlStore) Close() error {
	if s.closing != nil {
		s.closeOnce.Do(func() { close(s.closing) })
		<-s.committed
	}
	s.stmtMu.Lock()
	for _, st := range s.stmts {
		st.Close()
	}
	s.stmtMu.Unlock()
	err := s.r.Close()
	if s.w != s.r {
		err = errors.Join(err, s.w.Close())
	}
	return err
}

// The EK allowlist.

func (s *sqlStore) AddEKs(ctx context.Context, eks []EKEntry, audit AuditEvent) error {
	for _, e := range eks {
		if err := checkEK(e); err != nil {
			return err
		}
	}
	return s.inTx(ctx, func(tx *sql.Tx) error {
		for _, e := range eks {
			if _, err := tx.ExecContext(ctx, s.d.q(`INSERT INTO ek_allowlist (hash, label, added_at, added_by) VALUES (?, ?, ?, ?) ON CONFLICT (hash) DO NOTHING`),
				e.Hash, e.Label, s.d.time(e.AddedAt), e.AddedBy); err != nil {
				return fmt.Errorf("adding EK %x: %w", e.Hash, err)
			}
		}
		return s.appendAudit(ctx, tx, audit)
	})
}

func (s *sqlStore) HasEK(ctx context.Context, hash []byte) (bool, error) {
	var n int
	if err := s.r.QueryRowContext(ctx, s.d.q(`SELECT COUNT(*) FROM ek_allowlist WHERE hash = ?`), hash).Scan(&n); err != nil {
		return false, fmt.Errorf("looking up EK: %w", err)
	}
	return n > 0, nil
}

func (s *sqlStore) ListEKs(ctx context.Context) ([]EKEntry, error) {
	rows, err := s.r.QueryContext(ctx, s.d.q(`SELECT hash, label, added_at, added_by FROM ek_allowlist ORDER BY added_at, hash LIMIT ?`), maxTokens+1)
	if err != nil {
		return nil, fmt.Errorf("listing EKs: %w", err)
	}
	out, err := readRows(rows, maxTokens, func(sc scanner) (EKEntry, error) {
		var e EKEntry
		err := sc.Scan(&e.Hash, &e.Label, (*dbTime)(&e.AddedAt), &e.AddedBy)
		return e, err
	})
	if err != nil {
		return nil, fmt.Errorf("listing EKs: %w", err)
	}
	return out, nil
}

func (s *sqlStore) RemoveEK(ctx context.Context, hash []byte, audit AuditEvent) error {
	return s.inTx(ctx, func(tx *sql.Tx) error {
		res, err := tx.ExecContext(ctx, s.d.q(`DELETE FROM ek_allowlist WHERE hash = ?`), hash)
		if err != nil {
			return fmt.Errorf("removing EK %x: %w", hash, err)
		}
		if n, err := res.RowsAffected(); err != nil || n == 0 {
			return fmt.Errorf("EK %x: %w", hash, cmpErr(err, ErrNotFound))
		}
		return s.appendAudit(ctx, tx, audit)
	})
}
