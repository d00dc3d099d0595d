package registry

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"net/url"
	"os"
	"runtime"
	"strings"
	"time"

	"modernc.org/sqlite"
	sqlite3 "modernc.org/sqlite/lib"
)

// SQLite connection settings.
//
//   - journal_mode=WAL: readers never block the writer nor the writer
//     readers, and a commit is one append to the log.
//   - synchronous=FULL: the WAL is synced at every commit, so a
//     certificate RecordIssue returned survives a power cut or kernel
//     crash, not only a process crash. NORMAL would make commits cheaper
//     but may lose the last transactions on power loss, and a certificate
//     out in the world that the registry forgot is exactly what RecordIssue
//     promises never to allow. Provisioning is not write-heavy enough for
//     the fsync to matter.
//   - busy_timeout=5000: a connection waits up to 5 s for a lock another
//     process (the CLI beside the running service) holds, instead of
//     failing with SQLITE_BUSY at once.
//   - foreign_keys=1: certificates must belong to a known device.
//   - _txlock=immediate: write transactions take the write lock at BEGIN,
//     so two writers never both read and then fail to upgrade (which
//     SQLite reports as SQLITE_BUSY without waiting).
//
// Within a process, writes go through a pool of one connection, so they
// queue in Go (honouring ctx) rather than in SQLite's busy handler; reads
// use a separate read-only pool and run alongside the writer.
var (
	sqliteWriter = url.Values{
		"_pragma": {"busy_timeout(5000)", "foreign_keys(1)", "journal_mode(WAL)", "synchronous(FULL)"},
		"_txlock": {"immediate"},
	}
	sqliteReader = url.Values{
		"_pragma": {"busy_timeout(5000)", "query_only(1)"},
	}
)

var sqliteDialect = &dialect{
	name:  "sqlite",
	types: strings.NewReplacer("{time}", "INTEGER", "{bytes}", "BLOB", "{seq}", "INTEGER PRIMARY KEY AUTOINCREMENT"),
	time:  func(t time.Time) any { return normTime(t).UnixMicro() },
	// One writer at a time: no row locks to take, and the numbering of
	// revocations is serial by construction.
	isUnique: func(err error) bool {
		var se *sqlite.Error
		if !errors.As(err, &se) {
			return false
		}
		switch se.Code() {
		case sqlite3.SQLITE_CONSTRAINT_UNIQUE, sqlite3.SQLITE_CONSTRAINT_PRIMARYKEY:
			return true
		}
		return false
	},
	isRetryable: func(error) bool { return false },
	prepare:     true,
}

// OpenSQLite opens the registry in the SQLite file at path, creating it
// (mode 0600: it holds token hashes) and migrating its schema as needed,
// with modernc.org/sqlite (pure Go). Several handles, in one process or
// several, may open the same file: writes are serialised by SQLite's write
// lock, so token uses are never spent twice.
func OpenSQLite(ctx context.Context, path string) (Store, error) {
	if path == "" || strings.HasPrefix(path, ":memory:") || strings.HasPrefix(path, "file:") {
		return nil, fmt.Errorf("opening registry: %q is not a file path", path)
	}
	// Create the file here so that it starts private; SQLite gives its
	// -wal and -shm files the same mode.
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("opening registry: %w", err)
	}
	if err := f.Close(); err != nil {
		return nil, fmt.Errorf("opening registry: %w", err)
	}
	// A URI, with the path escaped, so that '?' or '#' in it stay part of
	// the name.
	name := "file:" + (&url.URL{Path: path}).EscapedPath() + "?"
	w, err := sql.Open("sqlite", name+sqliteWriter.Encode())
	if err != nil {
		return nil, fmt.Errorf("opening registry %s: %w", path, err)
	}
	w.SetMaxOpenConns(1)
	w.SetMaxIdleConns(1)
	r, err := sql.Open("sqlite", name+sqliteReader.Encode())
	if err != nil {
		w.Close()
		return nil, fmt.Errorf("opening registry %s: %w", path, err)
	}
	n := max(4, runtime.GOMAXPROCS(0))
	r.SetMaxOpenConns(n)
	r.SetMaxIdleConns(n)
	s := &sqlStore{r: r, w: w, d: sqliteDialect}
	if err := migrateSQLite(ctx, s); err != nil {
		s.Close()
		return nil, fmt.Errorf("opening registry %s: %w", path, err)
	}
	if err := s.startCommitter(ctx); err != nil {
		s.Close()
		return nil, err
	}
	return s, nil
}

// openBusyFor bounds how long OpenSQLite tries again on SQLITE_BUSY.
const openBusyFor = 10 * time.Second

// migrateSQLite migrates s, trying again while SQLite answers SQLITE_BUSY.
// Processes that open a new file at once race to switch it to WAL, and a
// connection that loses that race can be answered SQLITE_BUSY at once,
// without the busy handler (SQLite does so where waiting could deadlock);
// about one open in fifty failed so in TestSQLiteConcurrentOpen. A failed
// connection is dropped by database/sql, so the next try sets up a new one
// and finds the file in WAL mode.
func migrateSQLite(ctx context.Context, s *sqlStore) error {
	deadline := time.Now().Add(openBusyFor)
	for wait := 5 * time.Millisecond; ; wait = min(2*wait, 200*time.Millisecond) {
		err := s.migrate(ctx)
		var se *sqlite.Error
		if err == nil || !errors.As(err, &se) || se.Code()&0xff != sqlite3.SQLITE_BUSY || time.Now().Add(wait).After(deadline) {
			return err
		}
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return errors.Join(ctx.Err(), err)
		case <-t.C:
		}
	}
}
