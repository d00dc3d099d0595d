package registry_test

import (
	"context"
	"crypto/rand"
	"database/sql"
	"encoding/hex"
	"net/url"
	"os"
	"path/filepath"
	"testing"
	"time"

	_ "github.com/jackc/pgx/v5/stdlib"

	"fleetkey.dev/provisioning/registry"
	"fleetkey.dev/provisioning/registry/registrytest"
)

func TestMemory(t *testing.T) {
	t.Parallel()
	registrytest.Run(t, func(t *testing.T) registry.Store { return registry.NewMemory() })
}

func TestSQLite(t *testing.T) {
	t.Parallel()
	registrytest.Run(t, func(t *testing.T) registry.Store {
		s, err := registry.OpenSQLite(context.Background(), filepath.Join(t.TempDir(), "registry.db"))
		if err != nil {
			t.Fatal(err)
		}
		return s
	})
}

// TestSQLiteTwoHandles: two handles on one file, as the CLI beside a
// running service, share the token's uses; and reopening keeps the data.
func TestSQLiteTwoHandles(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "registry.db")
	a, err := registry.OpenSQLite(ctx, path)
	if err != nil {
		t.Fatal(err)
	}
	b, err := registry.OpenSQLite(ctx, path)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now().UTC().Truncate(time.Millisecond)
	if err := a.CreateToken(ctx, registry.Token{ID: "tttttttttttt", Hash: make([]byte, 32), MaxUses: 1, ExpiresAt: now.Add(time.Hour), CreatedAt: now}); err != nil {
		t.Fatal(err)
	}
	rec := func(dev, serial string) registry.IssueRecord {
		return registry.IssueRecord{TokenID: "tttttttttttt",
			Cert:   registry.Certificate{Serial: serial, DeviceID: dev, NotAfter: now.Add(time.Hour), DER: []byte{1}, CreatedAt: now},
			Device: registry.Device{ID: dev, Status: registry.DeviceActive, Serial: serial, CreatedAt: now, UpdatedAt: now}}
	}
	errA := a.RecordIssue(ctx, rec("d1", "01"))
	errB := b.RecordIssue(ctx, rec("d2", "02"))
	if (errA == nil) == (errB == nil) {
		t.Fatalf("one-use token: a=%v b=%v; want exactly one success", errA, errB)
	}
	a.Close()
	b.Close()
	fi, err := os.Stat(path)
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("registry file mode %v, %v", fi.Mode().Perm(), err)
	}
	c, err := registry.OpenSQLite(ctx, path)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if tk, err := c.GetToken(ctx, "tttttttttttt"); err != nil || tk.Uses != 1 {
		t.Fatalf("after reopening: %+v, %v", tk, err)
	}
}

// TestPostgres runs the suite against PostgreSQL, each subtest in a fresh
// schema of its own.
func TestPostgres(t *testing.T) {
	dsn := os.Getenv("FLEETKEY_TEST_POSTGRES")
	if dsn == "" {
		t.Skip("FLEETKEY_TEST_POSTGRES is not set; set it to a PostgreSQL DSN, e.g. postgres://postgres@127.0.0.1:5432/test?sslmode=disable, to run the PostgreSQL conformance suite")
	}
	t.Parallel()
	admin, err := sql.Open("pgx", dsn)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { admin.Close() })
	registrytest.Run(t, func(t *testing.T) registry.Store {
		ctx := context.Background()
		b := make([]byte, 6)
		_, _ = rand.Read(b)
		schema := "fk_test_" + hex.EncodeToString(b)
		if _, err := admin.ExecContext(ctx, "CREATE SCHEMA "+schema); err != nil {
			t.Fatalf("creating schema (is PostgreSQL at %q up?): %v", dsn, err)
		}
		t.Cleanup(func() { _, _ = admin.ExecContext(context.Background(), "DROP SCHEMA "+schema+" CASCADE") })
		u, err := url.Parse(dsn)
		if err != nil {
			t.Fatal(err)
		}
		q := u.Query()
		q.Set("search_path", schema)
		u.RawQuery = q.Encode()
		s, err := registry.OpenPostgres(ctx, u.String())
		if err != nil {
			t.Fatal(err)
		}
		return s
	})
}
