package registry

import (
	"context"
	"path/filepath"
	"testing"
)

// TestSQLitePragmas checks the connection settings OpenSQLite documents
// are the ones in effect.
func TestSQLitePragmas(t *testing.T) {
	t.Parallel()
	st, err := OpenSQLite(context.Background(), filepath.Join(t.TempDir(), "registry.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	s := st.(*sqlStore)
	for _, p := range []struct {
		name string
		want string
	}{
		{"journal_mode", "wal"},
		{"synchronous", "2"}, // FULL
		{"busy_timeout", "5000"},
		{"foreign_keys", "1"},
		{"query_only", "0"},
	} {
		var got string
		if err := s.w.QueryRow("PRAGMA " + p.name).Scan(&got); err != nil {
			t.Fatal(err)
		}
		if got != p.want {
			t.Errorf("writer: PRAGMA %s = %s, want %s", p.name, got, p.want)
		}
	}
	var ro string
	if err := s.r.QueryRow("PRAGMA query_only").Scan(&ro); err != nil || ro != "1" {
		t.Errorf("reader: PRAGMA query_only = %q, %v; want 1", ro, err)
	}
	if _, err := s.r.Exec(`INSERT INTO audit (at, actor, action, subject, outcome, reason, remote_addr, serial) VALUES (0, '', '', '', '', '', '', '')`); err == nil {
		t.Error("the read pool accepted a write")
	}
}
