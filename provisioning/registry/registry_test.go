package registry_test

import (
	"context"
	"crypto/rand"
	"database/sql"
	"encoding/hex"
	"errors"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"fleetkey.dev/provisioning/registry"
	"fleetkey.dev/provisioning/registry/registrytest"
)

func TestMemory(t *testing.T) {
	t.Parallel()
	registrytest.Run(t, func(t *testing.T) registry.Store { return registry.NewMemory() })
}

func openSQLite(t *testing.T, path string) registry.Store {
	t.Helper()
	s, err := registry.OpenSQLite(context.Background(), path)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func TestSQLite(t *testing.T) {
	t.Parallel()
	registrytest.Run(t, func(t *testing.T) registry.Store {
		return openSQLite(t, filepath.Join(t.TempDir(), "registry.db"))
	})
}

const pgSkip = "FLEETKEY_TEST_POSTGRES is not set; set it to a PostgreSQL DSN, e.g. " +
	"postgres://postgres@127.0.0.1:5432/test?sslmode=disable, to run the PostgreSQL conformance suite"

// pgSchema creates a fresh schema in the database FLEETKEY_TEST_POSTGRES
// names, dropped when t ends, and returns a DSN whose search_path is it.
func pgSchema(t *testing.T) string {
	t.Helper()
	dsn := os.Getenv("FLEETKEY_TEST_POSTGRES")
	if dsn == "" {
		t.Skip(pgSkip)
	}
	ctx := context.Background()
	admin, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatalf("connecting to FLEETKEY_TEST_POSTGRES: %v", err)
	}
	b := make([]byte, 8)
	_, _ = rand.Read(b)
	schema := "fk_" + hex.EncodeToString(b)
	if _, err := admin.Exec(ctx, "CREATE SCHEMA "+schema); err != nil {
		admin.Close(ctx)
		t.Fatalf("creating schema: %v", err)
	}
	t.Cleanup(func() {
		if _, err := admin.Exec(ctx, "DROP SCHEMA "+schema+" CASCADE"); err != nil {
			t.Errorf("dropping schema %s: %v", schema, err)
		}
		admin.Close(ctx)
	})
	u, err := url.Parse(dsn)
	if err != nil {
		t.Fatalf("FLEETKEY_TEST_POSTGRES must be a postgres:// URL: %v", err)
	}
	q := u.Query()
	q.Set("search_path", schema)
	u.RawQuery = q.Encode()
	return u.String()
}

func openPostgres(t *testing.T, dsn string) registry.Store {
	t.Helper()
	s, err := registry.OpenPostgres(context.Background(), dsn)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// TestPostgres runs the suite against PostgreSQL, each case in a fresh
// schema of its own.
func TestPostgres(t *testing.T) {
	if os.Getenv("FLEETKEY_TEST_POSTGRES") == "" {
		t.Skip(pgSkip)
	}
	t.Parallel()
	registrytest.Run(t, func(t *testing.T) registry.Store { return openPostgres(t, pgSchema(t)) })
}

var now = time.Date(2026, 11, 26, 12, 0, 0, 0, time.UTC)

func token(id string, maxUses int) registry.Token {
	return registry.Token{ID: id, Hash: make([]byte, 32), Prefix: "dev-", MaxUses: maxUses, ExpiresAt: now.Add(time.Hour), CreatedAt: now}
}

func record(dev, serial, tokenID string) registry.IssueRecord {
	return registry.IssueRecord{TokenID: tokenID,
		Cert: registry.Certificate{Serial: serial, DeviceID: dev, TokenID: tokenID, NotAfter: now.Add(time.Hour), DER: []byte{1}, CreatedAt: now},
		Device: registry.Device{ID: dev, Status: registry.DeviceActive, Serial: serial, NotAfter: now.Add(time.Hour),
			CreatedAt: now, UpdatedAt: now},
		Audit: registry.AuditEvent{At: now, Action: "enroll", Subject: dev, Outcome: registry.Allowed, Serial: serial},
	}
}

// raceSpend has 32 enrollments, spread over the stores (as over
// replicas or processes), race for one token's 5 uses.
func raceSpend(t *testing.T, stores ...registry.Store) {
	t.Helper()
	ctx := context.Background()
	if err := stores[0].CreateToken(ctx, token("tttttttttttt", 5)); err != nil {
		t.Fatal(err)
	}
	const n = 32
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			errs[i] = stores[i%len(stores)].RecordIssue(ctx, record(fmt.Sprintf("dev-%02d", i), fmt.Sprintf("%04x", i+1), "tttttttttttt"))
		})
	}
	wg.Wait()
	ok := 0
	for i, err := range errs {
		switch {
		case err == nil:
			ok++
		case errors.Is(err, registry.ErrTokenSpent):
		default:
			t.Errorf("RecordIssue %d: %v", i, err)
		}
	}
	for _, s := range stores {
		tk, err := s.GetToken(ctx, "tttttttttttt")
		if err != nil {
			t.Fatal(err)
		}
		devs, err := s.ListDevices(ctx, registry.ListOptions{Limit: 1000})
		if err != nil {
			t.Fatal(err)
		}
		if ok != 5 || tk.Uses != 5 || len(devs) != 5 {
			t.Fatalf("%d succeeded, uses %d, %d devices; want 5 each", ok, tk.Uses, len(devs))
		}
	}
}

// raceRevoke revokes 16 devices at once through the stores and checks
// the sequence is 1..16 in the feed.
func raceRevoke(t *testing.T, stores ...registry.Store) {
	t.Helper()
	ctx := context.Background()
	if err := stores[0].CreateToken(ctx, token("rrrrrrrrrrrr", 100)); err != nil {
		t.Fatal(err)
	}
	const n = 16
	for i := range n {
		if err := stores[0].RecordIssue(ctx, record(fmt.Sprintf("rev-%02d", i), fmt.Sprintf("r%03x", i), "rrrrrrrrrrrr")); err != nil {
			t.Fatal(err)
		}
	}
	base, err := stores[0].RevocationsSince(ctx, 0, 1000)
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			if _, err := stores[i%len(stores)].RevokeDevice(ctx, fmt.Sprintf("rev-%02d", i), 1, now, registry.AuditEvent{At: now, Action: "revoke"}); err != nil {
				t.Error(err)
			}
		})
	}
	wg.Wait()
	revs, err := stores[len(stores)-1].RevocationsSince(ctx, int64(len(base)), 1000)
	if err != nil {
		t.Fatal(err)
	}
	if len(revs) != n {
		t.Fatalf("%d revocations, want %d", len(revs), n)
	}
	for i, c := range revs {
		if c.RevocationSeq != int64(len(base)+i+1) {
			t.Fatalf("revocation %d has sequence %d", i, c.RevocationSeq)
		}
	}
}

// TestSQLiteTwoHandles: two handles on one file, like the CLI beside a
// running service, share the token's uses and the revocation sequence.
func TestSQLiteTwoHandles(t *testing.T) {
	t.Parallel()
	path := filepath.Join(t.TempDir(), "registry.db")
	a, b := openSQLite(t, path), openSQLite(t, path)
	defer a.Close()
	defer b.Close()
	raceSpend(t, a, b)
	raceRevoke(t, a, b)
	for _, p := range []string{path, path + "-wal"} {
		fi, err := os.Stat(p)
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Perm() != 0o600 {
			t.Errorf("%s has mode %v, want 0600", filepath.Base(p), fi.Mode().Perm())
		}
	}
}

func schemaVersions(t *testing.T, path string) (rows, max int) {
	t.Helper()
	db, err := sql.Open("sqlite", path)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	if err := db.QueryRow(`SELECT COUNT(*), MAX(version) FROM schema_version`).Scan(&rows, &max); err != nil {
		t.Fatal(err)
	}
	return rows, max
}

// TestSQLiteReopen: the data survives closing and reopening, and opening
// an up-to-date file migrates nothing.
func TestSQLiteReopen(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "registry.db")
	s := openSQLite(t, path)
	if err := s.CreateToken(ctx, token("tttttttttttt", 2)); err != nil {
		t.Fatal(err)
	}
	if err := s.RecordIssue(ctx, record("dev-1", "01", "tttttttttttt")); err != nil {
		t.Fatal(err)
	}
	if _, err := s.RevokeDevice(ctx, "dev-1", 1, now, registry.AuditEvent{At: now, Action: "revoke"}); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	rows1, v1 := schemaVersions(t, path)
	for range 2 {
		s = openSQLite(t, path)
		if tk, err := s.GetToken(ctx, "tttttttttttt"); err != nil || tk.Uses != 1 {
			t.Fatalf("token after reopening: %+v, %v", tk, err)
		}
		if d, err := s.GetDevice(ctx, "dev-1"); err != nil || d.Status != registry.DeviceRevoked {
			t.Fatalf("device after reopening: %+v, %v", d, err)
		}
		if revs, err := s.RevocationsSince(ctx, 0, 10); err != nil || len(revs) != 1 || revs[0].RevocationSeq != 1 {
			t.Fatalf("revocations after reopening: %+v, %v", revs, err)
		}
		if evs, err := s.ListAudit(ctx, registry.AuditQuery{}); err != nil || len(evs) != 2 {
			t.Fatalf("audit after reopening: %+v, %v", evs, err)
		}
		s.Close()
	}
	if rows, v := schemaVersions(t, path); rows != rows1 || v != v1 || v < 1 {
		t.Fatalf("schema_version went from %d rows (v%d) to %d rows (v%d) by reopening", rows1, v1, rows, v)
	}
}

// TestSQLiteConcurrentOpen: processes starting together on a new file
// create the schema once.
func TestSQLiteConcurrentOpen(t *testing.T) {
	t.Parallel()
	path := filepath.Join(t.TempDir(), "registry.db")
	const n = 4
	stores := make([]registry.Store, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() { stores[i], errs[i] = registry.OpenSQLite(context.Background(), path) })
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("open %d: %v", i, err)
		}
		defer stores[i].Close()
	}
	// Each version was applied once, by one of the four.
	if rows, v := schemaVersions(t, path); rows != v || v < 2 {
		t.Fatalf("schema_version has %d rows for version %d; want one row per version", rows, v)
	}
	raceSpend(t, stores...)
}

// TestSQLiteNewerSchema: a file migrated by a newer program is refused,
// not scribbled over.
func TestSQLiteNewerSchema(t *testing.T) {
	t.Parallel()
	path := filepath.Join(t.TempDir(), "registry.db")
	openSQLite(t, path).Close()
	db, err := sql.Open("sqlite", path)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := db.Exec(`INSERT INTO schema_version (version, applied_at) VALUES (99, 0)`); err != nil {
		t.Fatal(err)
	}
	db.Close()
	if s, err := registry.OpenSQLite(context.Background(), path); err == nil {
		s.Close()
		t.Fatal("opened a registry with a newer schema")
	}
}

// TestPostgresReplicas: several stores on one database, like provisioning
// replicas, opened at once, never double-spend a token and number
// revocations 1..N in commit order.
func TestPostgresReplicas(t *testing.T) {
	if os.Getenv("FLEETKEY_TEST_POSTGRES") == "" {
		t.Skip(pgSkip)
	}
	t.Parallel()
	dsn := pgSchema(t)
	const n = 3
	stores := make([]registry.Store, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() { stores[i], errs[i] = registry.OpenPostgres(context.Background(), dsn) })
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("open %d: %v", i, err)
		}
		defer stores[i].Close()
	}
	raceSpend(t, stores...)
	raceRevoke(t, stores...)
	// Reopening migrates nothing and keeps the data.
	s := openPostgres(t, dsn)
	defer s.Close()
	if tk, err := s.GetToken(context.Background(), "tttttttttttt"); err != nil || tk.Uses != 5 {
		t.Fatalf("token after reopening: %+v, %v", tk, err)
	}
}
