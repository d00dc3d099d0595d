package simulator

import (
	"context"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Fault is something done to the system in the middle of a run.
type Fault struct {
	Name string
	At   time.Duration
	// Every, if set, repeats the fault until the telemetry phase ends.
	Every time.Duration
	// Do acts; its note goes into the summary.
	Do func(ctx context.Context, fc *FleetControl) (note string, err error)
}

// FleetControl is what a fault may do to the virtual devices.
type FleetControl struct{ f *fleet }

var errDropped = errors.New("cut by a fault drill")

// DropN cuts the connections of n random devices that are ready; they
// reconnect after their backoff, handshake again and resend what was not
// acknowledged. It returns how many it cut.
func (fc *FleetControl) DropN(n int) int {
	var ready []*vdev
	for _, v := range fc.f.devs {
		v.mu.Lock()
		if v.ready && v.revokedAt.IsZero() {
			ready = append(ready, v) // a revoked device is left to the gateway
		}
		v.mu.Unlock()
	}
	rand.Shuffle(len(ready), func(i, j int) { ready[i], ready[j] = ready[j], ready[i] })
	cut := 0
	for _, v := range ready[:min(n, len(ready))] {
		v.mu.Lock()
		c, g := v.conn, v.gen
		v.mu.Unlock()
		if c != nil {
			v.lost(g, errDropped)
			cut++
		}
	}
	return cut
}

// Connected returns the ids of devices connected and ready now.
func (fc *FleetControl) Connected() []string {
	var out []string
	for _, v := range fc.f.devs {
		v.mu.Lock()
		if v.ready {
			out = append(out, v.id)
		}
		v.mu.Unlock()
	}
	return out
}

// Revoked tells the fleet that device id's certificate was revoked at at:
// the time until the gateway closes its connection is measured
// (revoked_out), it does not reconnect, and its unacknowledged records are
// not counted as lost. It returns a channel closed when the device is out.
func (fc *FleetControl) Revoked(id string, at time.Time) <-chan struct{} {
	out := make(chan struct{})
	for _, v := range fc.f.devs {
		if v.id != id {
			continue
		}
		v.mu.Lock()
		v.revokedAt, v.out = at, out
		if v.conn == nil {
			v.done = true
			v.dropPending()
			close(out)
			v.out = nil
		}
		v.mu.Unlock()
		return out
	}
	close(out)
	return out
}

// faultRun collects the faults' notes.
type faultRun struct {
	wg    sync.WaitGroup
	mu    sync.Mutex
	notes []string
}

func runFaults(ctx context.Context, cfg *RunConfig, f *fleet, start time.Time) *faultRun {
	fr := &faultRun{}
	fc := &FleetControl{f: f}
	for _, flt := range cfg.Faults {
		fr.wg.Go(func() {
			at := start.Add(flt.At)
			count, total := 0, 0
			for {
				if !sleepUntil(ctx, at) {
					return
				}
				note, err := flt.Do(ctx, fc)
				if flt.Every == 0 {
					fr.add(flt, note, err)
					return
				}
				count++
				if n, err := strconv.Atoi(note); err == nil {
					total += n
				}
				if at = at.Add(flt.Every); !at.Before(f.stopPub) {
					fr.add(flt, fmt.Sprintf("%d times, %d connections cut", count, total), nil)
					return
				}
			}
		})
	}
	return fr
}

func (fr *faultRun) add(f Fault, note string, err error) {
	fr.mu.Lock()
	defer fr.mu.Unlock()
	s := fmt.Sprintf("%s at %s", f.Name, f.At)
	if note != "" {
		s += ": " + note
	}
	if err != nil {
		s += ": failed: " + err.Error()
	}
	fr.notes = append(fr.notes, s)
}

func (fr *faultRun) wait() []string {
	fr.wg.Wait()
	fr.mu.Lock()
	defer fr.mu.Unlock()
	return fr.notes
}

// FaultSpec is a parsed --fault flag.
type FaultSpec struct {
	Kind string // gateway-restart, churn, storm, revoke
	At   time.Duration
	// Fraction of devices (churn: per minute; storm: at once); N devices
	// (revoke).
	Fraction float64
	N        int
}

// ParseFault parses a --fault value:
//
//	gateway-restart@D   restart the gateway D into the run (--local)
//	churn:P%            P% of the devices reconnect each minute, all run long
//	storm:P%@D          P% of the devices cut at once, D into the run
//	revoke:N@D          revoke N connected devices D into the run (enrolled devices)
func ParseFault(s string) (FaultSpec, error) {
	spec, at, hasAt := strings.Cut(s, "@")
	var fs FaultSpec
	if hasAt {
		d, err := time.ParseDuration(at)
		if err != nil || d < 0 {
			return fs, fmt.Errorf("fault %q: %q is not a duration such as 30s", s, at)
		}
		fs.At = d
	}
	kind, arg, hasArg := strings.Cut(spec, ":")
	fs.Kind = kind
	pct := func() error {
		p, err := strconv.ParseFloat(strings.TrimSuffix(arg, "%"), 64)
		if !hasArg || err != nil || !strings.HasSuffix(arg, "%") || p <= 0 || p > 100 {
			return fmt.Errorf("fault %q: want a percentage in (0, 100], such as %s:10%%", s, kind)
		}
		fs.Fraction = p / 100
		return nil
	}
	switch kind {
	case "gateway-restart":
		if !hasAt || hasArg {
			return fs, fmt.Errorf("fault %q: write gateway-restart@D, such as gateway-restart@20s", s)
		}
	case "churn":
		if hasAt {
			return fs, fmt.Errorf("fault %q: churn runs all along; write churn:P%%", s)
		}
		return fs, pct()
	case "storm":
		if !hasAt {
			return fs, fmt.Errorf("fault %q: write storm:P%%@D, such as storm:50%%@30s", s)
		}
		return fs, pct()
	case "revoke":
		n, err := strconv.Atoi(arg)
		if !hasAt || !hasArg || err != nil || n <= 0 {
			return fs, fmt.Errorf("fault %q: write revoke:N@D, such as revoke:5@20s", s)
		}
		fs.N = n
	default:
		return fs, fmt.Errorf("fault %q: unknown; faults are gateway-restart@D, churn:P%%, storm:P%%@D, revoke:N@D", s)
	}
	return fs, nil
}

// Revoker revokes a device's certificates (the provisioning admin API).
type Revoker func(ctx context.Context, id string) error

// Fault turns a spec into a fault. restart restarts the gateway (nil:
// not possible); revoke revokes devices (nil: not possible).
func (fs FaultSpec) Fault(restart func() error, revoke Revoker) (Fault, error) {
	f := Fault{Name: fs.Kind, At: fs.At}
	switch fs.Kind {
	case "gateway-restart":
		if restart == nil {
			return f, errors.New("fault gateway-restart needs --local: the simulator restarts the gateway it runs")
		}
		f.Do = func(context.Context, *FleetControl) (string, error) { return "", restart() }
	case "churn":
		f.Name = fmt.Sprintf("churn %.0f%%/min", fs.Fraction*100)
		f.At, f.Every = time.Second, time.Second
		// Each second, fraction/60 of the ready devices, the remainder
		// carried to the next second: the rate holds for small fleets too.
		var owed float64
		f.Do = func(_ context.Context, fc *FleetControl) (string, error) {
			owed += fs.Fraction / 60 * float64(len(fc.Connected()))
			n := int(owed)
			owed -= float64(n)
			return strconv.Itoa(fc.DropN(n)), nil
		}
	case "storm":
		f.Name = fmt.Sprintf("reconnect storm %.0f%%", fs.Fraction*100)
		f.Do = func(_ context.Context, fc *FleetControl) (string, error) {
			n := int(math.Round(fs.Fraction * float64(len(fc.Connected()))))
			return fmt.Sprintf("%d connections cut at once", fc.DropN(n)), nil
		}
	case "revoke":
		if revoke == nil {
			return f, errors.New("fault revoke needs --local (or the provisioning admin credential) and enrolled devices (--identities enroll)")
		}
		f.Name = fmt.Sprintf("revoke %d", fs.N)
		f.Do = func(ctx context.Context, fc *FleetControl) (string, error) { return revokeSome(ctx, fc, fs.N, revoke) }
	}
	return f, nil
}

// revokeSome revokes n connected devices and waits (5 s at most) until the
// gateway has closed each one's connection.
func revokeSome(ctx context.Context, fc *FleetControl, n int, revoke Revoker) (string, error) {
	ids := fc.Connected()
	rand.Shuffle(len(ids), func(i, j int) { ids[i], ids[j] = ids[j], ids[i] })
	ids = ids[:min(n, len(ids))]
	var outs []<-chan struct{}
	for _, id := range ids {
		// Marked first: the gateway may close the connection before the
		// admin API has answered.
		out := fc.Revoked(id, time.Now())
		if err := revoke(ctx, id); err != nil {
			return "", fmt.Errorf("revoking %s: %w", id, err)
		}
		outs = append(outs, out)
	}
	deadline := time.NewTimer(5 * time.Second)
	defer deadline.Stop()
	still, expired := 0, false
	for _, out := range outs {
		if expired {
			select {
			case <-out:
			default:
				still++
			}
			continue
		}
		select {
		case <-out:
		case <-deadline.C:
			expired = true
			still++
		case <-ctx.Done():
			return "", ctx.Err()
		}
	}
	if still > 0 {
		return "", fmt.Errorf("%d of %d revoked devices still connected 5 s later", still, len(ids))
	}
	return fmt.Sprintf("%d devices revoked; the gateway closed every connection (revoked_out)", len(ids)), nil
}
