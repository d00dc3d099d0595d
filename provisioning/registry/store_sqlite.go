package registry

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"net/url"
	"os"
	"strings"

	"modernc.org/sqlite"
	sqlite3 "modernc.org/sqlite/lib"
)

// OpenSQLite opens (creating if needed) the registry in the SQLite file at
// path, with modernc.org/sqlite (pure Go, no cgo).
//
// Pragmas: WAL, so readers never block the writer; synchronous=FULL, so a
// committed certificate survives a power cut, not only a crash (the
// registry must hold every certificate it hands out); busy_timeout=5s and
// BEGIN IMMEDIATE transactions, so concurrent writers, in this process or
// another (the CLI beside a running service), queue for the write lock
// instead of failing; foreign_keys on.
func OpenSQLite(ctx context.Context, path string) (Store, error) {
	// Create the file ourselves so it starts private (0600).
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("opening registry %s: %w", path, err)
	}
	f.Close()
	q := url.Values{}
	for _, p := range []string{"journal_mode(WAL)", "synchronous(FULL)", "busy_timeout(5000)", "foreign_keys(1)"} {
		q.Add("_pragma", p)
	}
	q.Set("_txlock", "immediate")
	db, err := sql.Open("sqlite", "file:"+path+"?"+q.Encode())
	if err != nil {
		return nil, fmt.Errorf("opening registry %s: %w", path, err)
	}
	db.SetMaxOpenConns(8)
	s := &sqlStore{db: db, d: dialect{
		name:            "sqlite",
		rebind:          func(q string) string { return q },
		ddl:             func(s string) string { return strings.ReplaceAll(s, "AUTO_SEQ", "INTEGER PRIMARY KEY AUTOINCREMENT") },
		isUnique:        isSQLiteUnique,
		lockRevocations: func(context.Context, *sql.Tx) error { return nil }, // IMMEDIATE transactions already serialise writers
	}}
	conn, err := db.Conn(ctx)
	if err != nil {
		db.Close()
		return nil, fmt.Errorf("opening registry %s: %w", path, err)
	}
	defer conn.Close()
	if err := s.migrate(ctx, conn); err != nil {
		db.Close()
		return nil, fmt.Errorf("registry %s: %w", path, err)
	}
	return s, nil
}

func isSQLiteUnique(err error) bool {
	var se *sqlite.Error
	if !errors.As(err, &se) {
		return false
	}
	return se.Code() == sqlite3.SQLITE_CONSTRAINT_UNIQUE || se.Code() == sqlite3.SQLITE_CONSTRAINT_PRIMARYKEY
}
