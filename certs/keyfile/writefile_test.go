//go:build unix

package keyfile

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
)

// onlyFile fails the test unless name is the only entry in dir, so no
// temporary file was left behind.
func onlyFile(t *testing.T, dir, name string) {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != 1 || entries[0].Name() != name {
		t.Fatalf("directory holds %v; want only %s", entries, name)
	}
}

// TestWriteFile changes the process's umask, so it must not run in parallel
// with anything.
func TestWriteFile(t *testing.T) {
	cases := []struct {
		name      string
		umask     int
		existing  bool // a file with "old", mode 0644, is there first
		perm      fs.FileMode
		overwrite bool
		wantErr   error
	}{
		{name: "ok/new-key-permissive-umask", umask: 0, perm: 0o600},
		{name: "ok/new-key-default-umask", umask: 0o022, perm: 0o600},
		{name: "ok/restrictive-umask-does-not-narrow", umask: 0o077, perm: 0o644},
		{name: "ok/overwrite", umask: 0, existing: true, perm: 0o600, overwrite: true},
		{name: "fail/exists", umask: 0, existing: true, perm: 0o600, wantErr: fs.ErrExist},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			defer syscall.Umask(syscall.Umask(c.umask))
			dir := t.TempDir()
			p := filepath.Join(dir, "k.key")
			if c.existing {
				if err := os.WriteFile(p, []byte("old"), 0o644); err != nil {
					t.Fatal(err)
				}
				if err := os.Chmod(p, 0o644); err != nil {
					t.Fatal(err)
				}
			}
			err := WriteFile(p, []byte("new"), c.perm, c.overwrite)
			wantData, wantMode := "new", c.perm
			if c.wantErr != nil {
				if !errors.Is(err, c.wantErr) || !strings.Contains(err.Error(), fmt.Sprintf("refusing to overwrite existing %q", p)) {
					t.Fatalf("err = %v; want %v naming the path", err, c.wantErr)
				}
				wantData, wantMode = "old", 0o644
			} else if err != nil {
				t.Fatal(err)
			}
			if b, err := os.ReadFile(p); err != nil || string(b) != wantData {
				t.Fatalf("file holds %q (%v); want %q", b, err, wantData)
			}
			if fi, err := os.Stat(p); err != nil || fi.Mode() != wantMode {
				t.Fatalf("mode = %v (%v); want %v", fi.Mode(), err, wantMode)
			}
			onlyFile(t, dir, "k.key")
		})
	}
	t.Run("ok/relative-path", func(t *testing.T) {
		dir := t.TempDir()
		t.Chdir(dir)
		if err := WriteFile("k.key", []byte("new"), 0o600, false); err != nil {
			t.Fatal(err)
		}
		onlyFile(t, dir, "k.key")
	})
	t.Run("fail/missing-directory", func(t *testing.T) {
		dir := t.TempDir()
		p := filepath.Join(dir, "missing", "k.key")
		if err := WriteFile(p, nil, 0o600, false); !errors.Is(err, fs.ErrNotExist) || !strings.Contains(err.Error(), p) {
			t.Fatalf("err = %v; want fs.ErrNotExist naming the path", err)
		}
	})
}

// TestWriteFileRace has writers race for one path: exactly one must win,
// and the file must hold exactly its bytes.
func TestWriteFileRace(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	p := filepath.Join(dir, "k.key")
	const n = 16
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() { errs[i] = WriteFile(p, []byte(fmt.Sprint("writer ", i)), 0o600, false) })
	}
	wg.Wait()
	winner := slices.IndexFunc(errs, func(err error) bool { return err == nil })
	if winner < 0 {
		t.Fatalf("no writer won: %v", errs)
	}
	for i, err := range errs {
		if i != winner && !errors.Is(err, fs.ErrExist) {
			t.Fatalf("writer %d: err = %v; want fs.ErrExist", i, err)
		}
	}
	if b, err := os.ReadFile(p); err != nil || string(b) != fmt.Sprint("writer ", winner) {
		t.Fatalf("file holds %q (%v); want writer %d's bytes", b, err, winner)
	}
	onlyFile(t, dir, "k.key")
}
