package registry

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/stdlib"
)

// Advisory lock class ids (arbitrary constants). Each lock is taken with
// pg_advisory_xact_lock(class, hashtext(current_schema())), so registries
// in different schemas of one database do not wait for each other (a hash
// collision only makes two of them wait), and it is released when the
// transaction ends, commit or rollback.
const (
	pgLockMigrate     = 0x666b6d67 // "fkmg"
	pgLockRevocations = 0x666b7276 // "fkrv"
)

func pgXactLock(class int) string {
	return fmt.Sprintf(`SELECT pg_advisory_xact_lock(%d, COALESCE(hashtext(current_schema()), 0))`, class)
}

// pgDialect: several provisioning processes may write at once, so
//   - token uses are spent by one conditional UPDATE (see spendToken),
//     which PostgreSQL re-checks on the newest row version when it waited
//     for another writer's lock;
//   - the device row is locked (SELECT ... FOR UPDATE) from the check of
//     ExpectSerial until commit;
//   - every transaction that assigns revocation sequence numbers first
//     takes one advisory lock and only then reads MAX(revocation_seq), so
//     numbers are handed out in commit order: a transaction's numbers are
//     visible before the next one can take the lock, and a gateway that
//     read "everything after N" never finds a smaller number committed
//     later;
//   - the migration runs under another advisory lock.
var pgDialect = &dialect{
	name:   "postgres",
	dollar: true,
	types: strings.NewReplacer("{time}", "TIMESTAMPTZ", "{bytes}", "BYTEA",
		"{seq}", "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY"),
	time:            func(t time.Time) any { return normTime(t) },
	forUpdate:       " FOR UPDATE",
	lockMigration:   pgXactLock(pgLockMigrate),
	lockRevocations: pgXactLock(pgLockRevocations),
	isUnique:        func(err error) bool { return pgCode(err) == "23505" }, // unique_violation
	isRetryable: func(err error) bool {
		c := pgCode(err)
		return c == "40001" || c == "40P01" // serialization_failure, deadlock_detected
	},
}

func pgCode(err error) string {
	var pe *pgconn.PgError
	if errors.As(err, &pe) {
		return pe.Code
	}
	return ""
}

// OpenPostgres opens the registry in the PostgreSQL database dsn names (a
// postgres:// URL or key=value string, as pgx v5 parses it; a search_path
// parameter selects the schema), migrating the schema as needed. Many
// provisioning replicas may share the database; see the package
// invariants for what they can rely on.
func OpenPostgres(ctx context.Context, dsn string) (Store, error) {
	cfg, err := pgx.ParseConfig(dsn)
	if err != nil {
		// pgx redacts the password from its parse errors.
		return nil, fmt.Errorf("opening PostgreSQL registry: %w", err)
	}
	db := stdlib.OpenDB(*cfg)
	db.SetMaxOpenConns(16)
	db.SetMaxIdleConns(16)
	db.SetConnMaxIdleTime(5 * time.Minute)
	s := &sqlStore{r: db, w: db, d: pgDialect}
	if err := db.PingContext(ctx); err != nil {
		db.Close()
		return nil, fmt.Errorf("opening PostgreSQL registry: %w", err)
	}
	if err := s.migrate(ctx); err != nil {
		db.Close()
		return nil, fmt.Errorf("opening PostgreSQL registry: %w", err)
	}
	if err := s.startCommitter(ctx); err != nil {
		s.Close()
		return nil, err
	}
	return s, nil
}
