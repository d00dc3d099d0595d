// Package revocation keeps the gateway's view of revoked certificates
// current: it follows the provisioning service's revocation feed (server-
// sent events on /revocations/v1/stream, gateway-role mTLS) and, while the
// feed is unreachable, polls the signed CRL (/crl) instead.
//
// The feed carries one event per revocation, in sequence order:
//
//	id: 17
//	event: revoked
//	data: {"seq":17,"serial":"ab12...","device":"sensor-1",...}
//
// The follower resumes after the last sequence number it applied
// (Last-Event-ID), so nothing is missed across reconnects.
package revocation

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"strconv"
	"strings"
	"time"

	"fleetkey.dev/certs/crl"
	"fleetkey.dev/certs/trust"
)

// Event is one revocation on the feed.
type Event struct {
	Seq    int64  `json:"seq"`
	Serial string `json:"serial"`
	Device string `json:"device"`
}

// Follower applies revocations from the feed, falling back to the CRL.
type Follower struct {
	// BaseURL of the provisioning service, e.g. https://localhost:8443.
	BaseURL string
	// Client presents the gateway certificate and trusts the fleet roots.
	Client *http.Client
	Bundle *trust.Bundle
	// Revoke is called for every revoked serial (lowercase hex), possibly
	// more than once for the same one.
	Revoke func(serial string)
	Log    *slog.Logger
	// IdleTimeout ends a stream that sent nothing, not even its 15-second
	// keep-alive, for this long. Default 45 s.
	IdleTimeout time.Duration
	// CRLInterval is how often the CRL is fetched while the feed is down.
	// Default 30 s.
	CRLInterval time.Duration
	// Now is the clock for CRL validity; default time.Now.
	Now func() time.Time

	cursor int64
}

// maxLine bounds one line of the feed.
const maxLine = 16 << 10

// Run follows the feed until ctx ends.
func (f *Follower) Run(ctx context.Context) error {
	if f.IdleTimeout == 0 {
		f.IdleTimeout = 45 * time.Second
	}
	if f.CRLInterval == 0 {
		f.CRLInterval = 30 * time.Second
	}
	if f.Now == nil {
		f.Now = time.Now
	}
	if f.Log == nil {
		f.Log = slog.New(slog.DiscardHandler)
	}
	backoff := time.Second
	var lastCRL time.Time
	for {
		err := f.stream(ctx)
		if ctx.Err() != nil {
			return nil
		}
		f.Log.Warn("revocation feed interrupted", "err", err, "retry_in", backoff)
		if time.Since(lastCRL) >= f.CRLInterval {
			if err := f.applyCRL(ctx); err != nil {
				f.Log.Warn("CRL fallback failed", "err", err)
			} else {
				lastCRL = time.Now()
			}
		}
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 30*time.Second)
	}
}

// stream reads the feed until it fails.
func (f *Follower) stream(ctx context.Context) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, "GET", f.BaseURL+"/revocations/v1/stream?since="+strconv.FormatInt(f.cursor, 10), nil)
	if err != nil {
		return err
	}
	req.Header.Set("Accept", "text/event-stream")
	resp, err := f.Client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		return fmt.Errorf("feed answered %s: %s", resp.Status, strings.TrimSpace(string(b)))
	}
	idle := time.AfterFunc(f.IdleTimeout, cancel)
	defer idle.Stop()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 4096), maxLine)
	var data string
	for sc.Scan() {
		idle.Reset(f.IdleTimeout)
		line := sc.Text()
		switch {
		case strings.HasPrefix(line, "data: "):
			data = line[len("data: "):]
		case line == "" && data != "":
			var ev Event
			if err := json.Unmarshal([]byte(data), &ev); err != nil || ev.Serial == "" {
				return fmt.Errorf("malformed feed event %q", data)
			}
			f.Revoke(strings.ToLower(ev.Serial))
			if ev.Seq > f.cursor {
				f.cursor = ev.Seq
			}
			data = ""
		}
	}
	if err := sc.Err(); err != nil {
		return err
	}
	return errors.New("feed closed by the server")
}

// applyCRL fetches /crl, checks it against the bundle's issuing CAs, and
// applies every serial on it.
func (f *Follower) applyCRL(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, "GET", f.BaseURL+"/crl", nil)
	if err != nil {
		return err
	}
	resp, err := f.Client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("CRL answered %s", resp.Status)
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, crl.MaxBytes+1))
	if err != nil {
		return err
	}
	list, err := crl.Parse(body, f.Bundle.Issuing(), f.Now())
	if err != nil {
		return err
	}
	for _, e := range list.RevokedCertificateEntries {
		f.Revoke(e.SerialNumber.Text(16))
	}
	f.Log.Info("applied CRL", "entries", len(list.RevokedCertificateEntries), "number", list.Number)
	return nil
}

// Cursor is the last sequence number applied.
func (f *Follower) Cursor() int64 { return f.cursor }
