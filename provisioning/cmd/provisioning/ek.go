package main

import (
	"bufio"
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"fleetkey.dev/provisioning/registry"
)

// The EK allowlist for TPM attestation: an EK is named by the SHA-256 of
// its public key's SubjectPublicKeyInfo (DER), 64 hex digits.

func parseEKHash(s string) ([]byte, error) {
	b, err := hex.DecodeString(strings.TrimSpace(s))
	if err != nil || len(b) != 32 {
		return nil, fmt.Errorf("%q is not an EK hash: want the SHA-256 of the EK's public key (SubjectPublicKeyInfo DER) as 64 hex digits, e.g. from\n  openssl x509 -in ek.pem -pubkey -noout | openssl pkey -pubin -outform DER | sha256sum", s)
	}
	return b, nil
}

func cmdEKAdd(args []string, out io.Writer) error {
	f := newFlags("ek add")
	label := f.fs.String("label", "", "a note for the entry (batch, line, supplier)")
	if err := f.parse(args, out); err != nil {
		return err
	}
	if len(f.pos) == 0 {
		return usageErr("name one or more EK hashes\nhint: provisioning ek add HASH... [--label L], or provisioning ek import FILE.csv")
	}
	var eks []registry.EKEntry
	now := time.Now()
	for _, a := range f.pos {
		h, err := parseEKHash(a)
		if err != nil {
			return usageErr("%v", err)
		}
		eks = append(eks, registry.EKEntry{Hash: h, Label: *label, AddedAt: now, AddedBy: "cli:" + currentUser()})
	}
	return addEKs(f, eks, out)
}

// cmdEKImport reads a CSV of "hash[,label]" lines (a header line and
// blank or # lines are skipped) and adds them all in one transaction.
func cmdEKImport(args []string, out io.Writer) error {
	f := newFlags("ek import")
	if err := f.parse(args, out); err != nil {
		return err
	}
	if len(f.pos) != 1 {
		return usageErr("name the CSV file (hash,label per line; - for standard input)")
	}
	var r io.Reader = os.Stdin
	if name := f.pos[0]; name != "-" {
		file, err := os.Open(name)
		if err != nil {
			return err
		}
		defer file.Close()
		r = file
	}
	var eks []registry.EKEntry
	now := time.Now()
	sc := bufio.NewScanner(io.LimitReader(r, 64<<20))
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		hash, label, _ := strings.Cut(line, ",")
		h, err := parseEKHash(hash)
		if err != nil {
			if n == 1 && len(eks) == 0 && strings.Contains(strings.ToLower(hash), "hash") {
				continue // a header
			}
			return fmt.Errorf("line %d: %w", n, err)
		}
		eks = append(eks, registry.EKEntry{Hash: h, Label: strings.TrimSpace(label), AddedAt: now, AddedBy: "cli:" + currentUser()})
	}
	if err := sc.Err(); err != nil {
		return err
	}
	if len(eks) == 0 {
		return errors.New("no EK hashes in the file")
	}
	return addEKs(f, eks, out)
}

func addEKs(f *storeFlags, eks []registry.EKEntry, out io.Writer) error {
	return f.withStore(func(ctx context.Context, store registry.Store) error {
		ev := registry.AuditEvent{At: time.Now(), Actor: "cli:" + currentUser(), Action: "ek.add", Subject: fmt.Sprintf("%d EKs", len(eks)), Outcome: registry.Allowed}
		if err := store.AddEKs(ctx, eks, ev); err != nil {
			return err
		}
		fmt.Fprintf(out, "%d EKs on the allowlist\n", len(eks))
		return nil
	})
}

func cmdEKList(args []string, out io.Writer) error {
	f := newFlags("ek list")
	if err := f.parse(args, out); err != nil {
		return err
	}
	return f.withStore(func(ctx context.Context, store registry.Store) error {
		eks, err := store.ListEKs(ctx)
		if err != nil {
			return err
		}
		fmt.Fprintf(out, "%-64s  %-20s  %-16s  %s\n", "EK SHA-256", "ADDED", "BY", "LABEL")
		for _, e := range eks {
			fmt.Fprintf(out, "%-64s  %-20s  %-16s  %s\n", hex.EncodeToString(e.Hash), e.AddedAt.UTC().Format(time.RFC3339), e.AddedBy, e.Label)
		}
		return nil
	})
}

func cmdEKRemove(args []string, out io.Writer) error {
	f := newFlags("ek remove")
	if err := f.parse(args, out); err != nil {
		return err
	}
	if len(f.pos) != 1 {
		return usageErr("name the EK hash to remove")
	}
	h, err := parseEKHash(f.pos[0])
	if err != nil {
		return usageErr("%v", err)
	}
	return f.withStore(func(ctx context.Context, store registry.Store) error {
		ev := registry.AuditEvent{At: time.Now(), Actor: "cli:" + currentUser(), Action: "ek.remove", Subject: hex.EncodeToString(h), Outcome: registry.Allowed}
		if err := store.RemoveEK(ctx, h, ev); err != nil {
			if errors.Is(err, registry.ErrNotFound) {
				return fmt.Errorf("EK %x is not on the allowlist", h)
			}
			return err
		}
		fmt.Fprintf(out, "EK %x removed; devices it attested keep their certificates (revoke them to cut them off)\n", h)
		return nil
	})
}
